"""Data throughput on one CPU core: (d) the procedural generators at 32 and 64 px; (g) the real-data readers against
the previous full-size path, reduced-resolution JPEG decoding, the latent cache, and the loader workers a DiT-XL/2
training step on one H100 needs.

To run: python benchmarks/bench_data.py [--quick | --tiny] [--only dg] [--out FILE.md]   (full: 70 s on 2 busy cores)
The process is pinned to one core, torch and OpenCV use one thread, as one DataLoader worker would. The readers read
the real-format samples in ../shared/fixtures when present (files cached in memory: decode and processing, not disk),
else samples written in the same formats from the procedural generators.
"""

import contextlib
import functools
import importlib
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see OMP_NOTE in common.py

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from common import (  # noqa: E402
    Goal,
    Section,
    add_size_args,
    goals_table,
    md_table,
    mode_note,
    setup_threads,
    sig,
    write_markdown,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"

# (module, class): generators that do not import (not written yet, or broken) are listed as such, not fatal.
GENERATORS = [
    ("diffperc.data.procedural", "ProceduralDepth"),
    ("diffperc.data.procedural", "ProceduralFlow"),
    ("diffperc.data.procedural", "ProceduralAmodal"),
    ("diffperc.data.procedural", "ProceduralClasses"),
]
RESOLUTIONS = (32, 64)
_GOAL = 1000.0
# New samples per pass and passes, per size (``common.SIZES``).
_SIZES = {"full": (200, 3), "quick": (30, 1), "tiny": (2, 1)}
# Real readers: reads per timed pass and passes (rounds interleave the previous and the current path).
_READS = {"full": (8, 5), "quick": (4, 2), "tiny": (1, 1)}


@contextlib.contextmanager
def one_core():
    """Pins this process to one core and torch and OpenCV to one thread; restores all three afterwards."""
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    if cores:
        os.sched_setaffinity(0, {min(cores)})
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)
        if cores:
            os.sched_setaffinity(0, cores)


# ----------------------------------------------------------------------------------------------------------------------
# (d) Procedural generators
# ----------------------------------------------------------------------------------------------------------------------


def _rate(dataset, samples: int, repeats: int) -> float:
    """Median samples per CPU-second over ``repeats`` passes of ``samples`` distinct indices (every pass new scenes)."""
    dataset[0]  # warm-up: caches of rays / pixel grids for this resolution
    rates = []
    for r in range(repeats):
        start = time.process_time()
        for i in range(r * samples, (r + 1) * samples):
            dataset[i]
        rates.append(samples / (time.process_time() - start))
    return sorted(rates)[len(rates) // 2]


def run(size: str = "full") -> Section:
    """Times ``dataset[i]`` for every generator and resolution (``size``: full, quick or tiny)."""
    samples, repeats = _SIZES[size]
    rows, goals, missing = [], [], []
    with one_core():
        for module_name, class_name in GENERATORS:
            try:
                cls = getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError) as error:
                missing.append(f"{module_name}.{class_name} ({type(error).__name__}: {error})")
                continue
            rates = {res: _rate(cls("train", samples * repeats, res), samples, repeats) for res in RESOLUTIONS}
            rows.append([class_name, *(sig(rates[res]) for res in RESOLUTIONS)])
            r64 = rates[64]
            goals.append(Goal(f"(d) {class_name} at 64 px, one core", f"{sig(r64)}/s", ">= 1000/s", r64 >= _GOAL))
    body = [
        f"{mode_note(size, f'{samples} samples, {repeats} pass')}"
        f"`dataset[i]` (render + tensors) for {samples} new indices per pass, median of {repeats} passes, process "
        f"pinned to one core with torch at 1 thread; samples per CPU-second of the process, so a busy machine's "
        "neighbours do not count.",
        "",
        md_table(["generator", *(f"samples/s at {r} px" for r in RESOLUTIONS)], rows),
    ]
    if missing:
        body += ["", "Not measured (did not import): " + "; ".join(missing)]
    return Section("(d) Procedural data generators", "\n".join(body), goals)


# ----------------------------------------------------------------------------------------------------------------------
# (g) Real-data readers: the previous path, kept here for the side-by-side
# ----------------------------------------------------------------------------------------------------------------------
# How the readers decoded and converted a sample before the current version, step for step: full-size BGR decode,
# a strided BGR -> RGB copy, float conversions at full size, and numpy transposes copied into tensors.


def _prev_rgb(path: Path) -> np.ndarray:
    return np.ascontiguousarray(cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1])


