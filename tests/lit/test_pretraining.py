"""DiffusionPretraining: EMA weights in checkpoints and init_from, label dropout, CFG, MoE loss, sample grids."""

import cv2
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from diffperc.data.procedural_classes import ProceduralClasses
from diffperc.lit.finetuning import Backbone, PerceptionFinetuning
from diffperc.lit.pretraining import DiffusionPretraining, EMASettings, SamplingSettings
from diffperc.models import DiT, build_model
from diffperc.models.pretrained import load_pretrained
from diffperc.tasks import DepthTask

from helpers import quiet_trainer

TINY = dict(name="t1", patch_size=4, hidden_size=32, depth=1, num_heads=2)
DECAY = 0.5


def _module(**kwargs) -> DiffusionPretraining:
    kwargs.setdefault("ema", EMASettings(decay=DECAY))
    kwargs.setdefault("sampling", SamplingSettings(num_samples=4, num_steps=2, columns=2))
    return DiffusionPretraining(backbone=Backbone(**TINY), image_size=16, **kwargs)


def _randomize(net: torch.nn.Module) -> None:
    # adaLN-Zero starts every block and the output at zero, which would hide any dependence on t, y or x.
    torch.manual_seed(1)
    for param in net.parameters():
        param.data.normal_(0, 0.2)


