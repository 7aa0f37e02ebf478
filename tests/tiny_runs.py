"""Shipped configs and sweeps run for real, shrunk: the assets and the config rewrite behind the end-to-end tests.

`make_assets(folder)` writes everything the shipped recipes point at, in the real formats and at toy sizes: Hypersim
(Marigold's layout: rgb / uint16 planar depth PNGs plus filename lists), FlyingChairs (``.ppm`` pairs, ``.flo``, the
split file), pix2gestalt (its four folders), ImageNet (``train/<class>/*.JPEG``), a tiny ``AutoencoderKL`` saved as a
Stable Diffusion pipeline's ``vae/`` folder, a random DiT in the official checkpoint layout (sigma outputs, 1000
classes + the null row), and folders of user inputs for ``predict`` (depth images, named flow pairs, amodal image +
mask). `shrink(resolved, ...)` keeps everything a resolved config says except sizes, paths and devices: a width-32
one-block DiT (MoE suffixes kept), 16 px images, 2 training steps on CPU, real data roots replaced by the assets.

Importable as ``tiny_runs`` from any test (pytest puts ``tests/`` on ``sys.path``).
"""

import copy
import importlib
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

from diffperc.cli import DiffpercCLI
from diffperc.data.io import read_flo

from helpers import tiny_vae

ROOT = Path(__file__).resolve().parents[1]
TINY_BACKBONE = dict(hidden_size=32, depth=1, num_heads=2, patch_size=2)
IMAGE_SIZE = 16  # pixels; 8x8 latents through the tiny VAE, 16 tokens at patch 2
PREDICT_MULTIPLE = 4  # VAE downsample 2 x patch 2 (a multiple of the pixel codec's patch 2 too)


@dataclass
class Assets:
    root: Path
    hypersim: Path  # holds processed/{train,val}/ and filename_list_{train,val}.txt
    chairs: Path  # holds data/ and FlyingChairs_train_val.txt
    pix2gestalt: Path  # holds occlusion/, visible_object_mask/, whole/, whole_mask/ and val.txt
    imagenet: Path  # holds train/<class>/ and val/<class>/
    sd2: Path  # a Stable Diffusion pipeline folder holding vae/
    dit_official: Path  # a random DiT in the official layout (DiT-XL-2-*.pt stand-in)
    images: dict  # predict inputs: task name -> folder