def _prev_resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    h, w = img.shape[:2]
    if (h, w) == tuple(hw):
        return img
    shrink = hw[0] <= h and hw[1] <= w
    return cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _prev_nearest(arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if arr.shape[:2] == tuple(hw):
        return arr
    src = arr.astype(np.uint8) if arr.dtype == np.bool_ else arr
    out = cv2.resize(src, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST_EXACT)
    return out.astype(np.bool_) if arr.dtype == np.bool_ else out


def _prev_image(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float() / 127.5 - 1.0


def _prev_mask(path: Path) -> np.ndarray:
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw.ndim == 3:
        raw = raw[:, :, :3].max(axis=2)
    return raw > 0 if raw.max() == 1 else raw > np.iinfo(raw.dtype).max // 2


def _prev_flo(path: Path) -> np.ndarray:
    data = path.read_bytes()
    width, height = (int(v) for v in np.frombuffer(data, dtype="<i4", count=2, offset=4))
    flow = np.frombuffer(data, dtype="<f4", offset=12).reshape(height, width, 2)
    assert not (~np.isfinite(flow)).any()
    return flow.astype(np.float32)


def _prev_hypersim(ds, index: int) -> dict:
    fields, hw = ds.entries[index], ds.resolution
    rgb = _prev_rgb(ds.root / fields[0])
    raw = cv2.imread(str(ds.root / fields[1]), cv2.IMREAD_UNCHANGED)
    depth = (raw.astype(np.float32) / np.float32(ds.depth_scale)).astype(np.float32)
    assert np.isfinite(depth).all() and not (depth < 0).any()
    valid = (depth > ds.min_depth) & (depth < ds.max_depth)
    out = {}
    if ds.native_gt:
        out["depth_native"] = torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))[None]
        out["valid_native"] = torch.from_numpy(np.ascontiguousarray(valid, dtype=np.bool_))[None]
    rgb, depth, valid = _prev_resize(rgb, hw), _prev_nearest(depth, hw), _prev_nearest(valid, hw)
    out["image"] = _prev_image(rgb)
    out["depth"] = torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))[None]
    out["valid_mask"] = torch.from_numpy(np.ascontiguousarray(valid, dtype=np.bool_))[None]
    return out


def _prev_chairs(ds, index: int) -> dict:
    paths = [ds.data_dir / f"{ds.ids[index]}{s}" for s in ("_img1.ppm", "_img2.ppm", "_flow.flo")]
    img1, img2, flow = _prev_rgb(paths[0]), _prev_rgb(paths[1]), _prev_flo(paths[2])
    flow_orig = torch.from_numpy(flow.transpose(2, 0, 1).copy())
    img1, img2 = _prev_resize(img1, ds.resolution), _prev_resize(img2, ds.resolution)
    h, w = flow.shape[:2]
    flow = _prev_resize(flow.astype(np.float32), ds.resolution)
    flow[..., 0] *= ds.resolution[1] / w
    flow[..., 1] *= ds.resolution[0] / h
    return {
        "image": _prev_image(img1),
        "image2": _prev_image(img2),
        "flow": torch.from_numpy(np.ascontiguousarray(flow.transpose(2, 0, 1))),
        "valid_mask": torch.ones(1, *flow.shape[:2], dtype=torch.bool),
        "flow_orig": flow_orig,
    }


def _prev_pix2gestalt(ds, index: int) -> dict:
    sample_id, hw = ds.ids[index], ds.resolution
    image, whole = _prev_rgb(ds._path("image", sample_id)), _prev_rgb(ds._path("whole", sample_id))
    visible, whole_mask = _prev_mask(ds._path("visible_mask", sample_id)), _prev_mask(ds._path("whole_mask", sample_id))
    image, whole = _prev_resize(image, hw), _prev_resize(whole, hw)
    visible, whole_mask = _prev_nearest(visible, hw), _prev_nearest(whole_mask, hw)
    return {
        "image": _prev_image(image),
        "visible_mask": torch.from_numpy(np.ascontiguousarray(visible, dtype=np.bool_))[None].float(),
        "whole": _prev_image(whole),
        "whole_mask": torch.from_numpy(np.ascontiguousarray(whole_mask, dtype=np.bool_))[None],
    }


def _max_abs_diff(a: dict, b: dict) -> float:
    """Largest difference over the tensors both samples hold (0 = the same values)."""
    keys = [k for k in a if torch.is_tensor(a[k]) and k in b]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)


