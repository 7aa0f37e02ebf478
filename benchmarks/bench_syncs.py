"""Device-to-host syncs per training step and per sampling step, dense DiT vs mixture of experts.

To run: python benchmarks/bench_syncs.py [--quick | --tiny] [--out FILE.md]
Counted with ``diffperc.profiling.SyncCounter`` (works on CPU: it counts the reads that would sync on a GPU). A
training step is a real Lightning ``fit`` step with the recipe's callbacks (``NonFiniteGuard``, ``MACsCounter``,
``ExpertLoadLogger``, checkpointing, LR monitor, TensorBoard), from one ``on_train_batch_start`` to the next. The
network has DiT-XL/2's layout (28 blocks, so as many parameter tensors and MoE layers) at width 32, so it runs in
seconds; sync counts depend on the layout, not on the width.
"""

import os
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see OMP_NOTE in common.py

import torch  # noqa: E402
from common import Section, bench_main, md_table, mode_note  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from diffperc.codecs import PixelCodec  # noqa: E402
from diffperc.data import PerceptionDataModule, ProceduralDepth  # noqa: E402
from diffperc.diffusion import DiffusionSettings, InferenceSettings, sample_ensemble  # noqa: E402
from diffperc.lit import Backbone, ExponentialDecayLR, PerceptionFinetuning, Upcycle  # noqa: E402
from diffperc.profiling import StepSyncs, SyncCounter  # noqa: E402
from diffperc.tasks import DepthTask  # noqa: E402

# name -> MoE settings of the upcycled network (None: dense). Capacity 1.25 is the usual Switch Transformer value.
VARIANTS = {
    "dense": None,
    "MoE 8E2A, dropless": Upcycle(num_experts=8, top_k=2),
    "MoE 8E2A, capacity 1.25": Upcycle(num_experts=8, top_k=2, capacity_factor=1.25),
}
_DEPTH = {"full": 28, "quick": 28, "tiny": 2}
_MODE = {"quick": "the same counts as full: the steps are already tiny", "tiny": "2 blocks instead of 28"}


def build_module(depth: int, upcycle: Upcycle | None, nonfinite: str = "raise") -> PerceptionFinetuning:
    """A 16 px pixel-space depth model with ``depth`` blocks of width 32 (2 heads, patch 2), upcycled when asked."""
    torch.manual_seed(0)
    return PerceptionFinetuning(
        task=DepthTask(min_depth=0.1, max_depth=30.0),
        codec=PixelCodec(),
        backbone=Backbone(name="t1", hidden_size=32, depth=depth, num_heads=2, patch_size=2),
        image_size=16,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4),
        lr_scheduler=lambda optimizer: ExponentialDecayLR(optimizer, total_steps=100, warmup_steps=2),
        diffusion=DiffusionSettings(prediction_type="v_prediction"),
        inference=InferenceSettings(num_steps=2, ensemble_size=2),
        upcycle=upcycle,
        nonfinite=nonfinite,
    )


def count_training_steps(module: PerceptionFinetuning, steps: int, log_every: int, root: str) -> list[SyncCounter]:
    """Fits ``module`` for ``steps`` steps like the quickstart recipe (TensorBoard, checkpoints, LR monitor; no
    progress bar, loaders in this process) and returns the sync counter of each step."""
    counter = StepSyncs()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=log_every,
        logger=TensorBoardLogger(root, name="syncs"),
        callbacks=[
            counter,
            ModelCheckpoint(save_last=True, save_top_k=0, every_n_train_steps=1000),
            LearningRateMonitor(logging_interval="step"),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = PerceptionDataModule(train=ProceduralDepth("train", length=64, resolution=16), batch_size=2)
    trainer.fit(module, datamodule=data)
    return counter.per_step


def count_sampling(module: PerceptionFinetuning, num_steps: int) -> SyncCounter:
    """Syncs of ``sample_ensemble`` (2 members of 2 inputs, ``num_steps`` DDIM steps) under inference mode."""
    module.eval()
    cond = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(2, dtype=torch.long)
    settings = InferenceSettings(num_steps=num_steps, ensemble_size=2)
    with torch.inference_mode(), SyncCounter(device="cpu") as syncs:
        sample_ensemble(module.net, cond, y, module.sampler, settings, module.latent_channels)
    return syncs


def run(size: str = "full") -> Section:
    note = mode_note(size, _MODE.get(size, ""))
    depth = _DEPTH[size]
    rows, sites = [], []
    with tempfile.TemporaryDirectory(prefix="diffperc_syncs_") as root:
        for name, upcycle in VARIANTS.items():
            # Steps 0 and 1 warm up (MACsCounter measures a new batch shape once); step 2 is a plain step. A second
            # fit logging every step gives the count of a logging step.
            plain = count_training_steps(build_module(depth, upcycle), 3, 1000, root)[-1]
            logging = count_training_steps(build_module(depth, upcycle), 3, 1, root)[-1]
            one, two = count_sampling(build_module(depth, upcycle), 1), count_sampling(build_module(depth, upcycle), 2)
            rows.append([name, plain.total, logging.total, one.total, two.total])
            sites.append(
                f"- {name}, training step: " + "; ".join(f"{n} x {site}" for site, n in plain.by_site.most_common(4))
                or f"- {name}, training step: none"
            )
            sites.append(
                f"- {name}, sampling step: " + "; ".join(f"{n} x {site}" for site, n in two.by_site.most_common(3))
            )
    body = [
        f"{note}Syncs counted with `diffperc.profiling.SyncCounter` on CPU (the reads that block the host on a GPU). "
        f"Network: DiT-XL/2's layout ({depth} blocks) at width 32, 2 heads, patch 2, 16 px depth in pixel space, "
        "batch 2. Training step: a Lightning fit step with the recipe's callbacks (`NonFiniteGuard`, `MACsCounter`, "
        "`ExpertLoadLogger` for MoE, checkpointing, LR monitor, TensorBoard), counted from one "
        "`on_train_batch_start` to the next; the logging step logs every metric that step "
        "(`log_every_n_steps` 1). Sampling: `sample_ensemble` with 2 members x 2 inputs, 1 and 2 DDIM steps.",
        "",
        md_table(
            [
                "network",
                "syncs / training step",
                "syncs / logging step",
                "syncs / 1-step sampling",
                "syncs / 2-step sampling",
            ],
            rows,
        ),
        "",
        "Most frequent call sites:",
        "",
        *sites,
    ]
    return Section("(h) Host syncs per step", "\n".join(body))


if __name__ == "__main__":
    bench_main(lambda a: run(a.size), __doc__)
