"""Fetches pretrained weights: the official DiT-XL/2 checkpoints by name, Hugging Face Hub repositories by id.

To run: ``diffperc download DiT-XL/2-256`` (or ``DiT-XL/2-512``, ``facebook/DiT-XL-2-256``,
``stabilityai/sd-vae-ft-mse``). It prints the flag to pass, e.g. ``--model.init_args.init_from <path>``, on stdout.
"""

import hashlib
import http.client
import json
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from diffperc.utils import atomic_write


@dataclass(frozen=True)
class Release:
    """One file of the official DiT release."""

    filename: str
    url: str
    sha256: str | None  # None: no published checksum to verify against


# The official DiT release (https://github.com/facebookresearch/DiT, README "Sampling"). The release publishes no
# checksums (its download.py verifies none), so the SHA-256 values are None: a download is unverified and prints the
# hash it computed. Record a value here only once two independent downloads agree on it.
OFFICIAL = {
    "DiT-XL/2-256": Release(
        "DiT-XL-2-256x256.pt", "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt", sha256=None
    ),
    "DiT-XL/2-512": Release(
        "DiT-XL-2-512x512.pt", "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt", sha256=None
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_OFFICIAL_LIKE = re.compile(r"^DiT-\w+[/-]\d")  # DiT-XL/2-1024 is a mistyped release, not a Hub id
_CHUNK = 1 << 20
# Weight formats a repository may hold twice; safetensors wins when present (no pickle, memory-mapped).
_PICKLED = (".bin", ".ckpt", ".pt", ".pth")
_OTHER_FRAMEWORKS = (".msgpack", ".h5", ".onnx", ".onnx_data", ".ot", ".gguf")
_DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids downloads (read at each call, so a test or a shell can change it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def default_dir() -> Path:
    """Where official checkpoints go: ``$HF_HOME/diffperc`` when ``HF_HOME`` is set (it is how people put model
    weights on a big disk, and these are 2.7 GB each), else ``$XDG_CACHE_HOME/diffperc`` or ``~/.cache/diffperc``
    (beside the Hugging Face cache). Never inside the Hub cache itself: its layout is the Hub's own."""
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "diffperc"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "diffperc"


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache as huggingface_hub resolves it (``HF_HUB_CACHE``, ``HF_HOME/hub``, then
    ``~/.cache/huggingface/hub``), read at each call rather than once at import."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def official_release(name: str) -> Release | None:
    """The release named ``DiT-XL/2-256`` (also ``DiT-XL-2-256``, or its file name ``DiT-XL-2-256x256.pt``)."""
    for key, release in OFFICIAL.items():
        if name in (key, key.replace("/", "-"), release.filename):
            return release
    return None


def fetch_command(path: str | Path) -> str | None:
    """The command that fetches the official checkpoint a missing ``path`` names (by its file name), if any."""
    path = Path(path)
    for key, release in OFFICIAL.items():
        if path.name == release.filename:
            return f"diffperc download {key} --out {path.parent}"
    return None


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, dest: str | Path, sha256: str | None = None) -> str:
    """Downloads ``url`` to ``dest`` atomically and returns the file's SHA-256.

    The bytes go to a temporary file in ``dest``'s folder, hashed on the way; with ``sha256`` given, a mismatch
    deletes it and raises, otherwise it is fsynced and renamed onto ``dest``. An interrupted download leaves no file.

    Raises:
        ValueError: the hash differs from ``sha256`` (naming the URL and both hashes), or the download failed.
    """
    dest = Path(dest)
    digest = hashlib.sha256()

    def _write(f) -> None:
        try:
            response = urllib.request.urlopen(url, timeout=60)  # noqa: S310 (https:// or, in tests, file://)
        except (urllib.error.URLError, OSError) as err:
            raise ValueError(f"Could not download {url}: {getattr(err, 'reason', err)}") from err
        with response:
            total = int(response.headers.get("Content-Length") or 0)
            done, shown = 0, 0
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as err:  # a dropped connection, not the disk
                    raise ValueError(f"The download of {url} broke off after {done / 1e6:.1f} MB: {err}") from err
                if not chunk:
                    break
                digest.update(chunk)
                f.write(chunk)
                done += len(chunk)
                if total and done * 10 // total > shown:  # a line per 10%, readable in a log file
                    shown = done * 10 // total
                    print(f"  {shown * 10}% of {total / 1e6:.1f} MB", file=sys.stderr, flush=True)
        if total and done != total:  # without a recorded hash, the length is the only check there is
            raise ValueError(f"The download of {url} is incomplete: {done} of {total} bytes; run the command again")
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256.lower():
            raise ValueError(
                f"SHA-256 mismatch for {url}: expected {sha256.lower()}, got {actual}; the download was deleted "
                "(a truncated or altered file); run the command again"
            )

    atomic_write(dest, _write)
    return digest.hexdigest()


def fetch_official(name: str, out: str | Path | None = None) -> tuple[Path, str, bool]:
    """Downloads an official DiT checkpoint into ``out`` (default ``default_dir()``) unless it is already there.

    Returns:
        The file, its SHA-256 and whether that hash was checked against a recorded one.
    """
    release = official_release(name)
    if release is None:
        raise ValueError(f"Unknown checkpoint {name!r}: the official ones are {', '.join(OFFICIAL)}")
    dest = Path(out).expanduser() if out is not None else default_dir()
    dest = dest / release.filename
    if dest.is_file():
        print(f"{dest} is already there; checking it", file=sys.stderr)
        actual = sha256_of(dest)
        if release.sha256 is not None and actual != release.sha256:
            raise ValueError(
                f"{dest} is not {release.url}: SHA-256 expected {release.sha256}, got {actual}; delete it and run "
                "the command again"
            )
        return dest, actual, release.sha256 is not None
    if offline() and not release.url.startswith("file://"):
        raise FileNotFoundError(
            f"{dest} is not there and downloads are off (HF_HUB_OFFLINE=1): unset it, or copy {release.url} there"
        )
    print(f"Downloading {release.url} -> {dest}", file=sys.stderr, flush=True)
    actual = download_file(release.url, dest, release.sha256)
    return dest, actual, release.sha256 is not None


def _choose_files(files: list[str], subfolder: str | None) -> list[str]:
    """The files of a Hub repository worth fetching: those under ``subfolder`` (and the top-level
    ``model_index.json``), one weight format per folder (safetensors over pickles, no Flax/TF/ONNX copies), no
    ``fp16`` variant beside its full-precision file."""
    if subfolder:
        prefix = subfolder.strip("/") + "/"
        files = [f for f in files if f.startswith(prefix) or f == "model_index.json"]
    folders_with_safetensors = {os.path.dirname(f) for f in files if f.endswith(".safetensors")}
    names = set(files)
    chosen = []
    for f in files:
        if f.endswith(_OTHER_FRAMEWORKS):
            continue
        if f.endswith(_PICKLED) and os.path.dirname(f) in folders_with_safetensors:
            continue
        variant = re.sub(r"\.(fp16|bf16)\.", ".", f)
        if variant != f and variant in names:
            continue
        chosen.append(f)
    return chosen


def snapshot(repo_id: str, subfolder: str | None = None, revision: str | None = None, cache_dir=None) -> Path:
    """A Hub repository's folder in the Hugging Face cache (``models--org--name/snapshots/<rev>``), downloading the
    files ``_choose_files`` picks unless ``HF_HUB_OFFLINE`` is set, in which case only the cache is read.

    Raises:
        FileNotFoundError: offline and the repository is not in the cache (names the ``hf download`` command).
        ValueError: the download failed (no such repository, no network, ...).
    """
    from huggingface_hub import HfApi, snapshot_download

    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else hub_cache_dir()
    fetch = f"hf download {repo_id}" + (f" --include '{subfolder.strip('/')}/*'" if subfolder else "")
    if offline():
        try:
            return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
        except Exception as err:  # LocalEntryNotFoundError, or a cache folder without the revision
            raise FileNotFoundError(
                f"{repo_id} is not in the Hugging Face cache ({cache_dir}) and downloads are off (HF_HUB_OFFLINE=1): "
                f"fetch it with `{fetch}`"
            ) from err
    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
        allow = _choose_files(files, subfolder)
        if not allow:
            raise ValueError(f"{repo_id} has no files under `{subfolder}`")
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=allow)
    except ValueError:
        raise
    except Exception as err:  # huggingface_hub raises many types: 404, gated repository, no network, ...
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"Could not fetch {repo_id} from the Hugging Face Hub: {first}") from err
    return Path(folder)


