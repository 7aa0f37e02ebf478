"""Prints what ``make demo`` produced: the test metrics of model and baseline, and where the predictions are.

To run: ``python -m diffperc.demo --config configs/quickstart/depth.yaml``.
"""

import argparse
import json
from pathlib import Path

import yaml


def run_dir(config: str) -> Path:
    """The run directory a config's TensorBoard logger writes to (save_dir / name / version)."""
    cfg = yaml.safe_load(Path(config).read_text())
    args = cfg.get("trainer", {}).get("logger", {}).get("init_args", {})
    version = args.get("version")
    version = "" if version in ("", None) else (version if isinstance(version, str) else f"version_{version}")
    return Path(args.get("save_dir", "lightning_logs")) / args.get("name", "") / version


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffperc.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    run = run_dir(args.config)
    metrics_file = run / "test_metrics.json"
    if not metrics_file.is_file():
        raise SystemExit(f"No {metrics_file}: run `diffperc test --config {args.config} --ckpt_path last` first")
    results = json.loads(metrics_file.read_text())
    names = sorted(k for k in results if not k.startswith("baseline/") and isinstance(results[k], float))
    print(f"\nTest metrics ({results.get('task')}, {metrics_file}):")
    print(f"  {'metric':<16}{'model':>10}{'baseline':>10}")
    for name in names:
        base = results.get(f"baseline/{name}")
        print(
            f"  {name:<16}{results[name]:>10.4f}{base:>10.4f}"
            if base is not None
            else f"  {name:<16}{results[name]:>10.4f}"
        )
    if "abs_rel" in results and "baseline/abs_rel" in results:
        print(f"  model AbsRel / baseline AbsRel = {results['abs_rel'] / results['baseline/abs_rel']:.3f}")
    predictions = run / "predictions"
    if predictions.is_dir():
        print(f"Predictions (PNG, 16-bit PNG, .npy): {predictions}/ ({len(list(predictions.glob('*.png')))} PNGs)")
    print(f"TensorBoard logs: tensorboard --logdir {run}")


if __name__ == "__main__":
    main()
