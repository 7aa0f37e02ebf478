import json
from unittest import mock
from unittest.mock import Mock, call

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from diffperc.callbacks import macs as macs_module
from diffperc.callbacks.macs import MACsCounter
from diffperc.compute import count_train_macs
from diffperc.data import PerceptionDataModule, ProceduralDepth
from diffperc.lit import PerceptionFinetuning, Upcycle

from helpers import quiet_trainer, tiny_backbone, tiny_finetuning


def _tiny_module(**kw) -> PerceptionFinetuning:
    return tiny_finetuning(patch_size=4, num_images_logged=0, **kw)


def _data() -> PerceptionDataModule:
    return PerceptionDataModule(
        train=ProceduralDepth("train", 64, 16), test=ProceduralDepth("test", 4, 16), batch_size=4
    )


def _logger(tmp_path) -> Mock:
    logger = Mock()
    logger.log_dir = logger.save_dir = str(tmp_path)  # where the callback writes train_macs.json
    return logger


def _trainer(tmp_path, logger, callback, **kw) -> Trainer:
    kw = {"max_steps": 5, "log_every_n_steps": 1, **kw}
    return quiet_trainer(logger=logger, callbacks=[callback], limit_val_batches=0, default_root_dir=tmp_path, **kw)


def _counter(trainer: Trainer) -> MACsCounter:
    # The module's configure_callbacks may supply its own MACsCounter, which then replaces the one passed in.
    (counter,) = [cb for cb in trainer.callbacks if isinstance(cb, MACsCounter)]
    return counter


def _step_macs(module: PerceptionFinetuning, batch_size: int = 4) -> int:
    # One micro-batch: [RGB condition, noisy depth] = 6 channels at 16 px into the net, the count that training costs.
    x = torch.zeros(batch_size, 6, 16, 16)
    t = y = torch.zeros(batch_size, dtype=torch.long)
    return count_train_macs(module.net, x, t, y)


def _macs_calls(logger: Mock, key: str = "compute/train_macs") -> list:
    return [c for c in logger.log_metrics.mock_calls if key in (c.args[0] if c.args else c.kwargs["metrics"])]


def test_macs_counter_logs_cumulative_train_macs_every_step(tmp_path):
    module, logger = _tiny_module(), _logger(tmp_path)
    per_step = _step_macs(module)
    trainer = _trainer(tmp_path, logger, MACsCounter())
    trainer.fit(module, datamodule=_data())
    # Step k's total is logged under Lightning's step index k - 1 (where its train/loss goes).
    expected = [call({"compute/train_macs": float(k * per_step)}, step=k - 1) for k in range(1, 6)]
    assert _macs_calls(logger) == expected
    assert _counter(trainer).train_macs == 5 * per_step
    record = (tmp_path / "train_macs.json").read_text()
    assert f'"compute/train_macs": {5 * per_step}' in record and '"global_step": 5' in record


def test_macs_counter_sums_micro_batches_and_logs_the_final_total(tmp_path):
    module, logger = _tiny_module(), _logger(tmp_path)
    per_batch = _step_macs(module)
    trainer = _trainer(tmp_path, logger, MACsCounter(), max_steps=3, accumulate_grad_batches=2, log_every_n_steps=2)
    trainer.fit(module, datamodule=_data())
    # 2 micro-batches per optimisation step; logged at step 2 (every 2nd) and after the last step (3).
    assert _macs_calls(logger) == [
        call({"compute/train_macs": float(4 * per_batch)}, step=1),
        call({"compute/train_macs": float(6 * per_batch)}, step=2),
    ]


def test_macs_counter_scales_by_world_size(tmp_path):
    module, logger = _tiny_module(), _logger(tmp_path)
    per_step = _step_macs(module)
    trainer = _trainer(tmp_path, logger, MACsCounter(), max_steps=2)
    with mock.patch.object(Trainer, "world_size", new_callable=mock.PropertyMock, return_value=4):
        trainer.fit(module, datamodule=_data())
    assert _counter(trainer).train_macs == 2 * 4 * per_step


def test_macs_counter_resume_continues_the_count(tmp_path):
    module, logger = _tiny_module(), _logger(tmp_path)
    per_step = _step_macs(module)
    first = _trainer(tmp_path, logger, MACsCounter(), max_steps=2)
    first.fit(module, datamodule=_data())
    ckpt = tmp_path / "two.ckpt"
    first.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=True)["callbacks"]["MACsCounter"] == {"train_macs": 2 * per_step}

    logger = _logger(tmp_path)
    second = _trainer(tmp_path, logger, MACsCounter(), max_steps=4)
    second.fit(_tiny_module(), datamodule=_data(), ckpt_path=ckpt)
    assert _counter(second).train_macs == 4 * per_step
    assert _macs_calls(logger) == [call({"compute/train_macs": float(k * per_step)}, step=k - 1) for k in (3, 4)]