# ----------------------------------------------------------------------------------------------------------------------
# (g) Sample files: the shared fixtures, or the same formats written from the procedural generators
# ----------------------------------------------------------------------------------------------------------------------


def _write_samples(folder: Path) -> Path:
    """Hypersim (768x1024), FlyingChairs (384x512) and pix2gestalt (256x256) samples in their formats, rendered by the
    procedural generators (fewer fine details than photos: PNG decodes a little faster)."""
    from diffperc.data.io import write_flo
    from diffperc.data.procedural import render_amodal_scene, render_depth_scene, render_flow_pair

    rng = np.random.default_rng(0)
    scene = folder / "Hypersim_small" / "val" / "ai_000_000"
    scene.mkdir(parents=True)
    rgb, depth = render_depth_scene(rng, 768, 1024)
    cv2.imwrite(str(scene / "rgb_cam_00_fr0000.png"), (rgb[:, :, ::-1] * 255).astype(np.uint8))
    cv2.imwrite(str(scene / "depth_plane_cam_00_fr0000.png"), np.clip(depth * 1000, 0, 65535).astype(np.uint16))
    lines = "ai_000_000/rgb_cam_00_fr0000.png ai_000_000/depth_plane_cam_00_fr0000.png\n"
    (folder / "Hypersim_small" / "filename_list_val.txt").write_text(lines)
    chairs = folder / "FlyingChairs_small"
    (chairs / "data").mkdir(parents=True)
    pair = render_flow_pair(rng, 384, 512)
    for key, name in (("image", "00001_img1.ppm"), ("image2", "00001_img2.ppm")):
        cv2.imwrite(str(chairs / "data" / name), (pair[key][:, :, ::-1] * 255).astype(np.uint8))
    write_flo(chairs / "data" / "00001_flow.flo", pair["flow"])
    (chairs / "FlyingChairs_train_val.txt").write_text("1\n")
    p2g = folder / "Pix2Gestalt_small"
    scene = render_amodal_scene(rng, 256, 256)
    for key, sub, suffix in (
        ("image", "occlusion", "occlusion"),
        ("visible_mask", "visible_object_mask", "visible_mask"),
        ("whole", "whole", "whole"),
        ("whole_mask", "whole_mask", "whole_mask"),
    ):
        (p2g / sub).mkdir(parents=True)
        arr = scene[key]
        arr = (arr * 255).astype(np.uint8) if arr.ndim == 2 else (arr[:, :, ::-1] * 255).astype(np.uint8)
        cv2.imwrite(str(p2g / sub / f"10000000_{suffix}.png"), arr)
    return folder


def _readers(root: Path) -> list[tuple[str, object, callable]]:
    """(row label, current reader, previous path) at the paper recipes' resolutions."""
    from diffperc.data import FlyingChairsDataset, HypersimDataset, Pix2GestaltDataset

    hypersim, listing = root / "Hypersim_small" / "val", root / "Hypersim_small" / "filename_list_val.txt"
    p2g = root / "Pix2Gestalt_small"
    return [
        ("Hypersim 768x1024 -> 512 (train)", HypersimDataset(hypersim, listing, 512), _prev_hypersim),
        ("Hypersim -> 512 + native GT (val)", HypersimDataset(hypersim, listing, 512, native_gt=True), _prev_hypersim),
        ("FlyingChairs 384x512 -> 512", FlyingChairsDataset(root / "FlyingChairs_small", "train", 512), _prev_chairs),
        ("pix2gestalt 256 -> 256 (amodal_xl)", Pix2GestaltDataset(p2g, resolution=256), _prev_pix2gestalt),
        ("pix2gestalt 256 -> 512 (generalist_xl)", Pix2GestaltDataset(p2g, resolution=512), _prev_pix2gestalt),
    ]


