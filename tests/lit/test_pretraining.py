"""DiffusionPretraining: EMA weights in checkpoints and init_from, label dropout, CFG, MoE loss, sample grids."""

import re
from pathlib import Path

import cv2
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from diffperc.data import ProceduralClasses, ProceduralDepth
from diffperc.lit import Backbone, DiffusionPretraining, EMASettings, PerceptionFinetuning, SamplingSettings, Upcycle
from diffperc.lit.parallel import draw_label_drop
from diffperc.models import DiT, build_model, parameter_counts
from diffperc.models.pretrained import load_pretrained
from diffperc.tasks import DepthTask

from helpers import TINY as HELPER_TINY
from helpers import quiet_trainer, tiny_backbone, tiny_vae

TINY = dict(name="t1", **{**HELPER_TINY, "patch_size": 4})
DECAY = 0.5


def _module(**kwargs) -> DiffusionPretraining:
    kwargs.setdefault("ema", EMASettings(decay=DECAY))
    kwargs.setdefault("sampling", SamplingSettings(num_samples=4, num_steps=2, columns=2))
    return DiffusionPretraining(backbone=Backbone(**TINY), image_size=16, **kwargs)


def _randomize(net: torch.nn.Module) -> None:
    # adaLN-Zero starts every block and the output at zero, which would hide any dependence on t, y or x.
    torch.manual_seed(1)
    for param in net.parameters():
        param.data.normal_(0, 0.2)


