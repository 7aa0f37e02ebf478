"""Strategies on CPU: 2-process DDP and 2-process FSDP2 (``ModelParallelStrategy`` + ``fully_shard``, gloo) train a
tiny DiT to the same weights as one process with the same global batch, plus the parallel helpers on their own.

Each multi-process run is a ``torch.distributed.run`` subprocess of this file (its ``__main__``), so process groups
never leak between tests. By hand: ``python -m torch.distributed.run --nproc-per-node 2 tests/test_distributed.py
--strategy fsdp2 --out /tmp/w.pt``.
"""

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from diffperc.data import PerceptionDataModule, ProceduralClasses, ProceduralDepth
from diffperc.data.sampler import ResumableDataLoader, ResumableSampler
from diffperc.lit import Backbone, DiffusionPretraining, EMASettings, PerceptionFinetuning, SamplingSettings, Upcycle
from diffperc.lit.parallel import checkpoint_blocks, draw_noise_and_timesteps

from helpers import run_isolated, tiny_finetuning

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, STEPS, LR = 8, 3, 1e-3


def _module(activation_checkpointing: bool = False) -> PerceptionFinetuning:
    torch.manual_seed(0)  # identical initial weights in every process
    return tiny_finetuning(depth=2, lr=LR, activation_checkpointing=activation_checkpointing)


UNUSED_EXPERT = 3


def _moe_module() -> PerceptionFinetuning:
    """The tiny DiT upcycled to 4 experts, top-2, whose routers never send a token to expert 3."""
    torch.manual_seed(0)
    module = tiny_finetuning(depth=2, lr=LR, upcycle=Upcycle(num_experts=4, top_k=2, router_init_std=1.0))
    offset = torch.zeros(4)
    offset[UNUSED_EXPERT] = -1e4  # a logit no other expert's can lose to: expert 3 is never in a token's top 2
    for block in module.net.blocks:
        # A hook, not a new parameter: the network DDP wraps is exactly the upcycled one.
        block.mlp.router.register_forward_hook(lambda _, __, logits: logits + offset.to(logits))
    return module


def _pretraining_module() -> DiffusionPretraining:
    """A tiny class-conditional DiT without label dropout or EMA: its only randomness is the training noise."""
    torch.manual_seed(0)
    return DiffusionPretraining(
        backbone=Backbone(name="t1", depth=2, patch_size=2),
        image_size=16,
        class_dropout_prob=0.0,
        optimizer=lambda params: torch.optim.AdamW(params, lr=LR),
        ema=EMASettings(decay=None),
        sampling=SamplingSettings(num_samples=0, cfg_scale=None),
    )


