"""Safe loading: checkpoints are only ever read with ``weights_only=True``, a malicious pickle is refused on every path
a user can hand one in (``--ckpt_path``, ``--model.init_from``, ``diffperc export``) without running its code,
exports are safetensors, and nothing passes values through a shell."""

import ast
import json
import pathlib
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from diffperc.checkpoint_io import AtomicCheckpointIO
from diffperc.cli import DiffpercCLI
from diffperc.export import export_checkpoint
from diffperc.lit import PerceptionFinetuning
from diffperc.tasks import DepthTask

from helpers import tiny_backbone, tiny_finetuning

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "diffperc"
QUICKSTART = ROOT / "configs" / "quickstart" / "depth.yaml"


class _Payload:
    """Unpickling this creates a file: stands in for any code an attacker would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _tiny_module() -> PerceptionFinetuning:
    return tiny_finetuning(task=DepthTask())


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """A checkpoint that looks like a diffperc one but runs code when unpickled, and the marker that code creates."""
    marker = tmp_path / "pwned"
    state = {f"net.{k}": v for k, v in _tiny_module().net.state_dict().items()}
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": state, "global_step": 1, "hyper_parameters": {}, "extra": _Payload(marker)}, path)
    return path, marker


def test_malicious_checkpoint_carries_a_payload_that_runs_code(evil):
    # Proves the fixture has teeth, without ever unpickling the checkpoint unsafely: its pickle record calls the
    # payload's global, and unpickling that payload creates the marker. The refusals below keep the marker away.
    path, marker = evil
    with zipfile.ZipFile(path) as archive:
        record = archive.read(next(name for name in archive.namelist() if name.endswith("/data.pkl")))
    assert b"touch" in record
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


def test_tests_and_benchmarks_load_checkpoints_weights_only_too():
    offenders = []
    for file in sorted([*(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("torch.load"):
                value = {k.arg: k.value for k in node.keywords}.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    offenders.append(f"{file.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_every_checkpoint_load_in_the_package_is_weights_only():
    offenders = []
    for file in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            kwargs = {k.arg: k.value for k in node.keywords}
            where = f"{file.relative_to(ROOT)}:{node.lineno} {name}"
            if name.endswith("torch.load") or name == "load_state_dict_from_url":
                value = kwargs.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    offenders.append(f"{where} without weights_only=True")
            elif name in ("np.load", "numpy.load"):
                value = kwargs.get("allow_pickle")
                if not (isinstance(value, ast.Constant) and value.value is False):
                    offenders.append(f"{where} without allow_pickle=False")
            elif name in ("pickle.load", "pickle.loads", "os.system", "os.popen", "eval", "exec"):
                offenders.append(where)
            elif "shell" in kwargs and not (isinstance(kwargs["shell"], ast.Constant) and not kwargs["shell"].value):
                offenders.append(f"{where} with shell=")  # sweep values must never pass through a shell
    assert not offenders, offenders


def test_ckpt_path_malicious_checkpoint_is_refused_by_diffperc_test(evil, tmp_path):
    path, marker = evil
    args = ["test", "--config", str(QUICKSTART), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--ckpt_path", str(path)]
    with pytest.raises(ValueError, match=r"Refusing to load .*evil\.ckpt.*could run code"):
        DiffpercCLI(args=args)  # the CLI's checkpoint plugin loads weights-only and names the file
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_ckpt_path_malicious_checkpoint_is_refused_by_the_checkpoint_plugin(evil, tmp_path):
    path, marker = evil
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, plugins=[AtomicCheckpointIO()],
                      default_root_dir=tmp_path, limit_test_batches=1)
    with pytest.raises(ValueError, match=r"Refusing to load .*evil\.ckpt.*Unsupported global"):
        trainer.test(_tiny_module(), dataloaders=[], ckpt_path=path)
    assert not marker.exists()


def test_init_from_malicious_checkpoint_is_refused(evil):
    path, marker = evil
    with pytest.raises(ValueError, match=r"evil\.ckpt: torch\.load\(weights_only=True\) could not read it"):
        PerceptionFinetuning(task=DepthTask(), image_size=16, init_from=str(path),
                             backbone=tiny_backbone())
    assert not marker.exists()


def test_export_of_malicious_checkpoint_is_refused_and_writes_nothing(evil, tmp_path):
    path, marker = evil
    out = tmp_path / "exported.safetensors"
    with pytest.raises(ValueError, match=r"evil\.ckpt: torch\.load\(weights_only=True\)"):
        export_checkpoint(path, out)
    assert not marker.exists() and not out.exists() and not out.with_suffix(".json").exists()


def test_export_writes_safetensors_not_a_pickle(tmp_path):
    module = _tiny_module()
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in module.net.state_dict().items()}, "global_step": 3,
                "hyper_parameters": {}, "diffperc": {"dit_config": module.net.config, "moe": None, "task": "depth"}},
               ckpt)
    weights, _ = export_checkpoint(ckpt, tmp_path / "depth.safetensors")
    raw = weights.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header size, JSON header, raw tensor bytes
    header = json.loads(raw[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == "diffperc"
    assert header["x_embedder.proj.weight"] == {"dtype": "F32", "shape": [32, 6, 2, 2],
                                                "data_offsets": header["x_embedder.proj.weight"]["data_offsets"]}
    assert raw[:1] != b"\x80" and raw[:2] != b"PK"  # neither a pickle nor a torch zip archive
