"""Marigold's zero-shot depth evaluation sets (NYUv2, KITTI, ETH3D, ScanNet, DIODE) in their preprocessed layouts.

Each class sets only what differs: depth decoding, the valid-mask rule and the depth range, following Marigold's
``src/dataset/*_dataset.py`` and ``config/dataset_depth/*.yaml`` (https://github.com/prs-eth/Marigold). Samples have
the same format as `HypersimDataset`: `image`, `depth` (metres), `valid_mask`, `name`. These are evaluation sets, so
`native_gt` is on by default: a resized sample also holds its ground truth at the native size (`depth_native`,
`valid_native`), where it is scored.
"""

import os
from pathlib import Path

import numpy as np

from diffperc.data.io import check_finite
from diffperc.data.real.common import missing_data
from diffperc.data.real.depth import DepthListDataset

Resolution = int | tuple[int, int] | None


class NYUv2Dataset(DepthListDataset):
    """NYUv2 labelled test set: uint16 depth in millimetres, valid in (1e-3, 10) m inside the Eigen crop.

    Layout (Marigold's ``nyu_labeled_extracted``): ``<root>/test/<scene>/rgb_NNNN.png`` (480x640 RGB),
    ``depth_NNNN.png`` (uint16 mm, raw sensor depth, 0 = missing) and ``filled_NNNN.png`` (inpainted, unused for
    evaluation); list lines "rgb depth filled" relative to ``<root>``
    (``data_split/nyu_depth/labeled/filename_list_test.txt``).
    """

    _EIGEN_CROP = (slice(45, 471), slice(41, 601))  # rows, cols of the Eigen evaluation area on 480x640
    _EIGEN_HW = (480, 640)

    def __init__(
        self,
        root: str | os.PathLike,
        filename_list: str | os.PathLike,
        resolution: Resolution = None,
        min_depth: float = 1e-3,
        max_depth: float = 10.0,
        eigen_crop: bool = True,
        native_gt: bool = True,
    ) -> None:
        """Reads and validates the filename list.

        Args:
            root: the folder the list's paths are relative to.
            filename_list: the "rgb depth filled" list file.
            resolution: output size: an int side (square), an (H, W) pair, or None to keep 480x640.
            min_depth: depths at or below this (metres) are invalid.
            max_depth: depths at or above this (metres) are invalid.
            eigen_crop: also invalidate pixels outside the Eigen crop (rows 45:471, cols 41:601), as Marigold does.
            native_gt: when resized, also return the native-size ground truth (`depth_native`, `valid_native`) to
                score at, as Marigold does.
        """
        super().__init__(root, filename_list, resolution, min_depth, max_depth, native_gt)
        self.eigen_crop = eigen_crop

    def _valid_mask(self, depth: np.ndarray, fields: list[str]) -> np.ndarray:
        valid = super()._valid_mask(depth, fields)
        if self.eigen_crop:
            if depth.shape != self._EIGEN_HW:
                raise ValueError(
                    f"The Eigen crop needs {self._EIGEN_HW} depth, {self.root / fields[1]} is {depth.shape}; "
                    "set `eigen_crop` to False for other sizes"
                )
            area = np.zeros_like(valid)
            area[self._EIGEN_CROP] = True
            valid &= area
        return valid