def time_cpu_interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, tuple[float, float]]:
    """Median (wall seconds, CPU seconds of this process) per call, rounds interleaved as ``common.time_interleaved``.

    On a loaded machine a pinned process waits for its core: the wall time then measures the neighbours, the CPU
    time what one worker process costs. Samples per CPU-second is the per-core throughput a data loader gets.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {
        name: (float(np.median([t[0] for t in ts])), float(np.median([t[1] for t in ts]))) for name, ts in times.items()
    }


def _read_all(read, dataset, order) -> list[dict]:
    return [read(dataset, i) for i in order]


def _current(dataset, index: int) -> dict:
    return dataset[index]


def _time_readers(root: Path, size: str) -> tuple[list[list], dict[str, float]]:
    reads, repeats = _READS[size]
    rows, rates = [], {}
    for label, ds, previous in _readers(root):
        order = [i % len(ds) for i in range(reads)]
        passes = {"previous": functools.partial(_read_all, previous, ds, order)}
        passes["now"] = functools.partial(_read_all, _current, ds, order)
        times = time_cpu_interleaved(passes, repeats)
        (prev_wall, prev_cpu), (now_wall, now_cpu) = times["previous"], times["now"]
        before, after = reads / prev_cpu, reads / now_cpu
        diff = max(_max_abs_diff(ds[i], previous(ds, i)) for i in range(len(ds)))
        speed_ups = f"{after / before:.2f}x", f"{prev_wall / now_wall:.2f}x"
        rows.append([label, sig(before), sig(after), *speed_ups, f"{diff:g}"])
        rates[label] = after
        rates[label + " (previous)"] = before
    return rows, rates


# ----------------------------------------------------------------------------------------------------------------------
# (g) Reduced-resolution JPEG decoding
# ----------------------------------------------------------------------------------------------------------------------


def _shrink_full(path: Path, hw: tuple[int, int]) -> np.ndarray:
    from diffperc.data.io import read_rgb

    return cv2.resize(read_rgb(path), hw[::-1], interpolation=cv2.INTER_AREA)


def _shrink_reduced(path: Path, hw: tuple[int, int]) -> np.ndarray:
    from diffperc.data.io import read_rgb_at_least

    return cv2.resize(read_rgb_at_least(path, hw)[0], hw[::-1], interpolation=cv2.INTER_AREA)


def _jpeg_rows(root: Path, size: str) -> list[list]:
    """Full decode + area resize vs ``read_rgb_at_least`` + area resize, on JPEG q95 copies of the Hypersim image: at
    its own 768x1024 and tiled 6x6 to ETH3D's 4032x6048 (a photo's detail at every scale)."""
    from diffperc.data.io import read_rgb_at_least

    repeats = _READS[size][1]
    image = cv2.imread(str(next((root / "Hypersim_small" / "val").rglob("rgb_*.png"))))
    sources = {"768x1024": image}
    if size != "tiny":
        sources["4032x6048 (ETH3D)"] = np.tile(image, (6, 6, 1))[:4032, :6048]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, bgr in sources.items():
            path = Path(tmp) / f"{name.split()[0]}.jpg"
            cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
            for target in (256, 512):
                hw = (target, target)
                reduced, _ = read_rgb_at_least(path, hw)
                factor = bgr.shape[0] // reduced.shape[0]
                full_fn = functools.partial(_shrink_full, path, hw)
                fast_fn = functools.partial(_shrink_reduced, path, hw)
                times = time_cpu_interleaved({"full": full_fn, "fast": fast_fn}, repeats)
                diff = np.abs(full_fn().astype(np.int16) - fast_fn().astype(np.int16))
                full_ms, fast_ms = times["full"][1] * 1e3, times["fast"][1] * 1e3
                speed_up = f"{full_ms / fast_ms:.2f}x"
                rows.append(
                    [
                        name,
                        target,
                        f"1/{factor}",
                        sig(full_ms),
                        sig(fast_ms),
                        speed_up,
                        int(diff.max()),
                        f"{diff.mean():.2f}",
                    ]
                )
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# (g) Latent cache
# ----------------------------------------------------------------------------------------------------------------------


def _latent_rows(size: str) -> list[list]:
    """``LatentCache[i]`` samples/s for 4x64x64 latents (512 px through the SD VAE), stored fp32 and bf16, flip on."""
    from torch.utils.data import Dataset

    from diffperc.codecs import Codec
    from diffperc.data.latents import LatentCache, cache_latents

    class _Images(Dataset):
        def __len__(self) -> int:
            return num

        def __getitem__(self, i: int) -> dict:
            return {"image": torch.full((4, 64, 64), float(i % 7)), "label": i % 1000}

    class _Latents(Codec):  # stands in for the VAE: the cache stores whatever encode returns, 4x64x64 here
        latent_channels, downsample = 4, 8

        def encode(self, images: torch.Tensor) -> torch.Tensor:
            return images

    num = {"full": 512, "quick": 128, "tiny": 8}[size]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            cache_latents(_Images(), _Latents(), f"{tmp}/{dtype}", shard_size=256, batch_size=64, dtype=dtype)
            cache = LatentCache(f"{tmp}/{dtype}")
            read = functools.partial(_read_all, _current, cache, range(num))
            cpu = time_cpu_interleaved({"read": read}, _READS[size][1])["read"][1]
            rows.append([f"4x64x64 latents, {dtype} shards", sig(num / cpu)])
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# (g) Loader workers per GPU for the paper's 512 px recipes
# ----------------------------------------------------------------------------------------------------------------------

H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM (the vendor's data sheet)
MFU = 0.40  # an assumption: a good large-transformer training step reaches 35-50%


def _step_macs(size: str, image_px: int, num_conditions: int) -> tuple[int, int]:
    """(DiT-XL/2 forward + backward MACs, SD VAE encoder MACs per image) per sample, counted on the meta device."""
    from diffperc.compute import count_train_macs
    from diffperc.models import build_model

    latent = image_px // 8
    tiny = size == "tiny"
    with torch.device("meta"):  # no memory: only shapes are counted
        net = build_model(
            "DiT-XL/2",
            input_size=latent,
            in_channels=4 * (num_conditions + 1),  # condition latents + the noisy target latent
            learn_sigma=False,
            **(dict(hidden_size=32, depth=1, num_heads=2) if tiny else {}),
        )
    x = torch.empty(1, 4 * (num_conditions + 1), latent, latent, device="meta")
    t = y = torch.zeros(1, dtype=torch.long, device="meta")
    return count_train_macs(net, x, t, y, device="meta"), _vae_encoder_macs(tiny, image_px)


@functools.lru_cache
def _vae_encoder_macs(tiny: bool, image_px: int) -> int:
    """MACs of Stable Diffusion 2's VAE encoder (its vae/config.json) on one image: all that runs in training."""
    from diffusers import AutoencoderKL

    from diffperc.compute import count_macs

    channels = (8, 8, 8, 8) if tiny else (128, 256, 512, 512)
    with torch.device("meta"):
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=channels,
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=min(32, channels[0]),
        )
    encoder = torch.nn.Sequential(vae.encoder, vae.quant_conv)
    return count_macs(encoder, torch.empty(1, 3, image_px, image_px, device="meta"), device="meta")