def dit_folder(repo_id: str, revision: str | None = None) -> Path:
    """The folder of a Hub DiT: ``transformer/`` of a pipeline repository (``facebook/DiT-XL-2-256``), fetched
    without the rest of the pipeline, else the repository itself (``snapshot``)."""
    subfolder = None
    if not offline():
        from huggingface_hub import HfApi

        try:
            files = HfApi().list_repo_files(repo_id, revision=revision)
        except Exception as err:  # 404, gated repository, no network, ...
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"Could not fetch {repo_id} from the Hugging Face Hub: {first}") from err
        subfolder = "transformer" if any(f.startswith("transformer/") for f in files) else None
    folder = snapshot(repo_id, subfolder, revision)
    return folder / "transformer" if (folder / "transformer").is_dir() else folder


def config_flags(folder: Path) -> list[str]:
    """The diffperc flags that use what a Hub folder holds: ``init_from`` for a DiT (its ``transformer/`` in a
    pipeline), the VAE codec's ``path`` for an AutoencoderKL (its ``vae/`` in a pipeline)."""
    flags = []
    for sub in ("", "transformer", "vae"):
        config = folder / sub / "config.json"
        if not config.is_file():
            continue
        try:
            class_name = json.loads(config.read_text()).get("_class_name")
        except (json.JSONDecodeError, AttributeError):
            continue
        where = folder / sub if sub else folder
        if class_name in _DIT_CLASSES:
            flags.append(f"--model.init_args.init_from {where}")
        elif class_name == "AutoencoderKL":
            flags.append(f"--model.init_args.codec.init_args.path {where}")
    return flags


def main(argv: list[str] | None = None) -> None:
    """``diffperc download NAME [--out DIR]``; its flags are declared in ``diffperc.cli``."""
    from diffperc.cli import parse_command

    args = parse_command("download", argv)
    if official_release(args.name) is not None:
        path, digest, verified = fetch_official(args.name, args.out)
        if verified:
            print(f"SHA-256 {digest} verified", file=sys.stderr)
        else:
            print(
                f"SHA-256 {digest} (unverified: the DiT release publishes no checksum; compare it with another "
                "download before relying on it)",
                file=sys.stderr,
            )
        print(f"--model.init_args.init_from {path}")
        return
    if not _HUB_ID.match(args.name) or _OFFICIAL_LIKE.match(args.name):
        raise ValueError(
            f"Unknown checkpoint {args.name!r}: give an official one ({', '.join(OFFICIAL)}) or a Hub id such as "
            "facebook/DiT-XL-2-256"
        )
    folder = snapshot(args.name, args.subfolder, args.revision, args.out)
    print(f"{args.name} is in {folder}", file=sys.stderr)
    flags = config_flags(folder)
    print("\n".join(flags) if flags else str(folder))


if __name__ == "__main__":
    main()