class KITTIDataset(DepthListDataset):
    """KITTI Eigen test split: uint16 depth / 256 in metres, benchmark-cropped, valid in (1e-5, 80) m in the crop.

    Layout (Marigold's ``kitti_eigen_split_test``): ``<root>/<date>/<drive>_sync/image_02/data/NNNNNNNNNN.png``
    (RGB, about 375x1242) and ``<root>/<drive>_sync/proj_depth/groundtruth/image_02/NNNNNNNNNN.png`` (uint16, metres
    x 256, 0 = no lidar return); list lines "rgb depth focal" relative to ``<root>``
    (``data_split/kitti_depth/eigen_test_files_with_gt.txt``). Lines whose depth is "None" are skipped. With
    `benchmark_crop`, image and depth are cut to the bottom-centre 352x1216 KITTI benchmark window first; the
    evaluation crop (Eigen NIPS'14 or Garg ECCV'16, as fractions of the cropped size) then limits the valid mask.
    """

    depth_scale = 256.0  # KITTI stores metres * 256
    crops = True  # the benchmark crop cuts image and depth alike
    _BENCHMARK_HW = (352, 1216)
    # (top, bottom, left, right) as fractions of the ground-truth size; the constants of the usual KITTI eval code.
    _EVAL_CROPS = {
        "garg": (0.40810811, 0.99189189, 0.03594771, 0.96405229),
        "eigen": (0.3324324, 0.91351351, 0.0359477, 0.96405229),
    }

    def __init__(
        self,
        root: str | os.PathLike,
        filename_list: str | os.PathLike,
        resolution: Resolution = None,
        min_depth: float = 1e-5,
        max_depth: float = 80.0,
        benchmark_crop: bool = True,
        eval_crop: str | None = "eigen",
        native_gt: bool = True,
    ) -> None:
        """Reads and validates the filename list.

        Args:
            root: the folder the list's paths are relative to.
            filename_list: the "rgb depth focal" list file.
            resolution: output size: an int side (square), an (H, W) pair, or None to keep 352x1216 (after the crop).
            min_depth: depths at or below this (metres) are invalid.
            max_depth: depths at or above this (metres) are invalid.
            benchmark_crop: cut image and depth to the bottom-centre 352x1216 window, as Marigold does.
            eval_crop: "eigen" (Marigold's test setting), "garg", or None for no evaluation crop.
            native_gt: when resized, also return the native-size ground truth (`depth_native`, `valid_native`) to
                score at, as Marigold does.
        """
        if eval_crop is not None and eval_crop not in self._EVAL_CROPS:
            raise ValueError(f"`eval_crop` must be one of {list(self._EVAL_CROPS)} or None, got {eval_crop!r}")
        super().__init__(root, filename_list, resolution, min_depth, max_depth, native_gt)
        self.benchmark_crop = benchmark_crop
        self.eval_crop = eval_crop

    def _keep_entry(self, fields: list[str]) -> bool:
        return fields[1] != "None"  # frames without projected lidar ground truth

    def _crop(self, arr: np.ndarray, path: Path) -> np.ndarray:
        if not self.benchmark_crop:
            return arr
        (h, w), (ch, cw) = arr.shape[:2], self._BENCHMARK_HW
        if h < ch or w < cw:
            raise ValueError(f"{path} is {(h, w)}, smaller than the {ch}x{cw} benchmark crop; set `benchmark_crop`")
        top, left = h - ch, (w - cw) // 2
        return arr[top : top + ch, left : left + cw]

    def _valid_mask(self, depth: np.ndarray, fields: list[str]) -> np.ndarray:
        valid = super()._valid_mask(depth, fields)
        if self.eval_crop is not None:
            h, w = depth.shape
            top, bottom, left, right = self._EVAL_CROPS[self.eval_crop]
            area = np.zeros_like(valid)
            area[int(top * h) : int(bottom * h), int(left * w) : int(right * w)] = True
            valid &= area
        return valid


class ETH3DDataset(DepthListDataset):
    """ETH3D high-res multi-view DSLR images: raw float32 depth in metres, +inf = missing, valid above 1e-5 m.

    Layout (Marigold's ``eth3d``): ``<root>/rgb/<scene>/images/dslr_images/DSC_NNNN.JPG`` (6048x4032 RGB) and
    ``<root>/depth/<scene>_dslr_depth/<scene>/ground_truth_depth/dslr_images/DSC_NNNN.JPG``, which despite its name
    is a headerless little-endian float32 array of the image's H x W; list lines "rgb depth" relative to ``<root>``
    (``data_split/eth3d_depth/eth3d_filename_list.txt``). The depth map's size is taken from its image.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        filename_list: str | os.PathLike,
        resolution: Resolution = None,
        min_depth: float = 1e-5,
        max_depth: float = float("inf"),
        native_gt: bool = True,
    ) -> None:
        """Reads and validates the filename list.

        Args:
            root: the folder the list's paths are relative to.
            filename_list: the "rgb depth" list file.
            resolution: output size: an int side (square), an (H, W) pair, or None to keep 4032x6048.
            min_depth: depths at or below this (metres) are invalid.
            max_depth: depths at or above this (metres) are invalid (Marigold: no upper limit).
            native_gt: when resized, also return the native-size ground truth (`depth_native`, `valid_native`) to
                score at, as Marigold does.
        """
        super().__init__(root, filename_list, resolution, min_depth, max_depth, native_gt)

    def _read_depth(self, path: Path, image_hw: tuple[int, int]) -> np.ndarray:
        if not path.is_file():
            raise FileNotFoundError(f"Depth file not found: {path}")
        data = path.read_bytes()
        h, w = image_hw
        if len(data) != h * w * 4:
            raise ValueError(f"ETH3D depth {path} has {len(data)} bytes, expected {h * w * 4} for {h}x{w} float32")
        depth = np.frombuffer(data, dtype="<f4").reshape(h, w).astype(np.float32)
        depth[depth == np.inf] = 0.0  # ETH3D marks pixels without ground truth as +inf
        check_finite(depth, path, "Depth")  # NaN or -inf: a corrupt file, not a missing measurement
        return depth


class ScanNetDataset(DepthListDataset):
    """ScanNet validation frames: uint16 depth in millimetres, valid in (1e-3, 10) m.

    Layout (Marigold's ``scannet_val_sampled_800_1``): ``<root>/<scene>/color/NNNNNN.jpg`` (RGB, 480x640, resized
    to the depth size) and ``<root>/<scene>/depth/NNNNNN.png`` (uint16 mm, 0 = missing); list lines "rgb depth"
    relative to ``<root>`` (``data_split/scannet_depth/scannet_val_sampled_list_800_1.txt``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        filename_list: str | os.PathLike,
        resolution: Resolution = None,
        min_depth: float = 1e-3,
        max_depth: float = 10.0,
        native_gt: bool = True,
    ) -> None:
        """Reads and validates the filename list.

        Args:
            root: the folder the list's paths are relative to.
            filename_list: the "rgb depth" list file.
            resolution: output size: an int side (square), an (H, W) pair, or None to keep 480x640.
            min_depth: depths at or below this (metres) are invalid.
            max_depth: depths at or above this (metres) are invalid.
            native_gt: when resized, also return the native-size ground truth (`depth_native`, `valid_native`) to
                score at, as Marigold does.
        """
        super().__init__(root, filename_list, resolution, min_depth, max_depth, native_gt)


