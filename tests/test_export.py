import json
from unittest.mock import Mock

import torch

from diffperc.data import PerceptionDataModule, ProceduralDepth
from diffperc.export import export_checkpoint, load_exported
from diffperc.lit import PerceptionFinetuning, Upcycle
from diffperc.upcycling import upcycle_checkpoint

from helpers import quiet_trainer, tiny_finetuning


def _module(**kw) -> PerceptionFinetuning:
    return tiny_finetuning(depth=2, lr=3e-3, **kw)


def _fit(module, tmp_path, steps=3, logger=False):
    trainer = quiet_trainer(max_steps=steps, logger=logger, enable_checkpointing=True, limit_val_batches=0,
                            default_root_dir=tmp_path, log_every_n_steps=1)
    trainer.fit(module, datamodule=PerceptionDataModule(train=ProceduralDepth("train", 64, 16), batch_size=4))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 6, 16, 16, generator=g), torch.tensor([3, 600]), torch.zeros(2, dtype=torch.long)


def test_export_round_trips_to_an_identical_model(tmp_path):
    module = _module()
    ckpt = _fit(module, tmp_path)
    weights, meta = export_checkpoint(ckpt, tmp_path / "depth.safetensors")
    record = json.loads(meta.read_text())
    assert record["task"] == "depth" and record["dit_config"]["in_channels"] == 6 and record["moe"] is None
    loaded = load_exported(weights).eval()
    module.net.eval()
    torch.testing.assert_close(loaded(*_inputs()), module.net(*_inputs()), rtol=0, atol=0)


def test_upcycled_checkpoint_starts_equal_to_dense_and_trains_with_aux_loss(tmp_path):
    dense = _module()
    ckpt = _fit(dense, tmp_path)
    moe_ckpt = upcycle_checkpoint(ckpt, tmp_path / "moe.ckpt", num_experts=4, top_k=2)
    moe = _module(init_from=str(moe_ckpt), upcycle=Upcycle(num_experts=4, top_k=2))
    assert moe.is_moe and len(moe.net.blocks[0].mlp.experts) == 4
    dense.net.eval(), moe.net.eval()
    torch.testing.assert_close(moe.net(*_inputs()), dense.net(*_inputs()), rtol=1e-5, atol=1e-5)

    # Upcycling inside the module from the dense checkpoint gives the same function too.
    direct = _module(init_from=str(ckpt), upcycle=Upcycle(num_experts=4, top_k=2)).eval()
    torch.testing.assert_close(direct.net(*_inputs()), dense.net(*_inputs()), rtol=1e-5, atol=1e-5)

    logger = Mock()
    logger.save_dir, logger.log_dir, logger.name, logger.version = str(tmp_path), str(tmp_path), "mock", 0
    router_before = moe.net.blocks[0].mlp.router.weight.detach().clone()
    moe.train()
    _fit(moe, tmp_path / "moe_run", steps=3, logger=logger)
    logged = {
        k for call in logger.log_metrics.call_args_list for k in (call.args[0] if call.args else call.kwargs["metrics"])
    }
    assert "train/moe_aux_loss" in logged and "moe/blocks.0.mlp/expert_0" in logged
    assert not torch.equal(moe.net.blocks[0].mlp.router.weight, router_before)  # the router trains

    weights, meta = export_checkpoint(tmp_path / "moe_run" / "model.ckpt", tmp_path / "moe.safetensors")
    assert json.loads(meta.read_text())["moe"]["num_experts"] == 4
    moe.net.eval()
    torch.testing.assert_close(load_exported(weights).eval()(*_inputs()), moe.net(*_inputs()), rtol=0, atol=0)
