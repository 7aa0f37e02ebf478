"""Every command in the README's shell blocks is part of the interface: each one runs here, through the real CLI,
with tiny overrides (shrunk configs from ``tiny_runs``, the toy runs of the recipes it names, smaller test-time
grids), and its documented outputs are checked. A README command without a runner below fails the inventory test.
"""

import contextlib
import io
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from diffperc.cli import main

import tiny_runs

ROOT = Path(__file__).resolve().parents[1]

#: README commands that cannot run on this machine, with the reason; everything else runs below.
CANNOT_RUN = {
    "make test": "it is this suite (CI runs it through .ci/run)",
    "make reproduce-tiny": "runs nine sweeps under two recipes and three seeds for about an hour; test_e2e_sweeps runs "
    "every tiny sweep's points and tests/scaling/test_reproduce.py its rules",
}


def readme_commands() -> list[str]:
    """The commands of the README's ```bash blocks, continuation lines joined and comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s+)#.*$", "", line).strip()
            if line:
                commands.append(" ".join(line.split()))
    return commands


def _quiet(*args) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main([str(a) for a in args])
    return out.getvalue()


class _Runner:
    """Translates one README command to its tiny equivalent, runs it and checks what the README says it writes."""

    def __init__(self, recipes, tmp: Path):
        self.recipes, self.tmp = recipes, tmp

    def _configs(self, argv: list[str], flag: str = "--config") -> tuple[list[str], list[str]]:
        configs = [argv[i + 1] for i, a in enumerate(argv) if a == flag]
        rest = [a for i, a in enumerate(argv) if a != flag and (i == 0 or argv[i - 1] != flag)]
        return configs, rest

    def _recipe(self, configs: list[str]) -> tuple[Path, Path]:
        # `--config base --config override` is how an override file is used: its `# base:` line names the base.
        last = configs[-1]
        if [str(ROOT / c) for c in configs] == tiny_runs.config_args(ROOT / last)[1::2]:
            return self.recipes.fit(last)
        return self.recipes.fit(configs[0], *configs[1:])

    def _translate(self, args: list[str], task: str = "depth") -> list[str]:
        out = []
        for arg in args:
            if arg.startswith("runs/"):
                arg = str(self.recipes.stand_in(arg))
            elif arg == "path/to/folder":
                arg = str(self.recipes.assets.images[task])
            elif arg.startswith("data/latents/"):  # what the README's `cache-latents` line wrote
                arg = str(self._latents("configs/pretrain/base.yaml"))
            out.append(arg)
        return out

    def _latents(self, config: str) -> Path:
        """``diffperc cache-latents`` of the toy ``config``: 4 images into ``<tmp>/latents``."""
        out = self.tmp / "latents"
        if not out.is_dir():
            path, _ = self.recipes.config(config)
            main(["cache-latents", "--base", str(path), "--out", str(out), "--num_workers", "0", "--limit", "4"])
        return out

    def diffperc(self, argv: list[str]) -> None:
        sub = argv[0]
        if sub in ("fit", "test", "validate", "predict"):
            return self.lightning(argv)
        getattr(self, sub.replace("-", "_"))(argv[1:])

    def lightning(self, argv: list[str]) -> None:
        sub, (configs, rest) = argv[0], self._configs(argv[1:])
        if "--print_config" in rest:
            printed = yaml.safe_load(_quiet(sub, *tiny_runs.config_args(ROOT / configs[-1]), "--print_config"))
            assert printed["model"]["class_path"].startswith("diffperc.") and printed["trainer"]["max_steps"] > 0
            return
        path, run = self._recipe(configs)
        if sub == "fit" and not rest:  # the recipe's toy fit itself
            assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
            assert (run / "train_macs.json").is_file() and list(run.glob("events.out.tfevents.*"))
            return
        if sub == "fit":  # the same recipe with other values: its own run folder
            save_dir = self.tmp / "runs"
            tiny_runs.cli(
                "fit", "--config", path, *self._translate(rest), "--trainer.logger.init_args.save_dir", save_dir
            )
            assert (save_dir / run.name / "checkpoints" / "last.ckpt").is_file()
            return
        flag = "--model.init_args.predict_task"
        task = rest[rest.index(flag) + 1] if flag in rest else "depth"
        rest = [a.replace("--data.images", "--data.init_args.images") for a in rest]
        tiny_runs.cli(sub, "--config", path, *self._translate(rest, task))
        if sub == "test":
            record = tiny_runs.read_metrics(run / "test_metrics.json")
            assert any(k.endswith("compute/test_macs_per_sample") for k in record), sorted(record)
            if "--model.inference.num_steps" in rest:
                assert record["inference"]["num_steps"] == int(rest[rest.index("--model.inference.num_steps") + 1])
        elif sub == "predict" and "--data.init_args.images" in rest:
            tiny_runs.check_predictions(run / "predictions", task)
        elif sub == "predict":  # the test split of the task
            suffix = {"depth": "_depth.npy", "flow": "_flow.flo", "amodal": "_mask.png"}[task]
            assert list((run / "predictions").glob(f"*{suffix}")), sorted((run / "predictions").iterdir())

    def models(self, args: list[str]) -> None:
        # Three presets, dense and MoE (the whole table builds every preset on the meta device: seconds, not needed).
        table = _quiet("models", *(args or ["t1", "a1", "DiT-S/2-8E2A"]))
        assert "| t1 " in table and "| a1 " in table and "| DiT-S/2-8E2A " in table, table

    def cache_latents(self, args: list[str]) -> None:
        assert (self._latents(args[args.index("--base") + 1]) / "manifest.json").is_file()

    def upcycle(self, args: list[str]) -> None:
        args = self._translate(args)
        out = self.tmp / args[args.index("--out") + 1]
        args[args.index("--out") + 1] = str(out)
        main(["upcycle", *args])
        state = torch.load(out, map_location="cpu", weights_only=True)
        keys = state.get("state_dict", state)
        num_experts = int(args[args.index("--num_experts") + 1])
        assert any(f".mlp.experts.{num_experts - 1}." in k for k in keys), sorted(keys)[:5]

    def export(self, args: list[str]) -> None:
        from diffperc import PerceptionPipeline

        args = self._translate(args)
        out = self.tmp / args[args.index("--out") + 1]
        args[args.index("--out") + 1] = str(out)
        main(["export", *args])
        assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
        net = PerceptionPipeline.from_pretrained(str(out)).net
        state = torch.load(args[args.index("--ckpt_path") + 1], map_location="cpu", weights_only=True)["state_dict"]
        for key, value in net.state_dict().items():  # the exported network is the checkpoint's, tensor for tensor
            torch.testing.assert_close(value.cpu(), state[f"net.{key}"], rtol=0, atol=0)

    def download(self, args: list[str]) -> None:
        # Offline: an official release is served from a local file (a tiny DiT in the official layout), a Hub id from
        # a tiny Hugging Face cache holding that repository; the command prints the flags that use what it fetched.
        from test_download import _tiny_pipeline_in_cache

        from diffperc import hub

        from helpers import tiny_dit

        mp, name = self.monkeypatch, args[0]
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HUB_CACHE", str(self.tmp / "hf_cache"))
        mp.setenv("XDG_CACHE_HOME", str(self.tmp / "xdg"))
        mp.delenv("HF_HOME", raising=False)
        if name in hub.OFFICIAL:
            release = hub.OFFICIAL[name]
            served = self.tmp / "served" / release.filename
            served.parent.mkdir(exist_ok=True)
            torch.save(tiny_dit(num_classes=1000, learn_sigma=True).state_dict(), served)
            mp.setitem(hub.OFFICIAL, name, hub.Release(release.filename, served.as_uri(), None))
        else:
            _tiny_pipeline_in_cache(self.tmp, repo=name)
        out = _quiet("download", *args)
        path = Path(out.splitlines()[0].split(" ", 1)[1])
        assert out.startswith("--model.init_args.init_from ") and path.exists(), out
        if name in hub.OFFICIAL:  # into --out, else the cache folder; loadable as init_from
            folder = self.tmp / args[args.index("--out") + 1] if "--out" in args else self.tmp / "xdg" / "diffperc"
            assert (self.tmp / path).resolve() == (folder / hub.OFFICIAL[name].filename).resolve(), out
            assert "blocks.0.attn.qkv.weight" in torch.load(self.tmp / path, weights_only=True)

    def sweep(self, args: list[str]) -> None:
        action, rest = args[0], args[1:]
        if action == "tts":  # a 2 x 2 grid instead of 5 x 3 on the toy checkpoint
            rest = self._translate(rest)
            configs, rest = self._configs(rest, "--base")
            path, _ = self._recipe(configs)
            rest = re.sub(r"--steps [\d ]+", "--steps 1 2 ", " ".join(rest))
            rest = re.sub(r"--ensemble [\d ]+", "--ensemble 1 2 ", rest).split()
            out = self.tmp / "tts"
            main(["sweep", "tts", "--base", str(path), *rest, "--out", str(out)])
            assert (out / "results.jsonl").is_file() and (out / "report" / "report.md").is_file()
            return
        sweep_file, rest = str(ROOT / rest[0]), rest[1:]
        out = self.tmp / "sweeps" / Path(sweep_file).stem
        if "--dry_run" in rest:
            printed = _quiet("sweep", action, sweep_file, *rest, "--out", out)
            assert printed.count("diffperc fit") >= 2 and printed.count("diffperc test") >= 2, printed
        elif "--launcher" in rest and rest[rest.index("--launcher") + 1] == "slurm":
            rest = [a for a in rest if a != "--submit"]  # sbatch exists only on a SLURM cluster
            main(["sweep", action, sweep_file, *rest, "--out", str(out)])
            script = (out / "sweep.sbatch").read_text()
            assert "#SBATCH" in script and "diffperc" in script
        elif action == "report":
            shutil.rmtree(out, ignore_errors=True)
            main(["sweep", "run", sweep_file, "--launcher", "slurm", "--out", str(out)])
            main(["sweep", "report", sweep_file, "--out", str(out)])  # nothing finished yet: an empty report
            assert (out / "report" / "report.md").is_file()

    def laws(self, args: list[str]) -> None:
        # The README plans from the tiny model-size sweep and the tiny test-time sweep: run both tiny first.
        reports = {}
        for flag in ("--train_report", "--tts_report"):
            name = Path(args[args.index(flag) + 1]).name
            reports[flag] = _run_tiny_sweep(self.recipes, ROOT / "sweeps" / "tiny" / f"{name}.yaml")
        for flag, out in reports.items():
            args[args.index(flag) + 1] = str(out)
        printed = _quiet("laws", *args)
        assert "steps" in printed.lower() or "ensemble" in printed.lower(), printed

    def make(self, args: list[str]) -> None:
        target = args[0]
        recipe = _make_recipe(target)
        if target == "demo":
            for line in recipe:  # the same commands, each run by its own runner
                argv = shlex.split(line.replace("$(PY) -m diffperc ", "").replace("$(CONFIG)", _CONFIG))
                if argv[:2] == ["$(PY)", "-m"]:  # python -m diffperc.demo
                    path, _ = self.recipes.fit(_CONFIG)
                    printed = io.StringIO()
                    with contextlib.redirect_stdout(printed):
                        __import__("diffperc.demo", fromlist=["main"]).main(["--config", str(path)])
                    assert "abs_rel" in printed.getvalue()
                else:
                    self.diffperc(argv)
        elif target.startswith("sweep"):
            assert recipe == ["$(PY) -m diffperc sweep run $(SWEEP)"], recipe
            sweep_file = target.split("=", 1)[1] if "=" in target else args[1].split("=", 1)[1]
            out = _run_tiny_sweep(self.recipes, ROOT / sweep_file)
            assert (out / "report" / "report.md").is_file()


_CONFIG = "configs/quickstart/depth.yaml"


def _make_recipe(target: str) -> list[str]:
    """The command lines of a Makefile target (without the install prerequisite)."""
    text = (ROOT / "Makefile").read_text()
    match = re.search(rf"^{target.split()[0]}:.*\n((?:\t.*\n)+)", text, re.M)
    assert match, f"no Makefile target {target}"
    return [line.strip() for line in match.group(1).splitlines()]


_TINY_SWEEPS: dict[Path, Path] = {}


def _run_tiny_sweep(recipes, sweep_file: Path) -> Path:
    """``diffperc sweep run`` on ``sweep_file`` with 2 training steps, 3 points and toy test sets (once a session)."""
    if sweep_file in _TINY_SWEEPS:
        return _TINY_SWEEPS[sweep_file]
    spec = yaml.safe_load(sweep_file.read_text())
    spec["base"] = [str(ROOT / b) for b in ([spec["base"]] if isinstance(spec["base"], str) else spec["base"])]
    tiny = {
        "trainer.max_steps": 2,
        "data.init_args.batch_size": 2,
        "data.init_args.num_workers": 0,
        "data.init_args.train.init_args.length": 8,
        "data.init_args.test.init_args.length": 4,
        "data.init_args.val.init_args.length": 4,
        "trainer.limit_val_batches": 0,
    }
    spec.setdefault("set", {}).update(tiny)
    if "from" in spec:  # the upstream stage (a fit) shrinks the same way
        upstream = spec["from"]
        upstream["base"] = [str(ROOT / b) for b in upstream["base"]]
        upstream.setdefault("set", {}).update(tiny)
    if spec.get("checkpoint"):
        spec["checkpoint"] = str(recipes.stand_in(spec["checkpoint"]))
    for name, values in (spec.get("grid") or {}).items():
        spec["grid"][name] = values[:3]
    if "points" in spec:
        spec["points"] = spec["points"][:3]
    folder = recipes.folder / "tiny_sweeps"
    folder.mkdir(exist_ok=True)
    path = folder / f"{sweep_file.stem}.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = folder / sweep_file.stem
    main(["sweep", "run", str(path), "--out", str(out), "--launcher", "inline"])
    _TINY_SWEEPS[sweep_file] = out
    return out


def test_every_readme_command_has_a_runner():
    commands = readme_commands()
    assert "diffperc fit --config configs/quickstart/depth.yaml" in commands
    runnable = {c.split()[0] for c in commands if c not in CANNOT_RUN}
    assert runnable <= {"diffperc", "make"}, runnable
    assert set(CANNOT_RUN) <= set(commands), "a CANNOT_RUN entry is no longer in the README"


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in readme_commands() if c not in CANNOT_RUN])
def test_readme_command_runs(command, recipes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a command writes by a relative path lands here
    runner = _Runner(recipes, tmp_path)
    runner.monkeypatch = monkeypatch
    argv = shlex.split(command)
    getattr(runner, argv[0])(argv[1:])


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.slow
def test_readme_python_blocks_run(recipes, tmp_path, monkeypatch):
    # The Python examples run as written, on the toy quickstart run exported where the README's export puts it.
    import cv2
    import numpy as np

    monkeypatch.chdir(tmp_path)
    _, run = recipes.fit("configs/quickstart/depth.yaml")
    main(["export", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--out", "exports/quickstart_depth"])
    cv2.imwrite("room.jpg", np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    blocks = readme_python_blocks()
    assert blocks and any("PerceptionPipeline.from_pretrained" in b for b in blocks)
    for block in blocks:
        scope: dict = {}
        exec(compile(block, "README.md", "exec"), scope)
        if "out" in scope:  # the pipeline's answer, at the input's size
            assert scope["out"].prediction.shape == (40, 56) and scope["out"].prediction.dtype == np.float32
