"""Files the project writes get the permissions of a plain new file, ``0666 & ~umask``: atomic writes go through a
``mkstemp`` temporary file, which would otherwise leave checkpoints, metrics and predictions readable by their owner
only (0600)."""

import os
import stat

import pytest
import torch

from diffperc.checkpoint_io import AtomicCheckpointIO
from diffperc.tasks import DepthTask
from diffperc.utils import append_jsonl, atomic_write_json, atomic_write_text


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_checkpoint_metrics_and_predictions_honour_the_umask(umask, tmp_path):
    expected = {0o022: 0o644, 0o027: 0o640}[umask]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(3.0)}, "global_step": 3}, ckpt)
    metrics = atomic_write_json(tmp_path / "run" / "test_metrics.json", {"task": "depth", "abs_rel": 0.25})
    with torch.inference_mode():  # as Lightning runs predict
        pred = torch.linspace(-1, 1, 3 * 4).reshape(1, 1, 3, 4)  # (N, 1, H, W) affine-invariant depth
        written = DepthTask(min_depth=0.1, max_depth=30.0).save_prediction(pred[0], None, tmp_path / "pred", "scene")
    assert [p.name for p in written] == ["scene_depth.png", "scene_depth16.png", "scene_depth.npy"]
    results = tmp_path / "sweep" / "results.jsonl"
    append_jsonl(results, {"point": "a", "status": "ok"})
    report = atomic_write_text(tmp_path / "sweep" / "report" / "report.md", "# Scaling report\n")

    modes = {p.name: _mode(p) for p in [ckpt, metrics, *written, results, report]}
    assert modes == dict.fromkeys(modes, expected)
    assert AtomicCheckpointIO().load_checkpoint(ckpt)["global_step"] == 3
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # no temporary file is left behind


def test_rewriting_a_file_keeps_the_umask_mode_not_the_old_one(umask, tmp_path):
    path = tmp_path / "test_metrics.json"
    path.write_text("{}")
    path.chmod(0o600)
    atomic_write_json(path, {"abs_rel": 0.5})
    assert _mode(path) == 0o666 & ~umask and path.read_text() == '{\n  "abs_rel": 0.5\n}\n'