def _fit(
    strategy: str,
    devices: int,
    out: Path,
    seed: int = 0,
    activation_checkpointing: bool = False,
    moe: bool = False,
    pretrain: bool = False,
) -> None:
    """Trains STEPS steps on a global batch of GLOBAL_BATCH and saves the full weights to ``out`` (rank 0)."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import ModelParallelStrategy

    if strategy == "fsdp2":
        # Pure data parallelism; one consolidated file so the weights compare directly.
        strategy = ModelParallelStrategy(
            data_parallel_size=devices, tensor_parallel_size=1, save_distributed_checkpoint=False
        )
    data = ProceduralClasses("train", 64, 16) if pretrain else ProceduralDepth("train", 64, 16)
    dm = PerceptionDataModule(train=data, batch_size=GLOBAL_BATCH // devices, seed=seed)
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=out.parent,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 cores: one thread per process, and the same kernels in every run
    try:
        module = _pretraining_module() if pretrain else _moe_module() if moe else _module(activation_checkpointing)
        trainer.fit(module, datamodule=dm)
        trainer.save_checkpoint(out)
    finally:
        torch.set_num_threads(threads)


def _net_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("net.")}


def _torchrun(strategy: str, out: Path, extra: tuple = ()) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(Path(__file__)),
        "--strategy",
        strategy,
        "--out",
        str(out),
        *extra,
    ]
    start = time.perf_counter()
    result = run_isolated(cmd, out.parent, env, timeout=240)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}"
    return time.perf_counter() - start


def _assert_same_weights(a: dict, b: dict) -> None:
    # Same samples, same noise, same initial weights: only the summation order of the gradient differs (two halves
    # of the batch reduced across processes vs one batch of 8), ~1e-7 relative. Through Adam's normalised update
    # (lr 1e-3, eps 1e-8) over 3 steps that stays ~1e-8 (measured: 1.5e-8 for DDP and FSDP2); 1e-6 leaves room for
    # other CPUs' kernels and is still 5000x below the 5e-3 a different data order causes (the control test below).
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


@pytest.fixture(scope="module")
def single_process_weights(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("single") / "weights.ckpt"
    _fit("auto", 1, out)
    return _net_state(out)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[str, Path]:
    """One 2-process torchrun (start-up is most of its cost) fits with DDP the dense DiT, the MoE with an idle expert
    and the pretraining DiT, then the dense DiT again with FSDP2 and activation checkpointing."""
    folder = tmp_path_factory.mktemp("ddp")
    runs = {name: folder / f"{name}.ckpt" for name in ("dense", "moe", "pretrain", "fsdp2")}
    extra = ("--moe-out", runs["moe"], "--pretrain-out", runs["pretrain"], "--fsdp2-out", runs["fsdp2"])
    seconds = _torchrun("ddp", runs["dense"], tuple(map(str, extra)))
    print(f"2-process DDP (dense, MoE, pretraining) and FSDP2 on CPU: {seconds:.1f} s for 4 x {STEPS} steps")
    return runs


def test_ddp_pretraining_draws_different_noise_on_each_rank(ddp_runs, tmp_path):
    # Each rank draws its own rows of the global batch's noise (``training_noise``), so two processes with batch 4
    # train exactly what one process with batch 8 does. Drawn from the global RNG, seeded alike on every rank, the
    # two ranks would repeat one noise tensor over different images and land elsewhere (the control below).
    _fit("auto", 1, tmp_path / "single.ckpt", pretrain=True)
    _assert_same_weights(_net_state(ddp_runs["pretrain"]), _net_state(tmp_path / "single.ckpt"))
    x0 = torch.zeros(4, 3, 8, 8)
    rank0, _ = draw_noise_and_timesteps(x0, 1000, seed=0, step=0, rank=0, world_size=2)
    rank1, _ = draw_noise_and_timesteps(x0, 1000, seed=0, step=0, rank=1, world_size=2)
    assert (rank0 - rank1).abs().min() > 0  # no element shared


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(ddp_runs, single_process_weights):
    ddp = _net_state(ddp_runs["dense"])
    _assert_same_weights(ddp, single_process_weights)
    init = _module().state_dict()
    moved = max((ddp[k] - init[k]).abs().max().item() for k in ddp)
    assert moved > 1e-3  # training really happened


@pytest.mark.slow
def test_plain_ddp_trains_an_moe_whose_expert_gets_no_token(ddp_runs):
    # Plain DDP (find_unused_parameters=False, as configs/depth_xl_8e2a.yaml runs) raises at the second step if a
    # parameter got no gradient in the first; an expert that no token chose gets an exact zero gradient instead.
    ddp = _net_state(ddp_runs["moe"])
    init = _moe_module().state_dict()
    idle = [k for k in ddp if f".mlp.experts.{UNUSED_EXPERT}." in k]
    assert len(idle) == 2 * 4  # 2 blocks x (fc1, fc2) x (weight, bias)
    for key in idle:
        # Zero gradient, so Adam's step is exactly zero; AdamW's decoupled weight decay (lr 1e-3 x 0.01) still
        # scales the weights each step, which it would not do to a parameter without a gradient.
        decayed = init[key] * (1 - LR * 0.01) ** STEPS
        torch.testing.assert_close(ddp[key], decayed, rtol=1e-6, atol=0, msg=key)
        assert not torch.equal(ddp[key], init[key]) or not init[key].any(), key
    used = [k for k in ddp if ".mlp.experts.0." in k]
    assert max((ddp[k] - init[k]).abs().max().item() for k in used) > 1e-4  # the other experts trained


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_process(ddp_runs, single_process_weights):
    _assert_same_weights(_net_state(ddp_runs["fsdp2"]), single_process_weights)


@pytest.mark.slow
def test_ddp_tolerance_would_catch_another_data_order(tmp_path, single_process_weights):
    out = tmp_path / "other_seed.ckpt"
    _fit("auto", 1, out, seed=1)
    other = _net_state(out)
    worst = max((other[k] - single_process_weights[k]).abs().max().item() for k in other)
    assert worst > 1e-3, worst


@pytest.mark.slow
def test_step_seeded_noise_resumes_exactly_without_rng_state(tmp_path):
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    def trainer(max_steps: int, *callbacks) -> Trainer:
        return Trainer(
            accelerator="cpu",
            max_steps=max_steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            default_root_dir=tmp_path,
            callbacks=list(callbacks),
            enable_checkpointing=bool(callbacks),
        )

    dm = lambda: PerceptionDataModule(train=ProceduralDepth("train", 12, 16), batch_size=4)  # noqa: E731
    straight = _module()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer(5, saver).fit(straight, datamodule=dm())
    torch.manual_seed(123)  # the global RNG differs after the "crash": the noise must not depend on it
    resumed = _module()
    trainer(5).fit(resumed, datamodule=dm(), ckpt_path=tmp_path / "ckpt" / "step=2.ckpt")  # mid-epoch 1 of 3 batches
    for key, value in straight.net.state_dict().items():
        torch.testing.assert_close(resumed.net.state_dict()[key], value, rtol=0, atol=0, msg=key)


def _strategy_from_config(name: str):
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    trainer = yaml.safe_load((ROOT / "configs" / "trainer" / name).read_text())["trainer"]
    return parser.instantiate(parser.parse_object({"strategy": trainer["strategy"]})).strategy, trainer


def test_strategy_configs_build_what_they_promise():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    from diffperc.models.dit import DiTBlock

    fsdp, trainer = _strategy_from_config("fsdp.yaml")
    assert isinstance(fsdp, FSDPStrategy) and fsdp._state_dict_type == "full" and trainer["precision"] == "bf16-mixed"
    assert fsdp.kwargs["auto_wrap_policy"]._module_classes == {DiTBlock}
    assert fsdp._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {DiTBlock}
    fsdp2, trainer = _strategy_from_config("fsdp2.yaml")
    assert isinstance(fsdp2, ModelParallelStrategy) and not fsdp2._save_distributed_checkpoint
    assert fsdp2._data_parallel_size == trainer["devices"] and fsdp2._tensor_parallel_size == 1
    ddp, _ = _strategy_from_config("ddp.yaml")
    assert isinstance(ddp, DDPStrategy) and ddp._ddp_kwargs["find_unused_parameters"] is False
    assert ddp._ddp_kwargs["gradient_as_bucket_view"] is True


def test_draw_noise_rank_shares_tile_the_global_draw():
    x0 = torch.zeros(3, 2, 4, 4)
    full_noise, full_t = draw_noise_and_timesteps(torch.zeros(6, 2, 4, 4), 1000, seed=5, step=7)
    shares = [draw_noise_and_timesteps(x0, 1000, seed=5, step=7, rank=r, world_size=2) for r in range(2)]
    torch.testing.assert_close(shares[0][0], full_noise[0::2], rtol=0, atol=0)
    torch.testing.assert_close(shares[1][1], full_t[1::2], rtol=0, atol=0)
    assert not torch.equal(shares[0][0], shares[1][0])  # ranks never repeat each other's noise
    again, _ = draw_noise_and_timesteps(x0, 1000, seed=5, step=8, rank=0, world_size=2)
    assert not torch.equal(again, shares[0][0])  # the next step draws new noise


def test_sampler_shards_tile_the_single_process_batches():
    data = list(range(20))
    one = ResumableDataLoader(data, ResumableSampler(data, 1, 0, seed=3), batch_size=4)
    two = [ResumableDataLoader(data, ResumableSampler(data, 2, r, seed=3), batch_size=2) for r in range(2)]
    for batch, b0, b1 in zip(one, *two):
        assert sorted(batch.tolist()) == sorted(b0.tolist() + b1.tolist())
        assert batch[0::2].tolist() == b0.tolist() and batch[1::2].tolist() == b1.tolist()


def test_checkpoint_blocks_keeps_names_values_and_gradients():
    module = _module()
    reference = copy.deepcopy(module.net)
    assert checkpoint_blocks(module.net) == 2 and checkpoint_blocks(module.net) == 0
    assert list(module.net.state_dict()) == list(reference.state_dict())
    x, t, y = torch.randn(2, 6, 16, 16), torch.tensor([3, 500]), torch.zeros(2, dtype=torch.long)
    for net in (module.net, reference):
        net.blocks[0].adaLN_modulation[-1].weight.data.normal_(generator=torch.Generator().manual_seed(0))
        net(x, t, y).square().mean().backward()
    torch.testing.assert_close(module.net.blocks[0].attn.qkv.weight.grad, reference.blocks[0].attn.qkv.weight.grad)
    ema = copy.deepcopy(module.net)  # an EMA copy must run its own weights, not the original's
    ema.blocks[0].mlp.fc2.bias.data.add_(1.0)
    h, c = torch.randn(2, 64, 32, requires_grad=True), torch.randn(2, 32)  # grad on: the checkpointed path
    diff = ema.blocks[0](h, c) - module.net.blocks[0](h, c)
    gate = module.net.blocks[0].adaLN_modulation(c).chunk(6, dim=1)[5]  # the MLP branch is scaled by gate_mlp
    torch.testing.assert_close(diff, gate.unsqueeze(1).expand_as(diff))


def _main() -> None:
    parser = argparse.ArgumentParser(description="one process of a distributed test run (launched by torchrun)")
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--moe-out", type=Path, help="then also fit the upcycled tiny DiT whose expert 3 gets no token")
    parser.add_argument("--pretrain-out", type=Path, help="then also fit a tiny class-conditional pretraining DiT")
    parser.add_argument("--fsdp2-out", type=Path, help="then also fit the dense DiT with FSDP2 and checkpointing")
    args = parser.parse_args()
    start = time.perf_counter()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _fit(args.strategy, world, args.out, activation_checkpointing=args.activation_checkpointing)
    if args.moe_out:  # a second Trainer in the same process group
        _fit(args.strategy, world, args.moe_out, moe=True)
    if args.pretrain_out:
        _fit(args.strategy, world, args.pretrain_out, pretrain=True)
    if args.fsdp2_out:  # FSDP2 builds its device mesh over the process group DDP started
        _fit("fsdp2", world, args.fsdp2_out, activation_checkpointing=True)
    if os.environ.get("RANK", "0") == "0":
        print(f"{args.strategy}: Trainer.fit + save {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    _main()