def _rgb(rng, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _imwrite(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array), path


def _write_flo(path: Path, flow: np.ndarray) -> None:
    from diffperc.data.io import write_flo

    path.parent.mkdir(parents=True, exist_ok=True)
    write_flo(path, flow)


def make_assets(folder: Path) -> Assets:
    """Writes every toy data set, weight file and predict folder under ``folder`` (about 1 s)."""
    rng = np.random.default_rng(0)
    h, w = 24, 32  # 4:3 like Hypersim and FlyingChairs, resized to 16 px by the recipes' readers

    # Hypersim: val/<scene>/rgb_cam_00_frNNNN.png + depth_plane_cam_00_frNNNN.png (mm, 0 = invalid).
    hypersim = folder / "hypersim"
    for split, count in (("train", 4), ("val", 4)):
        lines = []
        for i in range(count):
            rgb, depth = f"ai_001_00{i}/rgb_cam_00_fr{i:04d}.png", f"ai_001_00{i}/depth_plane_cam_00_fr{i:04d}.png"
            _imwrite(hypersim / "processed" / split / rgb, _rgb(rng, h, w))
            depth_mm = rng.integers(500, 20000, (h, w)).astype(np.uint16)
            depth_mm[0, :3] = 0  # a few invalid pixels, as in the real renders
            _imwrite(hypersim / "processed" / split / depth, depth_mm)
            lines.append(f"{rgb} {depth}")
        (hypersim / f"filename_list_{split}.txt").write_text("\n".join(lines) + "\n")

    # FlyingChairs: data/NNNNN_img1.ppm, _img2.ppm, _flow.flo and the split file (1 = train, 2 = val).
    chairs = folder / "FlyingChairs_release"
    codes = [1, 1, 1, 1, 2, 2]
    for i in range(len(codes)):
        _imwrite(chairs / "data" / f"{i + 1:05d}_img1.ppm", _rgb(rng, h, w))
        _imwrite(chairs / "data" / f"{i + 1:05d}_img2.ppm", _rgb(rng, h, w))
        _write_flo(chairs / "data" / f"{i + 1:05d}_flow.flo", rng.normal(0, 2, (h, w, 2)).astype(np.float32))
    (chairs / "FlyingChairs_train_val.txt").write_text("".join(f"{c}\n" for c in codes))

    # pix2gestalt: occlusion/, visible_object_mask/, whole/, whole_mask/ per id; val ids listed in val.txt.
    p2g = folder / "pix2gestalt"
    ids = [f"1000{i:04d}" for i in range(6)]
    for sample_id in ids:
        mask = np.zeros((w, w), np.uint8)
        mask[8:24, 6:20] = 255
        visible = mask.copy()
        visible[8:24, 14:20] = 0
        _imwrite(p2g / "occlusion" / f"{sample_id}_occlusion.png", _rgb(rng, w, w))
        _imwrite(p2g / "visible_object_mask" / f"{sample_id}_visible_mask.png", visible)
        _imwrite(p2g / "whole" / f"{sample_id}_whole.png", _rgb(rng, w, w))
        _imwrite(p2g / "whole_mask" / f"{sample_id}_whole_mask.png", mask)
    (p2g / "val.txt").write_text("\n".join(ids[-2:]) + "\n")

    # ImageNet: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG.
    imagenet = folder / "imagenet"
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            for i in range(3):
                _imwrite(imagenet / split / wnid / f"{wnid}_{i}.JPEG", _rgb(rng, 20, 28))

    # A tiny AutoencoderKL as the `vae/` subfolder of a pipeline folder, as the recipes' `subfolder: vae` expects.
    vae = tiny_vae()
    sd2 = folder / "stable-diffusion-2"
    vae.save_pretrained(sd2 / "vae")

    # A random DiT in the official checkpoint layout: learned sigma (8 output channels), 1000 classes + null row.
    from diffperc.models import build_model

    torch.manual_seed(0)
    official = build_model(
        "DiT-S/2",
        **TINY_BACKBONE,
        input_size=8,
        in_channels=4,
        learn_sigma=True,
        num_classes=1000,
        class_dropout_prob=0.1,
    )
    dit_official = folder / "DiT-XL-2-tiny.pt"
    torch.save(official.state_dict(), dit_official)

    # Predict inputs: two depth images of odd sizes; two named flow pairs; an amodal image with its mask.
    images = {name: folder / "predict" / name for name in ("depth", "flow", "amodal")}
    _imwrite(images["depth"] / "room.png", _rgb(rng, 21, 37))
    _imwrite(images["depth"] / "hall.jpg", _rgb(rng, 40, 13))
    for stem, (fh, fw) in {"a": (20, 30), "chair": (24, 32)}.items():
        first, second = ("_1", "_2") if stem == "a" else ("_img1", "_img2")
        _imwrite(images["flow"] / f"{stem}{first}.png", _rgb(rng, fh, fw))
        _imwrite(images["flow"] / f"{stem}{second}.png", _rgb(rng, fh, fw))
    _imwrite(images["amodal"] / "cup.png", _rgb(rng, 30, 22))
    cup_mask = np.zeros((30, 22), np.uint8)
    cup_mask[5:20, 4:15] = 255
    _imwrite(images["amodal"] / "cup_mask.png", cup_mask)
    return Assets(folder, hypersim, chairs, p2g, imagenet, sd2, dit_official, images)


# --------------------------------------------------------------------------------------------------------------------
#                                        Resolving and shrinking a recipe
# --------------------------------------------------------------------------------------------------------------------
def config_args(config: Path) -> list[str]:
    """``--config`` arguments for a shipped YAML: a delta file names the files that go before it, in order, on line 1
    (``# base: configs/depth_xl.yaml, configs/generalist_xl.yaml``)."""
    first = config.read_text().splitlines()[0] if config.read_text() else ""
    bases = [ROOT / b.strip() for b in first.removeprefix("# base:").split(",")] if first.startswith("# base:") else []
    return [arg for path in [*bases, config] for arg in ("--config", str(path))]


def runnable_configs() -> list[str]:
    """Every shipped recipe, as a path relative to the repository: each YAML under ``configs/`` except the ``base.yaml``
    files, which hold what a folder's recipes share and are no run on their own (a run = its ``config_args``)."""
    paths = (ROOT / "configs").rglob("*.yaml")
    return sorted(p.relative_to(ROOT).as_posix() for p in paths if p.name != "base.yaml")


class Recipes:
    """Toy runs of the shipped recipes, each fitted once per session and shared by the tests that need it."""

    def __init__(self, assets, folder: Path):
        self.assets, self.folder, self._fitted, self._by_run_name = assets, folder, {}, None

    def config(self, config: str, extra: list[str] = ()) -> tuple[Path, dict]:
        """The shrunk, composed config of ``config`` (plus ``extra`` ``--config`` files), written to a file."""
        composed = compose([*config_args(ROOT / config), *extra])
        init_from = composed["model"]["init_args"].get("init_from")
        checkpoints = {init_from: self.stand_in(init_from)} if init_from and init_from.startswith("runs/") else {}
        names = [config, *extra[1::2]]
        slug = "+".join(
            Path(n).stem if i else Path(n).as_posix().removeprefix("configs/").removesuffix(".yaml")
            for i, n in enumerate(names)
        ).replace("/", "_")
        cfg = shrink(composed, self.assets, self.folder / "runs" / slug, checkpoints)
        return write_config(cfg, self.folder / "configs" / f"{slug}.yaml"), cfg

    def stand_in(self, path: str) -> Path:
        """The toy counterpart of a shipped recipe's checkpoint path ``runs/<logger name>/checkpoints/last.ckpt``:
        the same file of that recipe's toy run (fitted on first use)."""
        if self._by_run_name is None:
            self._by_run_name = {}
            for config in map(ROOT.joinpath, runnable_configs()):
                logger = compose(config_args(config)).get("trainer", {}).get("logger")
                if isinstance(logger, dict) and config.parent.name != "trainer" and config.name != "debug.yaml":
                    name = logger["init_args"]["name"]
                    self._by_run_name.setdefault(name, config.relative_to(ROOT).as_posix())
        parts = Path(path).parts
        assert parts[0] == "runs" and parts[1] in self._by_run_name, f"no shipped recipe writes {path}"
        path = self.fit(self._by_run_name[parts[1]])[1] / Path(*parts[2:])
        return path if path.exists() else path.with_name("last.ckpt")  # e.g. step=60000.ckpt: the toy run has 2

    def fit(self, config: str, *extra: str) -> tuple[Path, Path]:
        """Fits ``config`` (composed with the ``extra`` config files) shrunk, once per session: returns its resolved
        config file and run folder."""
        key = (config, *extra)
        if key not in self._fitted:
            extra_args = [a for e in extra for a in ("--config", str(ROOT / e))]
            path, cfg = self.config(config, extra_args)
            # The shipped files as a user passes them, then the shrunk values: LightningCLI parses the real files.
            cli("fit", *config_args(ROOT / config), *extra_args, "--config", path)
            self._fitted[key] = path, run_dir(cfg)
        return self._fitted[key]


def _accepted(class_path: str, init_args: dict) -> dict:
    """The ``init_args`` that the class ``class_path`` takes (all of them when its ``__init__`` takes ``**kwargs``)."""
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    params = inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(init_args)
    return {k: v for k, v in init_args.items() if k in params}


def _merge(base, override):
    """``override`` composed onto ``base`` as repeated ``--config`` files compose: dicts merge key by key (a changed
    ``class_path`` keeps the ``init_args`` the new class takes, as jsonargparse does), anything else is replaced."""
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return copy.deepcopy(override)
    if "class_path" in override and override["class_path"] != base.get("class_path"):
        kept = _accepted(override["class_path"], base.get("init_args") or {}) if base.get("class_path") else {}
        return {**copy.deepcopy(override), "init_args": _merge(kept, override.get("init_args") or {})}
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
    return merged


def compose(args: list[str]) -> dict:
    """The config that ``--config A --config B ...`` composes (file values only; the CLI adds the defaults)."""
    cfg: dict = {}
    for flag, value in zip(args[::2], args[1::2]):
        assert flag == "--config", args
        cfg = _merge(cfg, yaml.safe_load(Path(value).read_text()) or {})
    return cfg


_SPLIT_LENGTHS = {"train": 64, "val": 4, "test": 4}


def _shrink_dataset(spec: dict | None, split: str, assets: Assets) -> dict | None:
    if spec is None:
        return None
    spec = copy.deepcopy(spec)
    name, args = spec["class_path"].rsplit(".", 1)[-1], spec.setdefault("init_args", {})
    module, _, cls = spec["class_path"].rpartition(".")
    if "resolution" in inspect.signature(getattr(importlib.import_module(module), cls)).parameters:
        args["resolution"] = IMAGE_SIZE  # also where the recipe leaves the reader's default (e.g. 256 or 512 px)
    if name.startswith("Procedural"):
        args["length"] = _SPLIT_LENGTHS[split]
    elif name == "HypersimDataset":
        part = "train" if split == "train" else "val"
        args.update(
            root=str(assets.hypersim / "processed" / part),
            filename_list=str(assets.hypersim / f"filename_list_{part}.txt"),
        )
    elif name == "FlyingChairsDataset":
        args["root"] = str(assets.chairs)
    elif name == "Pix2GestaltDataset":
        args.update(root=str(assets.pix2gestalt), val_list=str(assets.pix2gestalt / "val.txt"))
    elif name == "ImageNetFolder":
        args["root"] = str(assets.imagenet)
    else:
        raise AssertionError(f"no toy stand-in for data set {spec['class_path']}: add one to tests/tiny_runs.py")
    return spec


def shrink(resolved: dict, assets: Assets, save_dir: Path, checkpoints: dict[str, Path]) -> dict:
    """``resolved`` with toy sizes, the assets' paths and a single CPU process; everything else as configured.

    Args:
        resolved: A composed config (`compose`).
        assets: From `make_assets`.
        save_dir: The logger's ``save_dir`` (the run folder is ``save_dir/<name>``, the name as configured).
        checkpoints: ``init_from`` stand-ins: a configured path containing a key (``runs/depth_xl/``) is replaced by
            its value (that recipe's toy run); ``.pt`` files become the random official-layout DiT.
    """
    cfg = copy.deepcopy(resolved)
    trainer = cfg.setdefault("trainer", {})
    accumulate = trainer.get("accumulate_grad_batches") or 1
    trainer.update(
        accelerator="cpu",
        devices=1,
        num_nodes=1,
        max_steps=2,
        check_val_every_n_epoch=None,
        val_check_interval=2 * accumulate,
        limit_val_batches=1,
        limit_test_batches=2,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_progress_bar=False,
        max_epochs=None,
    )
    strategy = trainer.get("strategy")
    if isinstance(strategy, dict) and strategy["class_path"].endswith("ModelParallelStrategy"):
        strategy["init_args"]["data_parallel_size"] = 1  # one CPU process; FSDP2 still shards (over 1)
    if isinstance(trainer.get("logger"), dict):
        trainer["logger"]["init_args"].update(save_dir=str(save_dir), version="")
    # Checkpoint periods in steps become 1, 2, ... in their order (the shortest 1, so last.ckpt is written at step 2):
    # distinct periods stay distinct, as Lightning needs each ModelCheckpoint's state key to be unique.
    callbacks = trainer.get("callbacks") or []
    savers = [cb.get("init_args") or {} for cb in callbacks if cb["class_path"].endswith("ModelCheckpoint")]
    step_savers = [args for args in savers if args.get("every_n_train_steps")]
    periods = sorted({args["every_n_train_steps"] for args in step_savers})
    for args in step_savers:
        args["every_n_train_steps"] = periods.index(args["every_n_train_steps"]) + 1

    model = cfg["model"]["init_args"]
    backbone = model.get("backbone") or {}
    model["backbone"] = {**backbone, **TINY_BACKBONE, "name": backbone.get("name", "t1")}
    model["image_size"] = IMAGE_SIZE
    codec = model.get("codec") or {}
    if codec.get("class_path", "").endswith("VAECodec"):
        codec["init_args"].update(path=str(assets.sd2), subfolder="vae")
    init_from = model.get("init_from")
    if init_from:
        stand_in = next((path for key, path in checkpoints.items() if key in init_from), None)
        if stand_in is None and init_from.endswith(".pt"):
            stand_in = assets.dit_official
        assert stand_in is not None, f"no toy stand-in for init_from {init_from}"
        model["init_from"] = str(stand_in)
    inference = model.get("inference")
    if isinstance(inference, dict):
        inference["num_steps"] = min(inference.get("num_steps") or 2, 2)
        inference["ensemble_size"] = min(inference.get("ensemble_size") or 1, 3)
    sampling = model.get("sampling")
    if isinstance(sampling, dict):
        sampling.update(num_samples=2, num_steps=2, labels=(sampling.get("labels") or [0, 1])[:2])

    data = cfg["data"]["init_args"]
    for split in ("train", "val", "test"):
        value = data.get(split)
        if isinstance(value, list):
            data[split] = [_shrink_dataset(spec, split, assets) for spec in value]
        else:
            data[split] = _shrink_dataset(value, split, assets)
    data.update(batch_size=2, eval_batch_size=2, num_workers=0, pin_memory=False)
    data.update(predict_resolution=IMAGE_SIZE, predict_multiple=PREDICT_MULTIPLE)
    if "length" in data:  # the multi-task mixture's epoch length
        data["length"] = 64
    return cfg


def run_dir(cfg: dict) -> Path:
    logger = cfg["trainer"]["logger"]["init_args"]
    return Path(logger["save_dir"]) / logger["name"]


def write_config(cfg: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def cli(*args) -> DiffpercCLI:
    return DiffpercCLI(args=[str(a) for a in args])


def read_metrics(path: Path) -> dict:
    """``test_metrics.json`` read as strict JSON (a bare NaN fails), every number finite."""

    def strict(token):
        raise ValueError(f"{path} holds {token}: not strict JSON")

    record = json.loads(path.read_text(), parse_constant=strict)
    for key, value in record.items():
        if isinstance(value, float):
            assert math.isfinite(value), (path, key, value)
    return record


def check_predictions(out: Path, task: str) -> None:
    """The files ``predict`` writes for the toy inputs of ``task``, at each input's own size."""
    if task == "depth":
        for stem, ext, (h, w) in (("room", "png", (21, 37)), ("hall", "jpg", (40, 13))):
            name = stem if (out / f"{stem}_depth.npy").is_file() else f"{stem}.{ext}"
            assert np.load(out / f"{name}_depth.npy").shape == (h, w), name
            assert cv2.imread(str(out / f"{name}_depth.png")).shape == (h, w, 3)
    elif task == "flow":
        for stem, (h, w) in {"a": (20, 30), "chair": (24, 32)}.items():
            flo = read_flo(out / f"{stem}_flow.flo")
            assert flo.shape == (h, w, 2) and np.isfinite(flo).all()
            assert cv2.imread(str(out / f"{stem}_flow.png")).shape == (h, w, 3)
        assert not list(out.glob("a_*chair*")), "a flow pair was formed across two samples"
    elif task == "amodal":
        mask = cv2.imread(str(out / "cup_mask.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (30, 22) and set(np.unique(mask)) <= {0, 255}
        assert cv2.imread(str(out / "cup_whole.png")).shape == (30, 22, 3)