class DIODEDataset(DepthListDataset):
    """DIODE validation set (indoor and outdoor): float depth in metres (.npy), valid where the mask file says so.

    Layout (Marigold's ``diode_val``): ``<root>/{indoors,outdoor}/scene_NNNNN/scan_NNNNN/<stem>.png`` (768x1024
    RGB), ``<stem>_depth.npy`` (float32, (H, W) or (H, W, 1), metres) and ``<stem>_depth_mask.npy`` (the sensor's
    validity mask); list lines "rgb depth mask" relative to ``<root>``
    (``data_split/diode_depth/diode_val_all_filename_list.txt``). As in Marigold, the mask file alone is the valid
    mask; `min_depth` and `max_depth` (the scanner's 0.6-350 m range) are kept for clipping predictions.
    """

    num_paths = 3

    def __init__(
        self,
        root: str | os.PathLike,
        filename_list: str | os.PathLike,
        resolution: Resolution = None,
        min_depth: float = 0.6,
        max_depth: float = 350.0,
        native_gt: bool = True,
    ) -> None:
        """Reads and validates the filename list.

        Args:
            root: the folder the list's paths are relative to.
            filename_list: the "rgb depth mask" list file.
            resolution: output size: an int side (square), an (H, W) pair, or None to keep 768x1024.
            min_depth: the data set's smallest depth (metres), for clipping predictions; the mask file decides
                validity.
            max_depth: the data set's largest depth (metres), for clipping predictions.
            native_gt: when resized, also return the native-size ground truth (`depth_native`, `valid_native`) to
                score at, as Marigold does.
        """
        super().__init__(root, filename_list, resolution, min_depth, max_depth, native_gt)

    @staticmethod
    def _load_npy(path: Path, what: str) -> np.ndarray:
        if not path.is_file():
            raise FileNotFoundError(f"DIODE {what} not found: {path}")
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"Could not read DIODE {what} {path}: {err}") from err
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim != 2:
            raise ValueError(f"DIODE {what} {path} has shape {arr.shape}, expected (H, W) or (H, W, 1)")
        return arr

    def _read_depth(self, path: Path, image_hw: tuple[int, int]) -> np.ndarray:
        depth = self._load_npy(path, "depth").astype(np.float32)
        check_finite(depth, path, "Depth")
        return depth

    def _valid_mask(self, depth: np.ndarray, fields: list[str]) -> np.ndarray:
        mask_path = self.root / fields[2]
        try:
            mask = self._load_npy(mask_path, "depth mask")
        except FileNotFoundError as err:  # as `_read` does for the image and the depth
            raise missing_data(self.layout, f"{err} (listed in {self.filename_list}, under `root`)") from None
        if mask.shape != depth.shape:
            raise ValueError(f"DIODE depth mask {mask_path} is {mask.shape} but its depth is {depth.shape}")
        return mask > 0


# Data-set name -> reader, for configs and the evaluation loop.
DEPTH_EVAL_DATASETS = {
    "nyuv2": NYUv2Dataset,
    "kitti": KITTIDataset,
    "eth3d": ETH3DDataset,
    "scannet": ScanNetDataset,
    "diode": DIODEDataset,
}
