"""Writing files others can rely on (whole or not at all, readable as the umask says), and reading the
JSON and YAML files a user or a run hands back (a missing file or a syntax error is one user error).

Every file mtrec writes into a run directory, a cache or a user's output path goes through
:func:`write_atomic`: the content goes to a temporary file beside the target, which gets the
permissions a plain ``open`` would give (``0666`` minus the umask; ``mkstemp`` makes ``0600``, which a
teammate or a service under another user could not read), then is renamed over the target. A failure
at any point leaves the target as it was and no temporary file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mtrec.errors import MtrecError


def umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path`` (its return value is ignored), then rename it
    over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_json_atomic(path: Path, data: object) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False))


def read_json(path: Path, what: str) -> Any:
    """The parsed content of the JSON file ``path``. A missing file is ``{path}: {what} not found`` and
    a syntax error ``{path}: not valid JSON (reason, line N)``, both as :class:`MtrecError` (no traceback)."""
    path = Path(path)
    if not path.is_file():
        raise MtrecError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MtrecError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None


def read_yaml(path: Path, what: str) -> Any:
    """The parsed content of the YAML file ``path``. A missing file is ``{path}: {what} not found`` and
    a syntax error ``{path}: not valid YAML (the parser's first line)``, both as :class:`MtrecError`."""
    path = Path(path)
    if not path.is_file():
        raise MtrecError(f"{path}: {what} not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise MtrecError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
