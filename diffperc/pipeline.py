"""A trained model in one object: ``PerceptionPipeline.from_pretrained`` loads a ``diffperc export`` folder or Hub id
and predicts from images in memory or on disk, the way ``diffperc predict`` does for a folder.

    from diffperc import PerceptionPipeline

    pipe = PerceptionPipeline.from_pretrained("exports/depth")   # a folder, or a Hub id such as "org/name"
    out = pipe("room.jpg", num_steps=4, ensemble_size=5)
    out.prediction  # (H, W) float32 affine-invariant depth at the image's size; out.uncertainty: its spread

Loading goes through huggingface_hub's ``ModelHubMixin`` (``config.json``, ``model.safetensors``, ``README.md``;
Hub ids through the Hugging Face cache, ``HF_HUB_OFFLINE=1`` never downloads). Inference goes through the same code
as ``diffperc predict``: the preprocessing and size restoring of ``diffperc.predict`` around
``PerceptionFinetuning.predict_batch``.
"""

import dataclasses
import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from huggingface_hub import ModelCard, ModelHubMixin, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled

from diffperc.codecs import Codec
from diffperc.data.io import decode_image
from diffperc.diffusion import REDUCERS, check_num_steps
from diffperc.lit import PerceptionFinetuning
from diffperc.models.build import Backbone, rebuild_network
from diffperc.predict import fit_image, processing_size, restore_size, to_model_range, visible_mask
from diffperc.tasks import Task
from diffperc.utils import atomic_write_json, new_file_mode

FORMAT = "diffperc"
FORMAT_VERSION = 2
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What each task's prediction is, for the model card and errors.
RETURNS = {
    "depth": "(H, W) float32 affine-invariant depth, about -1 (near) to 1 (far)",
    "flow": "(H, W, 2) float32 optical flow (u, v) from frame 1 to frame 2, in pixels of the input",
    "amodal": "(H, W) bool mask of the whole object, its occluded parts included",
}
CALLS = {"single": "'image.png'", "pairs": "'frame1.png', 'frame2.png'", "masks": "'image.png', 'visible_mask.png'"}

MODEL_CARD = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Use

```python
from diffperc import PerceptionPipeline

pipe = PerceptionPipeline.from_pretrained("{{ repo_id }}")
{{ usage }}
```

Inputs are file paths, PIL images, uint8 (H, W, 3) RGB arrays or float (3, H, W) tensors in [0, 1]; a mask is a
path, a (H, W) bool or uint8 array, or a (H, W) tensor. `pipe.to("cuda")` moves the model.
`num_steps`, `ensemble_size`, `reducer` and `seed` override the defaults below.

## Model

| | |
|---|---|
{{ model_table }}

## Training

- Data: {{ training_data }}
- Steps: {{ training_steps }}
- Training compute: {{ train_macs }}

## Evaluation

{{ metrics }}