def _batch_size(config: str) -> int:
    """The per-GPU micro-batch of a shipped recipe (``data.init_args.batch_size``); an override file names its base
    recipe(s) on line 1 (``# base: ...``), whose value it may keep."""
    text = (ROOT / config).read_text()
    first = text.splitlines()[0] if text else ""
    bases = [b.strip() for b in first.removeprefix("# base:").split(",")] if first.startswith("# base:") else []
    found = [_batch_size(base) for base in bases]
    data = (yaml.safe_load(text) or {}).get("data") or {}
    value = (data.get("init_args") or {}).get("batch_size")
    if value is None and not found:
        raise ValueError(f"{config} sets no `data.init_args.batch_size`")
    return int(value if value is not None else found[-1])


def _worker_rows(size: str, rates: dict[str, float]) -> list[list]:
    recipes = [  # task, recipe, image px, conditions, reader row
        ("depth", "configs/depth_xl.yaml", 512, 1, "Hypersim 768x1024 -> 512 (train)"),
        ("flow", "configs/flow_xl.yaml", 512, 2, "FlyingChairs 384x512 -> 512"),
        ("amodal", "configs/amodal_xl.yaml", 256, 2, "pix2gestalt 256 -> 256 (amodal_xl)"),
    ]
    rows = []
    for task, config, px, conditions, reader in recipes:
        dit, vae = _step_macs(size, px, conditions)
        per_sample = dit + (conditions + 1) * vae  # the frozen VAE encodes every condition and the target
        samples_per_s = MFU * H100_BF16_TFLOPS * 1e12 / (2 * per_sample)
        batch = _batch_size(config)
        before, after = rates[reader + " (previous)"], rates[reader]
        workers = f"{math.ceil(samples_per_s / before)} -> {math.ceil(samples_per_s / after)}"
        rows.append(
            [
                f"{task} ({config.split('/')[-1]}, {px} px)",
                f"{dit / 1e9:.1f}",
                f"{conditions + 1} x {vae / 1e9:.1f}",
                f"{2 * per_sample / 1e12:.2f}",
                f"{samples_per_s:.1f}",
                f"{batch} ({samples_per_s / batch:.2f} steps/s)",
                f"{sig(before)} -> {sig(after)}",
                workers,
            ]
        )
    return rows