class _RawWeights(Callback):
    """Records the live network weights after every optimizer step."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()})


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    torch.manual_seed(0)
    module = _module()
    recorder = _RawWeights()
    trainer = quiet_trainer(
        max_steps=5,
        default_root_dir=root,
        enable_checkpointing=True,
        num_sanity_val_steps=0,
        val_check_interval=5,
        limit_val_batches=1,
        callbacks=[recorder, ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)],
    )
    train = DataLoader(ProceduralClasses("train", 64, 16), batch_size=8, shuffle=True)
    val = DataLoader(ProceduralClasses("val", 8, 16), batch_size=8)
    trainer.fit(module, train, val)
    return root, recorder.steps


def test_pretraining_checkpoint_holds_ema_weights_for_init_from(fitted):
    root, steps = fitted
    assert len(steps) == 5
    # Lightning's EMA: the first update copies the weights, then ema <- decay * ema + (1 - decay) * w.
    expected = dict(steps[0])
    for raw in steps[1:]:
        expected = {k: DECAY * expected[k] + (1 - DECAY) * raw[k] for k in raw}

    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)  # plain values only
    key = "net.blocks.0.mlp.fc1.weight"
    torch.testing.assert_close(checkpoint["state_dict"][key], expected["blocks.0.mlp.fc1.weight"])
    torch.testing.assert_close(checkpoint["current_model_state"][key], steps[-1]["blocks.0.mlp.fc1.weight"])
    assert (checkpoint["state_dict"][key] - checkpoint["current_model_state"][key]).abs().max() > 1e-4
    assert checkpoint["hyper_parameters"]["ema"]["decay"] == DECAY

    net = build_model(
        "t1",
        input_size=16,
        in_channels=3,
        patch_size=4,
        hidden_size=32,
        depth=1,
        num_heads=2,
        learn_sigma=False,
        num_classes=10,
        class_dropout_prob=0.1,
    )
    report = load_pretrained(net, root / "checkpoints" / "last.ckpt")
    assert report["ema"] and report["prefix"] == "net."
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, expected[name])


def test_pretraining_checkpoint_initialises_depth_finetuning(fitted):
    root, steps = fitted
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    ema = {k[len("net.") :]: v for k, v in checkpoint["state_dict"].items()}
    finetune = PerceptionFinetuning(
        task=DepthTask(), backbone=Backbone(**TINY), image_size=16, init_from=str(root / "checkpoints" / "last.ckpt")
    )
    state = finetune.net.state_dict()
    torch.testing.assert_close(state["blocks.0.attn.qkv.weight"], ema["blocks.0.attn.qkv.weight"])
    # Marigold's widening for [image, noisy target]; the 10 class rows (not the null row) average into the task row.
    torch.testing.assert_close(state["x_embedder.proj.weight"], ema["x_embedder.proj.weight"].repeat(1, 2, 1, 1) / 2)
    table = ema["y_embedder.embedding_table.weight"]
    assert table.shape[0] == 11
    torch.testing.assert_close(state["y_embedder.embedding_table.weight"], table[:10].mean(0, keepdim=True))


def test_pretraining_writes_sample_grid_png(fitted):
    root, _ = fitted
    grid = cv2.imread(str(root / "samples_step5.png"))
    # 4 samples of 16 px in 2 columns with 2 px padding: 2 * (16 + 2) + 2 = 38.
    assert grid is not None and grid.shape == (38, 38, 3)


def test_pretraining_label_dropout_rate_is_honoured():
    torch.manual_seed(0)
    module = DiffusionPretraining(backbone=Backbone(**TINY), image_size=8, class_dropout_prob=0.25)
    seen = []
    module.net.y_embedder.embedding_table.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    n = 12000
    x0, y = torch.rand(n, 3, 8, 8) * 2 - 1, torch.randint(0, 10, (n,))
    module.train()
    rng = torch.get_rng_state()
    module.diffusion_loss(x0, y, noise=torch.zeros_like(x0), t=torch.zeros(n, dtype=torch.long))
    assert torch.equal(torch.get_rng_state(), rng)  # the drop is drawn from its own seeded generator
    dropped = seen[-1] == 10  # the null label
    # 0.25 +- 5 standard deviations (sqrt(0.25 * 0.75 / 12000) = 0.004); kept labels are untouched.
    assert abs(dropped.float().mean().item() - 0.25) < 0.02
    assert torch.equal(seen[-1][~dropped], y[~dropped])
    assert torch.equal(dropped, draw_label_drop(n, 0.25, seed=0, step=0))  # outside a Trainer: batch 0, rank 0 of 1
    module.eval()
    module.diffusion_loss(x0[:100], y[:100])
    assert torch.equal(seen[-1], y[:100])  # no dropout outside training


def test_pretraining_val_loss_is_the_eval_loss_on_its_own_fixed_noise(tmp_path):
    from diffperc.seeding import derive_seed

    module = _module(sampling=SamplingSettings(num_samples=0))
    _randomize(module.net)
    val = DataLoader(ProceduralClasses("val", 8, 16), batch_size=4)
    trainer = quiet_trainer(default_root_dir=tmp_path)
    first = trainer.validate(module, val, verbose=False)[0]["val/loss"]
    second = trainer.validate(module, val, verbose=False)[0]["val/loss"]
    # Oracle: epsilon MSE in eval mode (labels kept), noise then t from derive_seed(val_seed 0, batch i, stream 2).
    losses = []
    with torch.inference_mode():
        module.eval()
        for i, batch in enumerate(val):
            g = torch.Generator().manual_seed(derive_seed(0, i, stream=2))
            noise = torch.randn(batch["image"].shape, generator=g)
            t = torch.randint(0, 1000, (4,), generator=g)
            out = module.net(module.noise_scheduler.add_noise(batch["image"], noise, t), t, batch["label"])
            losses.append(torch.nn.functional.mse_loss(out[:, :3], noise).item())
    assert first == second == pytest.approx(sum(losses) / 2, rel=1e-6)


def test_pretraining_validation_leaves_training_bit_identical(tmp_path):
    # With DiT's label dropout (0.1): its draws come from (noise_seed, batch) like the training noise. Drawn from the
    # global RNG, which the validation DataLoader's iterator advances (its base seed), they would differ.
    def weights(validate: bool) -> torch.Tensor:
        torch.manual_seed(0)
        module = _module(sampling=SamplingSettings(num_samples=2, num_steps=2))
        trainer = quiet_trainer(
            max_steps=6, val_check_interval=2, limit_val_batches=1 if validate else 0, default_root_dir=tmp_path
        )
        train = DataLoader(ProceduralClasses("train", 64, 16), batch_size=8, shuffle=True)
        trainer.fit(module, train, DataLoader(ProceduralClasses("val", 8, 16), batch_size=8))
        assert ("val/loss" in trainer.callback_metrics) == validate
        return torch.cat([p.detach().flatten() for p in module.net.parameters()])

    assert torch.equal(weights(True), weights(False))


def test_label_drop_rank_shares_tile_the_global_draw_and_change_with_the_step():
    full = draw_label_drop(8, 0.5, seed=3, step=4)
    shares = [draw_label_drop(4, 0.5, seed=3, step=4, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(shares[0], full[0::2]) and torch.equal(shares[1], full[1::2])
    assert not torch.equal(shares[0], shares[1])  # ranks drop different labels
    assert not torch.equal(full, draw_label_drop(8, 0.5, seed=3, step=5))
    assert not torch.equal(full, draw_label_drop(8, 0.5, seed=4, step=4))


def test_pretraining_cfg_scale_one_equals_conditional_sampling():
    module = _module()
    _randomize(module.net)
    labels = torch.tensor([0, 3, 7, 9])
    conditional = module.sample_latents(labels, cfg_scale=None, num_steps=3)
    guided_one = module.sample_latents(labels, cfg_scale=1.0, num_steps=3)
    torch.testing.assert_close(guided_one, conditional, rtol=1e-4, atol=1e-4)
    guided = module.sample_latents(labels, cfg_scale=4.0, num_steps=3)
    assert (guided - conditional).abs().max() > 1e-2  # guidance does change the samples
    assert conditional.shape == (4, 3, 16, 16)
    images = module.sample(labels, num_steps=3)
    assert images.shape == (4, 3, 16, 16) and images.abs().max() <= 1


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_pretraining_adds_the_moe_balance_loss():
    from diffperc.models.moe import moe_aux_loss, upcycle

    module = _module()
    _randomize(module.net)
    module.net = upcycle(module.net, num_experts=4, top_k=2)
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "label": torch.tensor([1, 2, 3, 4])}
    module.train()
    torch.manual_seed(3)  # the label dropout
    loss = module.training_step(batch, 0)
    aux = moe_aux_loss(module.net)
    torch.manual_seed(3)
    noise, t = module.training_noise(batch["image"])  # drawn from (noise_seed, batch counter): the same again
    mse = module.diffusion_loss(batch["image"], batch["label"], noise=noise, t=t)
    assert aux.item() > 0
    torch.testing.assert_close(loss, mse + aux)


def test_pretraining_rejects_cfg_without_null_label():
    with pytest.raises(ValueError, match="class_dropout_prob"):
        _module(class_dropout_prob=0.0, sampling=SamplingSettings(cfg_scale=2.0))
    with pytest.raises(ValueError, match="sampling.labels"):
        _module(sampling=SamplingSettings(labels=[3, 12]))
    assert isinstance(_module(class_dropout_prob=0.0, sampling=SamplingSettings(cfg_scale=None)).net, DiT)


def test_pretraining_checkpoint_leaves_out_the_vae_and_resumes(tmp_path):
    from diffperc.codecs import VAECodec

    tiny_vae().save_pretrained(tmp_path / "vae")

    def fit(max_steps, ckpt_path=None):
        module = DiffusionPretraining(
            codec=VAECodec(str(tmp_path / "vae")),
            image_size=16,
            backbone=tiny_backbone(),
            ema=EMASettings(decay=0.9),
        )
        trainer = quiet_trainer(
            max_steps=max_steps,
            default_root_dir=tmp_path,
            enable_checkpointing=True,
            limit_val_batches=0,
            callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
        )
        trainer.fit(module, DataLoader(ProceduralClasses("train", 32, 16), batch_size=4), ckpt_path=ckpt_path)
        return module, trainer

    module, _ = fit(2)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    for key in ("state_dict", "current_model_state"):
        assert checkpoint[key] and not any(k.startswith("codec.") for k in checkpoint[key])
    # Resuming puts the codec's own weights back before Lightning and the EMA callback load strictly.
    _, trainer = fit(3, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 3
    loaded = DiffusionPretraining.load_from_checkpoint(
        tmp_path / "ckpt" / "last.ckpt", codec=VAECodec(str(tmp_path / "vae"))
    )
    torch.testing.assert_close(loaded.codec.vae.encoder.conv_in.weight, module.codec.vae.encoder.conv_in.weight)


def test_pretraining_ddim_sampling_recovers_data_with_an_exact_noise_oracle():
    module = _module()
    alphas_cumprod = module.noise_scheduler.alphas_cumprod

    class Oracle(torch.nn.Module):
        """Exact epsilon when the data is one fixed image per class: (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""

        input_size = 16

        def __init__(self, images):
            super().__init__()
            self.images = images

        def forward(self, x, t, y):
            abar = alphas_cumprod[t].view(-1, 1, 1, 1)
            return (x - abar.sqrt() * self.images[y]) / (1 - abar).sqrt()

        def forward_with_cfg(self, x, t, y, cfg_scale):
            return self.forward(x, t, y)  # conditional == unconditional for an oracle

    torch.manual_seed(0)
    images = torch.rand(10, 3, 16, 16) * 1.6 - 0.8
    module.net = Oracle(images)
    labels = torch.tensor([2, 7, 7])
    for num_steps in (1, 5):
        out = module.sample_latents(labels, cfg_scale=3.0, num_steps=num_steps)
        torch.testing.assert_close(out, images[labels], rtol=0, atol=1e-4)


# ------------------------------------------------------------- MoE pretraining -> fine-tuning (paper §3.2, §4.3)
PRETRAIN_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart" / "pretrain.yaml"
MOE_TINY = dict(hidden_size=32, depth=1, num_heads=2, patch_size=4)  # experts 4 x 32 = 128 wide
# DiT-MoE's layout: SwiGLU experts, 2 shared experts fused into one SwiGLU of width 2D, unnormalised top-k weights.
DIT_MOE_FLAGS = dict(expert_type="swiglu", num_shared_experts="2", shared_expert_ratio="1.0", normalize_weights="false")
LAYOUTS = {
    "default": dict(num_shared_experts=1, shared_expert_hidden_size=128, expert_type="gelu", normalize_weights=True),
    "dit_moe": dict(num_shared_experts=2, shared_expert_hidden_size=32, expert_type="swiglu", normalize_weights=False),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def pretrained_moe(request, tmp_path_factory):
    """``diffperc fit --config configs/quickstart/pretrain.yaml`` on a tiny ``t1-4E2A`` for 2 steps, then saved."""
    from diffperc.cli import DiffpercCLI

    root = tmp_path_factory.mktemp(f"pretrain_{request.param}")
    flags = {"name": "t1-4E2A", **MOE_TINY, **(DIT_MOE_FLAGS if request.param == "dit_moe" else {})}
    args = [arg for key, value in flags.items() for arg in (f"--model.init_args.backbone.{key}", str(value))]
    args += [
        "--model.init_args.image_size",
        "16",
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.train.init_args.resolution",
        "16",
        "--data.init_args.val.init_args.resolution",
        "16",
        "--trainer.max_steps",
        "2",
        "--trainer.logger.init_args.save_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
    ]
    torch.manual_seed(0)
    cli = DiffpercCLI(args=["fit", "--config", str(PRETRAIN_CONFIG), *args])
    assert cli.trainer.global_step == 2
    path = root / "moe.ckpt"
    cli.trainer.save_checkpoint(path)
    return request.param, cli.model, path


def test_moe_layout_flags_reach_the_pretraining_network_and_its_checkpoint(pretrained_moe):
    layout, module, path = pretrained_moe
    D, H, E, k = 32, 128, 4, 2
    moe = module.net.blocks[0].mlp
    routed, shared = (3 * D * H, 3 * D * 2 * D) if layout == "dit_moe" else (2 * D * H + H + D, 2 * D * H + H + D)
    expected = 55424 if layout == "dit_moe" else 41888  # router + 4 routed experts + the (fused) shared expert
    assert sum(p.numel() for p in moe.parameters()) == D * E + E * routed + shared == expected
    total, active = parameter_counts(module.net)
    assert total - active == (E - k) * routed
    assert {key: getattr(moe, key) for key in LAYOUTS[layout]} == LAYOUTS[layout]
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["diffperc"]["moe"] == dict(
        num_experts=E, experts_per_token=k, capacity_factor=None, balance_loss_coef=0.01, **LAYOUTS[layout]
    )
    assert checkpoint["diffperc"]["dit_config"]["hidden_size"] == D


@pytest.mark.filterwarnings("ignore:.*no `val_dataloader`.*")
@pytest.mark.parametrize(
    ("name", "upcycle"),
    [("t1-4E2A", None), ("t1", Upcycle(4, 2)), ("t1", None)],
    ids=["same_preset", "upcycle_flags", "dense_name"],
)
def test_pretrained_moe_initialises_finetuning_in_its_own_layout(pretrained_moe, name, upcycle, tmp_path):
    layout, _, path = pretrained_moe
    ema = {k.removeprefix("net."): v for k, v in torch.load(path, weights_only=True)["state_dict"].items()}
    # The backbone names no layout (or the default one): the checkpoint's experts, shared experts, expert type and
    # normalisation win.
    module = PerceptionFinetuning(
        task=DepthTask(),
        backbone=Backbone(name=name, **MOE_TINY),
        image_size=16,
        init_from=str(path),
        upcycle=upcycle,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
    )
    moe = module.net.blocks[0].mlp
    assert {key: getattr(moe, key) for key in LAYOUTS[layout]} == LAYOUTS[layout]
    assert (moe.num_experts, moe.experts_per_token) == (4, 2)
    first = "gate_proj" if layout == "dit_moe" else "fc1"
    state = module.net.state_dict()
    for key in (
        f"blocks.0.mlp.experts.1.{first}.weight",
        f"blocks.0.mlp.shared_experts.{first}.weight",
        "blocks.0.mlp.router.weight",
        "blocks.0.attn.qkv.weight",
    ):
        assert torch.equal(state[key], ema[key]), key

    # One training step: the balance loss trains the router.
    router = moe.router.weight.detach().clone()
    quiet_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path).fit(
        module, DataLoader(ProceduralDepth("train", 4, 16), batch_size=4)
    )
    assert module.trainer.global_step == 1
    assert (moe.router.weight - router).abs().max() > 1e-5


def test_finetuning_refuses_a_layout_that_contradicts_the_checkpoint(pretrained_moe):
    _, _, path = pretrained_moe
    for name, upcycle, flag in [
        ("t1-8E2A", None, "--model.backbone.name t1-8E2A"),
        ("t1", Upcycle(4, 1), "--model.upcycle.num_experts 4 --model.upcycle.top_k 1"),
    ]:
        with pytest.raises(ValueError, match=f"{re.escape(str(path))} is a mixture of experts with") as info:
            PerceptionFinetuning(
                task=DepthTask(),
                backbone=Backbone(name=name, **MOE_TINY),
                image_size=16,
                init_from=str(path),
                upcycle=upcycle,
            )
        assert flag in str(info.value)