- Test compute: {{ test_macs }}
"""


@dataclass
class PerceptionOutput:
    """One prediction at the input's size.

    Attributes:
        prediction: depth (H, W) float32, flow (H, W, 2) float32 in pixels, amodal (H, W) bool.
        uncertainty: (H, W) float32 spread of the ensemble members (median absolute deviation for the median
            reducer, standard deviation for the mean), averaged over channels; None for one member.
        task: The task that predicted it.
    """

    prediction: np.ndarray
    uncertainty: np.ndarray | None
    task: str


class PerceptionPipeline(
    ModelHubMixin,
    library_name="diffperc",
    tags=["diffperc", "dense-prediction", "diffusion-transformer"],
    model_card_template=MODEL_CARD,
):
    """A fine-tuned perception model with its codec, tasks, sampler and pre/postprocessing, loadable from the Hub.

    Built from an export's ``config.json`` (``diffperc.export.export_model`` writes it); ``from_pretrained`` also loads
    the network's weights. ``pipe(...)`` predicts one input; see ``__call__``.

    Args:
        config: The export's configuration: ``network`` (``dit_config``, ``moe``, ``task_routes``), ``tasks`` and
            ``codec`` (``class_path`` + ``init_args``), ``predict_task``, ``diffusion``, ``inference`` and
            ``processing`` (``resolution``, ``multiple``).
    """

    def __init__(self, config: dict):
        self.config = _check_config(config)
        tasks = [_instantiate(spec, Task, f"tasks[{i}]") for i, spec in enumerate(config["tasks"])]
        codec = _instantiate(config["codec"], Codec, "codec")
        network = config["network"]["dit_config"]
        # The recipe around the network (codec, tasks, sampler, `predict_batch`) is the LightningModule's. It is
        # built around a one-block stand-in of the network's width, so no full-size random network is initialised;
        # the exported network replaces it (`set_network`, which `from_pretrained` calls with the weights).
        stand_in = Backbone(
            name="t1",
            depth=1,
            hidden_size=network["hidden_size"],
            num_heads=network["num_heads"],
            patch_size=network["patch_size"],
        )
        self.module = PerceptionFinetuning(
            task=tasks,
            codec=codec,
            backbone=stand_in,
            image_size=network["input_size"] * codec.downsample,
            diffusion=config["diffusion"],
            inference=config["inference"],
            predict_task=config["predict_task"],
        ).eval()
        self._has_network = False

    # ------------------------------------------------------------------ network and device
    def set_network(self, net: torch.nn.Module) -> None:
        """Installs the network (rebuilt by ``diffperc.models.build``) the pipeline predicts with."""
        self.module.net = net.to(self.device).eval()
        self._has_network = True

    @property
    def net(self) -> torch.nn.Module:
        return self.module.net

    @property
    def tasks(self) -> list[str]:
        """The task names, in task-id order; ``task=`` picks one of them."""
        return [t.name for t in self.module.tasks]

    @property
    def device(self) -> torch.device:
        return self.module.device

    def to(self, device: str | torch.device) -> "PerceptionPipeline":
        """Moves the model to ``device`` (``"cuda"``, ``"cpu"``, ...); returns the pipeline, as diffusers does."""
        self.module.to(device)
        return self

    # ------------------------------------------------------------------ inference
    def __call__(
        self,
        *inputs,
        task: str | None = None,
        num_steps: int | None = None,
        ensemble_size: int | None = None,
        reducer: str | None = None,
        seed: int | None = None,
        processing_resolution: int | None = None,
    ) -> PerceptionOutput:
        """Predicts one input at its own size.

        Args:
            *inputs: Depth: an image. Flow: two frames of one size. Amodal: an image and the visible part of the
                object as a mask of the same size. An image is a file path, a PIL image, a uint8 (H, W, 3) RGB array,
                or a (3, H, W) tensor, float in [0, 1] (quantised to 8 bits, as a file's pixels are, so every input
                type gives the same prediction) or uint8. A mask is a path, a PIL image, a (H, W) bool or uint8
                array (> 127 is on), or a (H, W) / (1, H, W) tensor (bool, uint8, or float in [0, 1]).
            task: For a model of several tasks, which one (``pipe.tasks``); default the export's ``predict_task``.
            num_steps: DDIM steps (default: the export's ``inference.num_steps``).
            ensemble_size: Predictions from different noise merged into one (default: the export's).
            reducer: How members merge: ``median``, ``mean`` or ``median_compilation`` (default: the task's).
            seed: Seed of the sampling noise (default: the export's); the same seed gives the same prediction.
            processing_resolution: Long side the input is resized to for the network (default: the export's,
                ``diffperc predict``'s ``--data.predict_resolution``).
        """
        if not self._has_network:
            raise RuntimeError(
                "This pipeline holds no trained network: load one with `PerceptionPipeline.from_pretrained`"
            )
        task_id = self._task_id(task)
        chosen = self.module.tasks[task_id]
        settings = self._settings(num_steps, ensemble_size, reducer, seed)
        chosen.check_reducer(reducer, "reducer")
        resolution = self.config["processing"]["resolution"] if processing_resolution is None else processing_resolution
        if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
            raise ValueError(f"`processing_resolution` must be a positive int, got {resolution!r}")
        multiple = self.config["processing"]["multiple"]
        layout = chosen.predict_layout
        images = self._read_inputs(inputs, chosen, layout)

        # 1. Resize the long side to the processing resolution, pad to the multiple, map to [-1, 1].
        h0, w0 = images[0].shape[:2]
        size = processing_size(h0, w0, resolution)
        batch = {"image": to_model_range(fit_image(images[0], size, multiple))}
        if layout == "pairs":
            batch["image2"] = to_model_range(fit_image(images[1], size, multiple))
        elif layout == "masks":
            batch["visible_mask"] = visible_mask(fit_image(images[1], size, multiple, nearest=True))
        batch = {k: v[None].to(self.device) for k, v in batch.items()}  # (1, C, h, w)
        # 2. Sample, decode and merge the ensemble, as `diffperc predict` does (Lightning runs it in inference mode);
        # 3. crop the padding and resize back to the input's size.
        with torch.inference_mode():
            pred, uncertainty = self.module.predict_batch(batch, settings, task_id)
            pred, uncertainty = restore_size(chosen, pred, uncertainty, size, (h0, w0))
            out = _prediction(chosen, pred)
        return PerceptionOutput(
            out, None if uncertainty is None else uncertainty[0, 0].float().cpu().numpy(), chosen.name
        )

    def _task_id(self, task: str | None) -> int:
        if task is None:
            return self.module.tasks.index(self.module.task)
        if task not in self.module.task_index:
            raise ValueError(f"`task` {task!r} is not one of this model's tasks {self.tasks}")
        return self.module.task_index[task]

    def _settings(self, num_steps, ensemble_size, reducer, seed):
        for name, value in (("num_steps", num_steps), ("ensemble_size", ensemble_size), ("seed", seed)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"`{name}` must be an int, got {value!r}")
        for name, value in (("num_steps", num_steps), ("ensemble_size", ensemble_size)):
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}")
        if reducer is not None and reducer not in REDUCERS:
            raise ValueError(f"`reducer` must be one of {REDUCERS}, got {reducer!r}")
        given = dict(num_steps=num_steps, ensemble_size=ensemble_size, reducer=reducer, seed=seed)
        settings = dataclasses.replace(self.module.inference, **{k: v for k, v in given.items() if v is not None})
        check_num_steps(settings.num_steps, self.module.diffusion, flag="num_steps")
        return settings

    def _read_inputs(self, inputs: tuple, task: Task, layout: str) -> list[np.ndarray]:
        """The inputs as uint8 arrays: RGB images (H, W, 3), then a mask (H, W) for the amodal layout."""
        wanted = {"single": ("image",), "pairs": ("frame 1", "frame 2"), "masks": ("image", "mask")}[layout]
        if len(inputs) != len(wanted):
            call = {"single": "pipe(image)", "pairs": "pipe(frame1, frame2)", "masks": "pipe(image, mask)"}[layout]
            raise ValueError(
                f"{task.name} takes {len(wanted)} input{'s' * (len(wanted) > 1)} ({' and '.join(wanted)}: {call}), "
                f"got {len(inputs)}"
            )
        arrays = [_as_mask(x, what) if what == "mask" else _as_image(x, what) for x, what in zip(inputs, wanted)]
        for what, array in zip(wanted[1:], arrays[1:]):
            if array.shape[:2] != arrays[0].shape[:2]:
                raise ValueError(
                    f"{what} is {array.shape[1]}x{array.shape[0]} pixels, {wanted[0]} {arrays[0].shape[1]}x"
                    f"{arrays[0].shape[0]}: they must have the same size"
                )
        return arrays

    # ------------------------------------------------------------------ Hub machinery
    def _save_pretrained(self, save_directory: Path) -> None:
        """Writes ``model.safetensors`` (the network's tensors) and ``config.json``; ``save_pretrained`` adds the
        model card (``README.md``) and ``push_to_hub`` uploads the three."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.module.net.state_dict().items()}
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
        weights = Path(save_directory) / WEIGHTS_NAME
        save_file(tensors, str(weights), metadata=metadata)
        os.chmod(weights, new_file_mode())  # safetensors writes 0600; a plain new file's mode honours the umask
        atomic_write_json(Path(save_directory) / CONFIG_NAME, self.config)

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        card = super().generate_model_card(*args, **kwargs)
        card.data.tags = sorted({*(card.data.tags or []), *self.tasks})
        if self.tasks == ["depth"]:
            card.data.pipeline_tag = "depth-estimation"
        return card

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> "PerceptionPipeline":
        """Loads an export: a folder written by ``diffperc export``, or a Hub id (``org/name``) fetched through the
        Hugging Face cache (``HF_HUB_OFFLINE=1``: from the cache only). Keywords are ``ModelHubMixin``'s
        (``revision``, ``cache_dir``, ``local_files_only``, ``token``, ``force_download``) plus ``device``."""
        unknown = sorted(set(kwargs) - _LOAD_KEYWORDS)
        if unknown:  # diffusers users pass `torch_dtype`: say what is taken instead of a bare TypeError
            raise TypeError(
                f"PerceptionPipeline.from_pretrained takes no {', '.join(f'`{k}`' for k in unknown)}: its keywords are "
                f"{', '.join(f'`{k}`' for k in sorted(_LOAD_KEYWORDS))} (the pipeline runs in float32)"
            )
        source = str(pretrained_model_name_or_path)
        if not Path(source).is_dir():
            if Path(source).exists():
                raise NotADirectoryError(f"{source} is a file: an export is a folder (config.json, model.safetensors)")
            if not _HUB_ID.match(source):
                raise FileNotFoundError(f"No export folder {source}, and it is not a Hub id of the form `org/name`")
        try:
            return super().from_pretrained(source, **kwargs)
        except (EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled) as err:  # not in the cache, not served
            offline = _offline() or kwargs.get("local_files_only")
            how = "downloads are off (HF_HUB_OFFLINE=1)" if offline else "the Hub did not serve it"
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise FileNotFoundError(
                f"Export {source} is not in the Hugging Face cache and {how}: fetch it once with `hf download "
                f"{source}` ({first})"
            ) from err

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        config: dict | None = None,
        device: str | torch.device | None = None,
    ) -> "PerceptionPipeline":
        if config is None:
            raise FileNotFoundError(f"{model_id} has no {CONFIG_NAME}: not a diffperc export (`diffperc export`)")
        if Path(model_id).is_dir():
            weights = Path(model_id) / WEIGHTS_NAME
            if not weights.is_file():
                raise FileNotFoundError(f"{model_id} has no {WEIGHTS_NAME}: an export holds it beside {CONFIG_NAME}")
        else:
            weights = Path(
                hf_hub_download(
                    repo_id=model_id,
                    filename=WEIGHTS_NAME,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    token=token,
                    local_files_only=local_files_only or _offline(),
                )
            )
        pipe = cls(config)
        from safetensors.torch import load_file

        network = config["network"]
        state = load_file(str(weights), device="cpu")
        # Exactly the exported network, weights loaded strictly: one line naming the field that differs otherwise.
        net = rebuild_network(
            state, network["dit_config"], network["moe"], network["task_routes"], weights, "from_pretrained"
        )
        pipe.set_network(net)
        return pipe.to(device) if device is not None else pipe


# ---------------------------------------------------------------------------------------------- config and inputs
_REQUIRED = ("network", "tasks", "codec", "predict_task", "diffusion", "inference", "processing")


def _check_config(config) -> dict:
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(
            f"{CONFIG_NAME} is not a diffperc export's (no `format: {FORMAT}`): write one with `diffperc export`"
        )
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{CONFIG_NAME} has format_version {config.get('format_version')!r}; this diffperc reads "
            f"{FORMAT_VERSION}: export the checkpoint again with this version"
        )
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise ValueError(f"{CONFIG_NAME} lacks {missing}: export the checkpoint again (`diffperc export`)")
    return config


def _instantiate(spec: dict, base: type, key: str):
    """``class_path(**init_args)`` of ``config.json``'s ``key``, for diffperc's own subclasses of ``base`` only: an
    export from anywhere never imports or runs other code."""
    class_path = spec.get("class_path") if isinstance(spec, dict) else None
    module_name, _, name = str(class_path).rpartition(".")
    if not (module_name == "diffperc" or module_name.startswith("diffperc.")):
        raise ValueError(f"{CONFIG_NAME} `{key}` names {class_path!r}: an export loads diffperc's own classes only")
    try:
        cls = getattr(importlib.import_module(module_name), name, None)
    except ImportError:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{CONFIG_NAME} `{key}` names {class_path!r}, which is not a diffperc {base.__name__}")
    init_args = spec.get("init_args") or {}
    try:
        return cls(**init_args)
    except TypeError as err:
        raise ValueError(f"{CONFIG_NAME} `{key}` {class_path}({init_args}): {err}") from err
    except (OSError, ValueError) as err:  # e.g. a VAE folder or Hub id that is not there
        raise type(err)(f"{CONFIG_NAME} `{key}` {class_path}: {err}") from err


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return bool(constants.HF_HUB_OFFLINE) or env


#: The keywords ``from_pretrained`` takes: ``ModelHubMixin``'s download options plus ``device``.
_LOAD_KEYWORDS = frozenset({"revision", "cache_dir", "local_files_only", "token", "force_download", "device"})


def _is_pil(x) -> bool:
    return type(x).__module__.split(".")[0] == "PIL" and hasattr(x, "convert")


def _read_file(x, what: str, flags: int) -> np.ndarray:
    path = Path(x)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    image = decode_image(np.fromfile(path, np.uint8), flags)
    if image is None or image.size == 0:
        raise ValueError(f"{what} {path}: not an image OpenCV can read")
    return image


def _as_image(x, what: str) -> np.ndarray:
    """An image input as a uint8 (H, W, 3) RGB array."""
    if isinstance(x, (str, os.PathLike)):
        return np.ascontiguousarray(_read_file(x, what, cv2.IMREAD_COLOR)[..., ::-1])  # OpenCV reads BGR
    if _is_pil(x):
        return np.asarray(x.convert("RGB"))
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3:
            raise ValueError(
                f"{what} must be a uint8 (H, W, 3) RGB array, got {x.dtype} of shape {x.shape} (a float tensor "
                "(3, H, W) in [0, 1] is taken too)"
            )
        return x
    if isinstance(x, torch.Tensor):
        if x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"{what} must be a (3, H, W) tensor, got shape {tuple(x.shape)}")
        return _quantised(x, what).permute(1, 2, 0).numpy()
    raise TypeError(
        f"{what} must be a path, a PIL image, a uint8 (H, W, 3) array or a (3, H, W) tensor, got {type(x).__name__}"
    )


def _as_mask(x, what: str) -> np.ndarray:
    """A mask input as a uint8 (H, W) array, > 127 on (as ``diffperc predict`` reads ``<name>_mask.png``)."""
    if isinstance(x, (str, os.PathLike)):
        return _read_file(x, what, cv2.IMREAD_GRAYSCALE)
    if _is_pil(x):
        return np.asarray(x.convert("L"))
    if isinstance(x, torch.Tensor):
        if not (x.ndim == 2 or (x.ndim == 3 and x.shape[0] == 1)):
            raise ValueError(f"{what} must be a (H, W) or (1, H, W) tensor, got shape {tuple(x.shape)}")
        return _quantised(x.reshape(x.shape[-2:]), what).numpy()
    if isinstance(x, np.ndarray):
        if x.ndim != 2 or x.dtype not in (np.bool_, np.uint8):
            raise ValueError(f"{what} must be a (H, W) bool or uint8 array, got {x.dtype} of shape {x.shape}")
        return x.astype(np.uint8) * 255 if x.dtype == np.bool_ else x
    raise TypeError(f"{what} must be a path, a PIL image, a (H, W) array or tensor, got {type(x).__name__}")


def _quantised(x: torch.Tensor, what: str) -> torch.Tensor:
    """A tensor as uint8 on the CPU: uint8 as is, bool as 0/255, float in [0, 1] rounded to 255 levels."""
    x = x.detach().cpu()
    if x.dtype == torch.uint8:
        return x
    if x.dtype == torch.bool:
        return x.to(torch.uint8) * 255
    if not x.is_floating_point():
        raise ValueError(f"{what} must be a float tensor in [0, 1] or uint8, got {x.dtype}")
    lo, hi = (float(v) for v in x.aminmax()) if x.numel() else (0.0, 0.0)
    if not (0.0 <= lo and hi <= 1.0):  # also refuses NaN
        raise ValueError(f"{what} must hold values in [0, 1], got [{lo:g}, {hi:g}] (an image in 0..255? divide by 255)")
    return (x.float() * 255).round().to(torch.uint8)


def _prediction(task: Task, pred: torch.Tensor) -> np.ndarray:
    """The task's prediction (1, C, H, W) as the array ``PerceptionOutput.prediction`` holds."""
    if task.predict_layout == "masks" and hasattr(task, "mask"):  # amodal: the whole-object image, thresholded
        return task.mask(pred)[0, 0].cpu().numpy()
    pred = pred[0].float().cpu()
    return pred[0].numpy() if pred.shape[0] == 1 else pred.permute(1, 2, 0).contiguous().numpy()
