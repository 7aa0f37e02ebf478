"""What ``diffperc predict`` (``ImageFolder`` and ``PredictionWriter``) and ``PerceptionPipeline`` share around the
model: an input resized so its long side is the processing resolution, padded to the model's multiple and mapped to
[-1, 1]; a prediction cropped and resized back to the input's size. Both go through these functions, so a folder
predicted by the CLI and an image given to the pipeline are processed alike.
"""

import cv2
import numpy as np
import torch
import torch.nn.functional as F


def processing_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(h, w) of an input of (``height``, ``width``) pixels with its long side resized to ``resolution``."""
    scale = resolution / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def fit_image(image: np.ndarray, size: tuple[int, int], multiple: int, nearest: bool = False) -> torch.Tensor:
    """An image (H, W) or (H, W, C), uint8, resized to ``size`` = (h, w) (area when shrinking, bilinear when growing,
    nearest for masks) and padded right and bottom to a multiple of ``multiple`` by repeating its edge (cropped off
    afterwards, see `restore_size`): a float tensor (C, h', w') with the image's values (0..255) and channel order."""
    h, w = size
    shrink = w < image.shape[1]
    interp = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    out = cv2.resize(image, (w, h), interpolation=interp)
    out = torch.from_numpy(np.ascontiguousarray(out if out.ndim == 3 else out[..., None])).permute(2, 0, 1)
    return F.pad(out.float()[None], (0, -w % multiple, 0, -h % multiple), mode="replicate")[0]


def to_model_range(image: torch.Tensor) -> torch.Tensor:
    """8-bit values (0..255) -> the [-1, 1] the codecs take."""
    return image / 127.5 - 1


def visible_mask(mask: torch.Tensor) -> torch.Tensor:
    """A mask fitted by `fit_image` (``nearest``; 0..255) -> the float 0/1 mask the amodal task takes."""
    return (mask > 127).float()


def restore_size(
    task, pred: torch.Tensor, uncertainty: torch.Tensor | None, resized_size, orig_size
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Undoes `fit_image` on one prediction (1, C, h', w') and its uncertainty (1, 1, h', w'): crops the padding
    off (``resized_size`` = (h, w)), then resizes to ``orig_size`` = (H, W) through the task
    (``task.resize_prediction``: flows are rescaled to the new pixels) and bilinearly for the uncertainty."""
    h, w = (int(v) for v in resized_size)
    size = tuple(int(v) for v in orig_size)
    pred = task.resize_prediction(pred[..., :h, :w], size)
    if uncertainty is not None:
        uncertainty = F.interpolate(uncertainty[..., :h, :w].float(), size=size, mode="bilinear", align_corners=False)
    return pred, uncertainty
