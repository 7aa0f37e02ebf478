"""Upcycles a dense checkpoint into a mixture-of-experts checkpoint that ``diffperc fit`` accepts as ``init_from``.

To run: ``diffperc upcycle --ckpt_path runs/quickstart_depth/checkpoints/last.ckpt --out moe.ckpt --num_experts 8
--top_k 2``, then ``diffperc fit --config configs/quickstart/depth.yaml --model.init_from moe.ckpt
--model.upcycle.num_experts 8 --model.upcycle.top_k 2`` (the command it prints).
"""

from pathlib import Path

import torch

from diffperc.models import moe_config, upcycle
from diffperc.models.build import network_from_checkpoint
from diffperc.models.pretrained import infer_moe_config, read_network_state
from diffperc.utils import atomic_write_bytes


def upcycle_checkpoint(
    src: str | Path,
    out: str | Path,
    num_experts: int,
    top_k: int,
    balance_loss_coef: float = 0.01,
    router_init_std: float = 0.02,
    seed: int = 0,
) -> Path:
    """Reads the dense network of ``src`` (EMA weights when present), upcycles it, and writes ``out`` atomically
    as a checkpoint holding ``state_dict`` (keys ``net.*``) and the ``diffperc`` metadata of fine-tuning runs.
    An existing ``out`` is never replaced (it may be ``src`` itself, or a run's ``last.ckpt``)."""
    src, out = Path(src), Path(out)
    if out.exists():
        raise FileExistsError(f"`--out` {out} exists: upcycle never replaces a file; name a new one")
    if infer_moe_config(read_network_state(src)) is not None:
        raise ValueError(f"`--ckpt_path` {src} is already a mixture of experts")
    found = network_from_checkpoint(src, "--ckpt_path")
    torch.manual_seed(seed)  # the router's initialisation
    moe = upcycle(found.net, num_experts, top_k, balance_loss_coef=balance_loss_coef, router_init_std=router_init_std)
    record = {
        "state_dict": {f"net.{k}": v.contiguous() for k, v in moe.state_dict().items()},
        "diffperc": {**found.record, "moe": moe_config(moe), "upcycled_from": str(src)},
        "hyper_parameters": found.hparams,
    }
    import io

    buf = io.BytesIO()
    torch.save(record, buf)
    return atomic_write_bytes(out, buf.getvalue())


def main(argv: list[str] | None = None) -> None:
    """``diffperc upcycle --ckpt_path DENSE --out MOE ...``; its flags are declared in ``diffperc.cli``."""
    from diffperc.cli import parse_command

    args = parse_command("upcycle", argv)
    if not 1 <= args.top_k <= args.num_experts:
        raise ValueError(f"`--top_k` must be in 1..`--num_experts` ({args.num_experts}), got {args.top_k}")
    path = upcycle_checkpoint(
        args.ckpt_path, args.out, args.num_experts, args.top_k, args.balance_loss_coef, args.router_init_std, args.seed
    )
    print(
        f"Wrote {path} ({args.num_experts} experts, top-{args.top_k}); fine-tune it with "
        f"`diffperc fit ... --model.init_from {path} --model.upcycle.num_experts {args.num_experts} "
        f"--model.upcycle.top_k {args.top_k}`"
    )


if __name__ == "__main__":
    main()