def run_readers(size: str = "full") -> Section:
    """(g): the real-data readers, reduced JPEG decoding, the latent cache and the loader workers per GPU."""
    with contextlib.ExitStack() as stack:
        if FIXTURES.is_dir():
            root, source = FIXTURES, "the shared real-format samples (1 Hypersim, 1 + 1 FlyingChairs, 3 pix2gestalt)"
        else:
            root = _write_samples(Path(stack.enter_context(tempfile.TemporaryDirectory())))
            source = "samples in the real formats rendered by the procedural generators (no shared fixtures here)"
        with one_core():
            reader_rows, rates = _time_readers(root, size)
            jpeg_rows = _jpeg_rows(root, size)
            latent_rows = _latent_rows(size)
        worker_rows = _worker_rows(size, rates)
    reads, repeats = _READS[size]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    body = [
        f"{mode_note(size, f'{reads} reads, {repeats} rounds, tiny DiT and VAE for the MACs')}"
        f"Reading {source}: `dataset[i]` (decode, checks, resize, tensors), {reads} reads per pass, median of "
        f"{repeats} interleaved rounds of the previous and the current path, process pinned to one core with torch "
        f"and OpenCV at 1 thread; load average {load} at the start. Rates are samples per CPU-second of the pinned "
        "process (what one loader worker delivers per core; on a busy machine the wall clock also counts the "
        "neighbours), the wall-clock speed-up is the check. Previous = the readers before this version (full-size "
        "BGR decode, strided RGB copy, float conversions at full size, transposed copies), kept in this file; max abs "
        "diff is between the two paths' tensors (0 = identical).",
        "",
        md_table(
            ["reader (paper resolution)", "previous /s", "now /s", "speed-up", "wall-clock speed-up", "max abs diff"],
            reader_rows,
        ),
        "",
        "Reduced-resolution decoding (`diffperc.data.io.read_rgb_at_least`): a JPEG is decoded at 1/2, 1/4 or 1/8 "
        "scale when that keeps at least twice the target on both sides, then area-averaged to the target. Hypersim, "
        "FlyingChairs and pix2gestalt are PNG / PPM, which OpenCV's reduced modes decode fully and then resize (no "
        "gain), and Hypersim's 768 rows leave no 2x margin over 512 anyway: their readers decode at full size. It "
        "pays on the evaluation sets' large JPEGs (ETH3D). JPEG q95 copies of the Hypersim image, differences in "
        "levels of 255 against full decode + area resize (times: CPU ms per image):",
        "",
        md_table(
            ["JPEG", "target px", "decoded at", "full ms", "reduced ms", "speed-up", "max abs diff", "mean abs diff"],
            jpeg_rows,
        ),
        "",
        md_table(["latent cache (`LatentCache[i]`, one core)", "samples per CPU-second"], latent_rows),
        "",
        f"Loader workers per GPU, for one H100 SXM at an assumed {MFU:.0%} MFU of its {H100_BF16_TFLOPS:.0f} TFLOP/s "
        "dense bf16 peak: step MACs per sample = DiT-XL/2 forward + backward (`count_train_macs`, exact) + the frozen "
        "SD 2 VAE encoder on every condition image and the target (`count_macs`); FLOPs = 2 x MACs; batch = the "
        "recipe's per-GPU `batch_size`. Workers = GPU samples/s / one worker's samples/s (this CPU, previous -> "
        "current reader). Cached latents skip the VAE and the decode: a 4x64x64 latent read is "
        f"{latent_rows[0][1]} samples/s on one core.",
        "",
        md_table(
            [
                "recipe",
                "DiT GMACs / sample",
                "VAE GMACs / image",
                "TFLOP / sample",
                "samples/s per GPU",
                "batch per GPU",
                "reader samples/s per core",
                "workers per GPU",
            ],
            worker_rows,
        ),
    ]
    return Section("(g) Real-data readers, latent cache and loader workers", "\n".join(body))


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_args(parser)
    parser.add_argument("--out", default=None, help="Also write the sections to a markdown file")
    parser.add_argument("--only", default="dg", help="Sections to run: d (procedural), g (real readers), or dg")
    args = parser.parse_args()
    setup_threads()
    text = ""
    for key, runner in (("d", run), ("g", run_readers)):
        if key in args.only:
            start = time.perf_counter()
            section = runner(args.size)
            text += section.markdown() + f"\n(section wall time: {time.perf_counter() - start:.0f} s)\n"
            if section.goals:
                text += "\n" + goals_table(section.goals) + "\n"
            text += "\n"
    print(text, end="")
    if args.out:
        write_markdown(args.out, text)


if __name__ == "__main__":
    main()
