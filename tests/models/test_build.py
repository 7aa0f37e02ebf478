"""The one network builder: what each kind of checkpoint and each set of flags builds, and reading networks back.

One table: (checkpoint kind, backbone, task inputs, upcycle) -> the layout ``build_network`` must build (MoE experts
and top-k, input routes and widths, whether pretrained weights arrived), or the flag its error must name.
"""

import pytest
import torch
from safetensors.torch import save_file

from diffperc.models import DiT, moe_config, upcycle
from diffperc.models.build import Backbone, Upcycle, build_network, network_from_checkpoint
from diffperc.models.router import PatchEmbedRouter

C = 3  # pixel-space latents
TINY = dict(name="t1", hidden_size=32, depth=2, num_heads=2, patch_size=2)
DIT = dict(input_size=8, patch_size=2, in_channels=C, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def _randomized(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name != "pos_embed":  # the fixed sin-cos embedding stays what loading expects
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Checkpoints of each kind: an official-layout dense DiT (one latent, class labels + null row), a pretraining
    DiT-MoE with its ``diffperc`` record, and the same MoE as bare safetensors (no record of its top-k)."""
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    dense = _randomized(DiT(**DIT, class_dropout_prob=0.1))
    torch.save(dense.state_dict(), root / "dense.pt")
    moe = upcycle(_randomized(DiT(**DIT, class_dropout_prob=0.1), seed=1), num_experts=4, top_k=2)
    record = {"dit_config": moe.config, "moe": moe_config(moe), "task": None}
    state = {f"net.{k}": v for k, v in moe.state_dict().items()}
    torch.save({"state_dict": state, "diffperc": record}, root / "moe.ckpt")
    save_file({k: v.contiguous() for k, v in moe.state_dict().items()}, str(root / "moe_bare.safetensors"))
    names = {"dense": "dense.pt", "moe": "moe.ckpt", "moe_bare": "moe_bare.safetensors"}
    return {kind: str(root / name) for kind, name in names.items()}


# (checkpoint, backbone overrides, task inputs, upcycle, expected (experts, top_k) or None, routes, loaded)
CASES = {
    "scratch dense, one task": (None, {}, [2], None, None, None, False),
    "scratch MoE preset": (None, {"name": "t1-4E2A"}, [2], None, (4, 2), None, False),
    "scratch, upcycled": (None, {}, [2], Upcycle(num_experts=4, top_k=1), (4, 1), None, False),
    "scratch, two tasks": (None, {}, [2, 3], None, None, [2 * C, 3 * C], False),
    "scratch, pretraining (one latent)": (None, {}, None, None, None, None, False),
    "dense checkpoint, one task": ("dense", {}, [2], None, None, None, True),
    "dense checkpoint, upcycled": ("dense", {}, [2], Upcycle(num_experts=4, top_k=2), (4, 2), None, True),
    "dense checkpoint, two tasks": ("dense", {}, [2, 3], None, None, [2 * C, 3 * C], True),
    "MoE checkpoint, dense preset name": ("moe", {}, [2], None, (4, 2), None, True),
    "MoE checkpoint, restated upcycle": ("moe", {}, [2], Upcycle(num_experts=4, top_k=2), (4, 2), None, True),
    "bare MoE file, top-k from upcycle": ("moe_bare", {}, [2], Upcycle(num_experts=4, top_k=2), (4, 2), None, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_build_network_layout(case, files):
    ckpt, overrides, task_inputs, up, experts, routes, loaded = CASES[case]
    net = build_network(
        Backbone(**{**TINY, **overrides}),
        input_size=8,
        in_channels=C,
        num_classes=len(task_inputs or [0] * 10),
        class_dropout_prob=0.0 if task_inputs else 0.1,
        task_inputs=task_inputs,
        init_from=files[ckpt] if ckpt else None,
        upcycle_to=up,
    )
    layout = moe_config(net)
    assert (layout["num_experts"], layout["experts_per_token"]) == experts if experts else layout is None
    if routes:
        assert isinstance(net.x_embedder, PatchEmbedRouter) and net.x_embedder.in_channels == routes
    else:
        assert net.x_embedder.proj.in_channels == C * (task_inputs[0] if task_inputs else 1)
    if loaded:  # the first block's attention came from the file, exactly (no conversion touches it)
        source = torch.load(files[ckpt], weights_only=True) if ckpt == "dense" else None
        if source is None:
            from diffperc.models.pretrained import read_network_state

            source = read_network_state(files[ckpt])
        torch.testing.assert_close(net.blocks[0].attn.qkv.weight, source["blocks.0.attn.qkv.weight"], rtol=0, atol=0)
    else:
        assert not net.blocks[0].adaLN_modulation[-1].weight.any()  # adaLN-Zero: a fresh network


def test_widened_input_keeps_the_response_of_the_loaded_network(files):
    # The widening rule: k copies of one latent through the widened projection = the latent through the original.
    net = build_network(Backbone(**TINY), input_size=8, in_channels=C, num_classes=1, task_inputs=[3],
                        init_from=files["dense"]).eval()
    source = DiT(**DIT, class_dropout_prob=0.1)
    source.load_state_dict(torch.load(files["dense"], weights_only=True))
    x = torch.randn(2, C, 8, 8)
    embed = net.x_embedder.proj(torch.cat([x] * 3, dim=1))
    torch.testing.assert_close(embed, source.x_embedder.proj(x), rtol=1e-5, atol=1e-6)


ERRORS = {
    "dense checkpoint into an MoE preset": ("dense", {"name": "t1-4E2A"}, None, "upcycle.num_experts"),
    "upcycle contradicting the MoE checkpoint": ("moe", {}, Upcycle(num_experts=8, top_k=2), "num_experts=4"),
    "bare MoE file without a top-k": ("moe_bare", {}, None, "no record of how many are active"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_build_network_refuses(case, files):
    ckpt, overrides, up, message = ERRORS[case]
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        build_network(Backbone(**{**TINY, **overrides}), input_size=8, in_channels=C, num_classes=1,
                      task_inputs=[2], init_from=files[ckpt], upcycle_to=up)


@pytest.mark.parametrize("kind", ["dense", "moe", "routed"])
def test_network_from_checkpoint_rebuilds_the_trained_network(kind, files, tmp_path):
    net = build_network(
        Backbone(**TINY),
        input_size=8,
        in_channels=C,
        num_classes=2,
        task_inputs=[2, 3] if kind == "routed" else [2],
        init_from=files["moe"] if kind == "moe" else None,
    )
    _randomized(net, seed=3)
    record = {"dit_config": net.config, "moe": moe_config(net), "task": "depth",
              "task_routes": getattr(net.x_embedder, "in_channels", None)}
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "diffperc": record}, path)
    found = network_from_checkpoint(path)
    assert found.record["task"] == "depth" and found.record["moe"] == moe_config(net)
    x, t, y = torch.randn(2, net.config["in_channels"], 8, 8), torch.tensor([5, 500]), torch.tensor([0, 1])
    with torch.inference_mode():
        torch.testing.assert_close(found.net.eval()(x, t, y), net.eval()(x, t, y), rtol=0, atol=0)


def test_network_from_checkpoint_names_the_flag_for_a_file_it_cannot_rebuild(files):
    with pytest.raises(ValueError, match="`--ckpt_path` .*moe_bare.safetensors: cannot rebuild its network from the"):
        network_from_checkpoint(files["moe_bare"])