class _RawWeights(Callback):
    """Records the live network weights after every optimizer step."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()})


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    torch.manual_seed(0)
    module = _module()
    recorder = _RawWeights()
    trainer = quiet_trainer(max_steps=5, default_root_dir=root, enable_checkpointing=True, num_sanity_val_steps=0,
                            val_check_interval=5, limit_val_batches=1,
                            callbacks=[recorder, ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)])
    train = DataLoader(ProceduralClasses("train", 64, 16), batch_size=8, shuffle=True)
    val = DataLoader(ProceduralClasses("val", 8, 16), batch_size=8)
    trainer.fit(module, train, val)
    return root, recorder.steps


def test_pretraining_checkpoint_holds_ema_weights_for_init_from(fitted):
    root, steps = fitted
    assert len(steps) == 5
    # Lightning's EMA: the first update copies the weights, then ema <- decay * ema + (1 - decay) * w.
    expected = dict(steps[0])
    for raw in steps[1:]:
        expected = {k: DECAY * expected[k] + (1 - DECAY) * raw[k] for k in raw}

    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)  # plain values only
    key = "net.blocks.0.mlp.fc1.weight"
    torch.testing.assert_close(checkpoint["state_dict"][key], expected["blocks.0.mlp.fc1.weight"])
    torch.testing.assert_close(checkpoint["current_model_state"][key], steps[-1]["blocks.0.mlp.fc1.weight"])
    assert (checkpoint["state_dict"][key] - checkpoint["current_model_state"][key]).abs().max() > 1e-4
    assert checkpoint["hyper_parameters"]["ema"]["decay"] == DECAY

    net = build_model("t1", input_size=16, in_channels=3, patch_size=4, hidden_size=32, depth=1, num_heads=2,
                      learn_sigma=False, num_classes=10, class_dropout_prob=0.1)
    report = load_pretrained(net, root / "checkpoints" / "last.ckpt")
    assert report["ema"] and report["prefix"] == "net."
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, expected[name])


def test_pretraining_checkpoint_initialises_depth_finetuning(fitted):
    root, steps = fitted
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    ema = {k[len("net."):]: v for k, v in checkpoint["state_dict"].items()}
    finetune = PerceptionFinetuning(task=DepthTask(), backbone=Backbone(**TINY), image_size=16,
                                    init_from=str(root / "checkpoints" / "last.ckpt"))
    state = finetune.net.state_dict()
    torch.testing.assert_close(state["blocks.0.attn.qkv.weight"], ema["blocks.0.attn.qkv.weight"])
    # Marigold's widening for [image, noisy target]; the 10 class rows (not the null row) average into the task row.
    torch.testing.assert_close(state["x_embedder.proj.weight"], ema["x_embedder.proj.weight"].repeat(1, 2, 1, 1) / 2)
    table = ema["y_embedder.embedding_table.weight"]
    assert table.shape[0] == 11
    torch.testing.assert_close(state["y_embedder.embedding_table.weight"], table[:10].mean(0, keepdim=True))


def test_pretraining_writes_sample_grid_png(fitted):
    root, _ = fitted
    grid = cv2.imread(str(root / "samples_step5.png"))
    # 4 samples of 16 px in 2 columns with 2 px padding: 2 * (16 + 2) + 2 = 38.
    assert grid is not None and grid.shape == (38, 38, 3)


def test_pretraining_label_dropout_rate_is_honoured():
    torch.manual_seed(0)
    module = DiffusionPretraining(backbone=Backbone(**TINY), image_size=8, class_dropout_prob=0.25)
    seen = []
    module.net.y_embedder.embedding_table.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    n = 12000
    x0, y = torch.rand(n, 3, 8, 8) * 2 - 1, torch.randint(0, 10, (n,))
    module.train()
    module.diffusion_loss(x0, y)
    dropped = seen[-1] == 10  # the null label
    # 0.25 +- 5 standard deviations (sqrt(0.25 * 0.75 / 12000) = 0.004); kept labels are untouched.
    assert abs(dropped.float().mean().item() - 0.25) < 0.02
    assert torch.equal(seen[-1][~dropped], y[~dropped])
    module.eval()
    module.diffusion_loss(x0[:100], y[:100])
    assert torch.equal(seen[-1], y[:100])  # no dropout outside training


def test_pretraining_cfg_scale_one_equals_conditional_sampling():
    module = _module()
    _randomize(module.net)
    labels = torch.tensor([0, 3, 7, 9])
    conditional = module.sample_latents(labels, cfg_scale=None, num_steps=3)
    guided_one = module.sample_latents(labels, cfg_scale=1.0, num_steps=3)
    torch.testing.assert_close(guided_one, conditional, rtol=1e-4, atol=1e-4)
    guided = module.sample_latents(labels, cfg_scale=4.0, num_steps=3)
    assert (guided - conditional).abs().max() > 1e-2  # guidance does change the samples
    assert conditional.shape == (4, 3, 16, 16)
    images = module.sample(labels, num_steps=3)
    assert images.shape == (4, 3, 16, 16) and images.abs().max() <= 1


@pytest.mark.filterwarnings("ignore:.*self.log.*")
def test_pretraining_adds_the_moe_balance_loss():
    from diffperc.models.moe import moe_aux_loss, upcycle

    module = _module()
    _randomize(module.net)
    module.net = upcycle(module.net, num_experts=4, top_k=2)
    module.is_moe = True
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "label": torch.tensor([1, 2, 3, 4])}
    module.train()
    torch.manual_seed(3)
    loss = module.training_step(batch, 0)
    aux = moe_aux_loss(module.net)
    torch.manual_seed(3)
    mse = module.diffusion_loss(batch["image"], batch["label"])
    assert aux.item() > 0
    torch.testing.assert_close(loss, mse + aux)


def test_pretraining_rejects_cfg_without_null_label():
    with pytest.raises(ValueError, match="class_dropout_prob"):
        _module(class_dropout_prob=0.0, sampling=SamplingSettings(cfg_scale=2.0))
    with pytest.raises(ValueError, match="sampling.labels"):
        _module(sampling=SamplingSettings(labels=[3, 12]))
    assert isinstance(_module(class_dropout_prob=0.0, sampling=SamplingSettings(cfg_scale=None)).net, DiT)


def test_pretraining_checkpoint_leaves_out_the_vae_and_resumes(tmp_path):
    from diffusers import AutoencoderKL

    from diffperc.codecs import VAECodec

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  layers_per_block=1, norm_num_groups=8, sample_size=16).save_pretrained(tmp_path / "vae")

    def fit(max_steps, ckpt_path=None):
        module = DiffusionPretraining(codec=VAECodec(str(tmp_path / "vae")), image_size=16,
                                      backbone=Backbone("t1", patch_size=2, hidden_size=32, depth=1, num_heads=2),
                                      ema=EMASettings(decay=0.9))
        trainer = quiet_trainer(max_steps=max_steps, default_root_dir=tmp_path, enable_checkpointing=True,
                                limit_val_batches=0,
                                callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
        trainer.fit(module, DataLoader(ProceduralClasses("train", 32, 16), batch_size=4), ckpt_path=ckpt_path)
        return module, trainer

    module, _ = fit(2)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    for key in ("state_dict", "current_model_state"):
        assert checkpoint[key] and not any(k.startswith("codec.") for k in checkpoint[key])
    # Resuming puts the codec's own weights back before Lightning and the EMA callback load strictly.
    _, trainer = fit(3, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 3
    loaded = DiffusionPretraining.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt",
                                                       codec=VAECodec(str(tmp_path / "vae")))
    torch.testing.assert_close(loaded.codec.vae.encoder.conv_in.weight, module.codec.vae.encoder.conv_in.weight)


def test_pretraining_ddim_sampling_recovers_data_with_an_exact_noise_oracle():
    module = _module()
    alphas_cumprod = module.noise_scheduler.alphas_cumprod

    class Oracle(torch.nn.Module):
        """Exact epsilon when the data is one fixed image per class: (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""

        input_size = 16

        def __init__(self, images):
            super().__init__()
            self.images = images

        def forward(self, x, t, y):
            abar = alphas_cumprod[t].view(-1, 1, 1, 1)
            return (x - abar.sqrt() * self.images[y]) / (1 - abar).sqrt()

        def forward_with_cfg(self, x, t, y, cfg_scale):
            return self.forward(x, t, y)  # conditional == unconditional for an oracle

    torch.manual_seed(0)
    images = torch.rand(10, 3, 16, 16) * 1.6 - 0.8
    module.net = Oracle(images)
    labels = torch.tensor([2, 7, 7])
    for num_steps in (1, 5):
        out = module.sample_latents(labels, cfg_scale=3.0, num_steps=num_steps)
        torch.testing.assert_close(out, images[labels], rtol=0, atol=1e-4)
