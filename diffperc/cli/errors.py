"""What the ``diffperc`` command reports to its user: the one line of an error the user can fix (a bug keeps its
traceback), and the checks of ``--config`` files that jsonargparse's own errors would not name."""

import linecache
import re
import sys
from argparse import ArgumentError
from pathlib import Path

import yaml

from diffperc.utils import DISK_ERRNOS


def user_error(err: BaseException) -> str | None:
    """The message of an error the user can fix, or None for a bug.

    User errors: a command-line or config parse error, Lightning's ``MisconfigurationException``, a missing,
    existing or inaccessible file, a full disk, and a ``ValueError`` raised by a ``raise`` statement in diffperc
    (its messages name the flag) or its ``FloatingPointError`` (a diverged run: the step, batch and samples). A
    ``ValueError`` from torch or NumPy, an ``AssertionError`` or a ``RuntimeError`` is a bug. jsonargparse wraps an
    error raised while it builds a class (twice for a class inside a class): the innermost one is reported.
    """
    while not isinstance(err, ArgumentError) and err.__cause__ is not None and _raised_in(err, "jsonargparse"):
        err = err.__cause__
    if isinstance(err, ArgumentError):
        return _short_parse_error(str(err))
    file_errors = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
    lightning = sys.modules.get("lightning.fabric.utilities.exceptions")  # never imported: never raised
    misconfiguration = (lightning.MisconfigurationException,) if lightning is not None else ()
    if isinstance(err, (*misconfiguration, *file_errors)) or (isinstance(err, OSError) and err.errno in DISK_ERRNOS):
        return str(err)
    if isinstance(err, (ValueError, FloatingPointError)) and _raised_in(
        err, str(Path(__file__).parents[1]), statement="raise "
    ):
        return str(err)
    return None


def _raised_in(err: BaseException, where: str, statement: str = "") -> bool:
    """Whether ``err`` was raised in a file whose path contains ``where``, by a line starting with ``statement``."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    return where in filename and linecache.getline(filename, tb.tb_lineno).lstrip().startswith(statement)


# jsonargparse's report of a failed parse lists every type a value could have had; these lines are that noise.
_PARSE_NOISE = re.compile(
    r"(Does not validate against any of the Union subtypes|Subtypes: |Errors:$|Given value( type)?: "
    r"|Expected a (<class '[^']*'>|\S+)$|Expected a path but .* either not accessible or invalid$)"
)


def _short_parse_error(text: str) -> str:
    """jsonargparse's parse error as one line: ``--<key>`` (class path): what is wrong."""
    keys, lines, class_path = [], [], None
    for line in text.splitlines():
        line = line.strip().removeprefix("- ").strip()
        key = re.match(r'Parser key "([^"]+)":\s*(.*)$', line)
        if key:
            keys.append(key[1])
            line = key[2]
        problem = re.match(r"Problem with given class_path '([^']+)':$", line)
        if problem:
            class_path = problem[1]
        elif line and not _PARSE_NOISE.match(line):
            lines.append(line)
    if not keys:
        return "; ".join(lines) or text.strip()
    where = f"`--{'.'.join(keys)}`" + (f" ({class_path})" if class_path else "")
    return f"{where}: {'; '.join(lines) or text.strip()}"


def check_config_files(argv: list[str], keys: str = "keys such as `trainer:`, `model:` and `data:`") -> None:
    """Each ``--config FILE`` must be a YAML mapping; jsonargparse's errors for a binary or non-YAML file don't name
    it. Values that are not files are left to jsonargparse (a missing file, a YAML string)."""
    values = [b for a, b in zip(argv, argv[1:]) if a in ("--config", "-c")]
    values += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for value in values:
        if not Path(value).is_file():
            continue
        try:
            text = Path(value).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"`--config {value}` is not a YAML file: it holds binary data, not UTF-8 text") from None
        try:
            content = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"`--config {value}` is not valid YAML{at}: {problem}") from None
        if content is not None and not isinstance(content, dict):
            raise ValueError(f"`--config {value}` holds a YAML {type(content).__name__}, not {keys}")
    _check_bases(values)


def _check_bases(values: list[str]) -> None:
    """A recipe that holds only what differs from its base names the files that go before it on its first line
    (``# base: configs/depth_xl.yaml``); given without them it would run a half-configured model."""
    for i, value in enumerate(values):
        path = Path(value)
        first = path.read_text(errors="replace").split("\n", 1)[0] if path.is_file() else ""
        if not first.startswith("# base:"):
            continue
        bases = [b.strip() for b in first.removeprefix("# base:").split(",") if b.strip()]
        given = {Path(v).resolve() for v in values[:i]}
        # A base is named from the repository folder: relative to the working folder or to a folder above the recipe.
        places = [Path.cwd(), *path.resolve().parents]
        missing = [b for b in bases if not any((place / b).resolve() in given for place in places)]
        if missing:
            chain = " ".join(f"--config {b}" for b in [*bases, value])
            raise ValueError(
                f"`--config {value}` holds what differs from {', '.join(bases)}: give its bases first, e.g. `{chain}`"
            )
