"""Exports a trained network to safetensors plus a JSON of what rebuilds it, and loads such an export back.

To run: ``diffperc export --ckpt runs/quickstart_depth/checkpoints/last.ckpt --out depth_t2.safetensors``
"""

import argparse
from pathlib import Path

from safetensors.torch import save_file

from diffperc.models import DiT, load_pretrained
from diffperc.models.build import network_from_checkpoint
from diffperc.models.pretrained import load_weights_only
from diffperc.utils import atomic_write_bytes, atomic_write_json

FORMAT_VERSION = 1


def export_checkpoint(ckpt: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Writes ``out`` (safetensors, the network's tensors; EMA weights when the checkpoint has them) and
    ``out`` with suffix ``.json`` (DiT config, MoE settings, task and run metadata). Both atomically."""
    ckpt, out = Path(ckpt), Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"`--out` must end in .safetensors, got {out}")
    found = network_from_checkpoint(ckpt, "--ckpt")  # proves the record rebuilds this network
    raw = load_weights_only(ckpt) if ckpt.suffix != ".safetensors" else {}
    model = found.net
    record = {
        "format_version": FORMAT_VERSION,
        **found.record,
        "hyper_parameters": found.hparams,
        "source": str(ckpt),
        "global_step": raw.get("global_step") if isinstance(raw, dict) else None,
    }
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "diffperc", "format_version": str(FORMAT_VERSION)})
    atomic_write_bytes(out, tmp.read_bytes())
    tmp.unlink()
    meta_path = atomic_write_json(out.with_suffix(".json"), record)
    return out, meta_path


def load_exported(path: str | Path) -> DiT:
    """Rebuilds the network of an export (``.safetensors`` + its ``.json``) and loads its weights strictly."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: an export is a .safetensors file plus its .json")
    return network_from_checkpoint(path, "load_exported").net


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="diffperc export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ckpt", required=True, help="a diffperc Lightning checkpoint (e.g. run/checkpoints/last.ckpt)"
    )
    parser.add_argument("--out", required=True, help="output .safetensors path (a .json is written beside it)")
    args = parser.parse_args(argv)
    weights, meta = export_checkpoint(args.ckpt, args.out)
    print(f"Wrote {weights} and {meta}")


__all__ = ["export_checkpoint", "load_exported", "load_pretrained"]