def test_macs_counter_measures_once_per_shape_and_where(tmp_path):
    counted = []

    def _counting(*args, **kwargs):
        counted.append(kwargs["device"])
        return count_train_macs(*args, **kwargs)

    # Once per batch shape: a dense network and a capacity-limited MoE (static, padded shapes) on the meta device
    # ("auto"), a dropless MoE on real tensors ("same": its dispatch shapes depend on the routing).
    capped = Upcycle(2, 1, capacity_factor=1.0)
    cases = (
        (_tiny_module(), ["auto"]),
        (_tiny_module(upcycle=Upcycle(2, 1)), ["same"]),
        (_tiny_module(upcycle=capped), ["auto"]),
    )
    for module, expected in cases:
        counted.clear()
        with mock.patch.object(macs_module, "count_train_macs", _counting):
            _trainer(tmp_path, _logger(tmp_path), MACsCounter(), max_steps=2).fit(module, datamodule=_data())
        assert counted == expected


def test_macs_counter_does_not_change_training(tmp_path):
    def _final_weights(callbacks_on: bool) -> torch.Tensor:
        torch.manual_seed(0)
        module = _tiny_module()
        callback = MACsCounter() if callbacks_on else Callback()
        trainer = _trainer(tmp_path, _logger(tmp_path), callback, max_steps=2)
        trainer.fit(module, datamodule=_data())
        return torch.cat([p.detach().flatten() for p in module.net.parameters()])

    torch.testing.assert_close(_final_weights(True), _final_weights(False), rtol=0, atol=0)


def test_macs_counter_logs_test_macs_reported_by_the_module(tmp_path):
    module, logger = _tiny_module(), _logger(tmp_path)
    trainer = _trainer(tmp_path, logger, MACsCounter(), max_steps=1)
    trainer.test(module, datamodule=_data())
    reported = module.test_results["compute/test_macs_per_sample"]
    assert reported > 0
    assert _macs_calls(logger, "compute/test_macs_per_sample") == [
        call({"compute/test_macs_per_sample": float(reported)}, step=0)
    ]


def test_macs_counter_counts_pretraining_steps(tmp_path):
    from diffperc.data import ProceduralClasses
    from diffperc.lit.pretraining import DiffusionPretraining

    module = DiffusionPretraining(backbone=tiny_backbone(patch_size=4), image_size=16, num_classes=10)
    x, t = torch.zeros(4, 3, 16, 16), torch.zeros(4, dtype=torch.long)  # the noisy image and its class label
    per_step = count_train_macs(module.net, x, t, t)
    logger = _logger(tmp_path)
    trainer = _trainer(tmp_path, logger, MACsCounter(), max_steps=2)
    trainer.fit(module, datamodule=PerceptionDataModule(train=ProceduralClasses("train", 16, 16), batch_size=4))
    assert _counter(trainer).train_macs == 2 * per_step
    assert _macs_calls(logger) == [call({"compute/train_macs": float(k * per_step)}, step=k - 1) for k in (1, 2)]


def test_macs_counter_writes_its_record_sources_once_and_keeps_its_own_keys(tmp_path):
    calls = []

    def source() -> dict:
        calls.append(1)
        return {"extra/value": 1.5, "compute/train_macs": -1}  # a clash: the counter's own total wins

    module, logger, counter = _tiny_module(), _logger(tmp_path), MACsCounter()
    per_step = _step_macs(module)
    counter.add_to_record(source)
    counter.add_to_record(source)
    _trainer(tmp_path, logger, counter, max_steps=2).fit(module, datamodule=_data())
    record = json.loads((tmp_path / "train_macs.json").read_text())
    # The module's default PowerLawMonitor adds loss/train: the last of its 2 logged values (too few for a law).
    losses = [(c.args[0] if c.args else c.kwargs["metrics"])["train/loss"] for c in _macs_calls(logger, "train/loss")]
    assert record == {
        "compute/train_macs": 2 * per_step,
        "global_step": 2,
        "extra/value": 1.5,
        "loss/train": pytest.approx(losses[-1], rel=1e-7),
    }
    assert len(calls) == 1 and len(losses) == 2


def test_macs_counter_counts_an_activation_checkpointed_model_as_the_plain_one(tmp_path):
    # Checkpointed blocks recompute in backward, after the count's meta parameters are gone: the count runs them
    # plainly (it crashed: "Tensor on device cpu is not on the expected device meta"), and the recomputation is not
    # the model's compute, so the total equals the plain model's.
    totals = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module, logger = _tiny_module(activation_checkpointing=checkpointing), _logger(tmp_path)
        trainer = _trainer(tmp_path, logger, MACsCounter(), max_steps=2)
        trainer.fit(module, datamodule=_data())
        totals.append((_counter(trainer).train_macs, [p.detach().clone() for p in module.net.parameters()]))
    assert totals[0][0] == totals[1][0] == 2 * _step_macs(_tiny_module())
    for plain, checkpointed in zip(totals[0][1], totals[1][1], strict=True):  # and trains the same weights
        torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)
