"""Output files: checked before any work starts, then written all together or not at all.

What an output name points at decides how it is written:

- nothing yet, or a regular file: the bytes go to a temporary name in the same folder, renamed over
  the name once every output of the command is staged. A failure (disk full included) removes the
  temporaries, so neither a partial file nor a mix of new and old outputs is left;
- a symlink is followed: a regular file it points at is replaced that way (the link itself stays);
  a dangling link is refused;
- a character device or a FIFO (``/dev/null``, ``/dev/stdout``, a named pipe) cannot be renamed over:
  it is written in place, after every regular output is staged and before any is renamed, so its
  write error (``/dev/full``: no space left on device) fails the command with nothing renamed.
  A FIFO that nobody reads is refused instead of waited on;
- a folder, a block device or a socket is refused.
"""
from __future__ import annotations

import errno
import math
import os
import secrets
import stat
from pathlib import Path
from typing import Any

import numpy as np

from freedit.errors import FreeditError


class OutputError(FreeditError):
    """An output that cannot be written; nothing of the command's outputs was left half-written."""


def _kind(path: Path) -> tuple[str, Path]:
    """("new" | "regular" | "stream", the path to write) for an output name, or OutputError."""
    try:
        st = os.stat(path)  # follows symlinks
    except (FileNotFoundError, NotADirectoryError):  # a parent that is a file is reported by check_output
        if os.path.islink(path):
            raise OutputError(f"{path} is a symlink to {os.readlink(path)}, which does not exist") from None
        return "new", path
    except OSError as exc:
        raise OutputError(f"cannot use {path} as an output: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"output path {path} is a folder; give a file name such as {path / 'grid.png'}")
    if stat.S_ISREG(st.st_mode):
        return "regular", Path(os.path.realpath(path))
    if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        return "stream", path
    what = "a block device" if stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file"
    raise OutputError(f"output path {path} is {what}; give a regular file name")


def check_output(path: str | Path) -> Path:
    """Fail before any work if ``path`` cannot take an output file (see the module docstring)."""
    path = Path(path)
    kind, real = _kind(path)
    if kind == "stream":
        if not os.access(path, os.W_OK):
            raise OutputError(f"{path} is not writable")
        return path
    folder = real.parent if str(real.parent) else Path(".")
    if not folder.is_dir():
        what = ": it is a file" if folder.exists() else ""
        raise OutputError(f"output folder {folder} does not exist{what}; create it or choose another name")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {folder} is not writable; choose another name")
    if kind == "regular" and not os.access(real, os.W_OK):
        raise OutputError(f"{path} is read-only; choose another name or make it writable")
    return path


def check_output_folder(path: str | Path) -> Path:
    """A folder for outputs: an existing writable folder, or one whose parent exists and is writable.
    Nothing is created here; ``write_outputs`` creates it only once everything is ready to be written."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise OutputError(f"{path} exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(f"folder {path} is not writable")
        return path
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot create folder {path}: {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create folder {path}: {parent} is not writable")
    return path


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _stage(real: Path, data: bytes) -> Path:
    tmp = real.with_name(f".{real.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        _write_all(fd, data)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.chmod(tmp, stat.S_IMODE(os.stat(real).st_mode))  # a replaced file keeps its permissions
    except FileNotFoundError:
        pass
    return tmp


def _write_stream(path: Path, data: bytes) -> None:
    try:  # O_NONBLOCK: a FIFO without a reader fails at once (ENXIO) instead of blocking forever
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise OutputError(f"nobody is reading the FIFO {path}; start its reader first") from None
        raise
    try:
        os.set_blocking(fd, True)
        _write_all(fd, data)
    finally:
        os.close(fd)


def write_outputs(files: dict[str | Path, bytes]) -> None:
    """Write every file or none: stage regular files, write streams, then rename the staged files.

    A missing parent folder is created (one level, as ``check_output_folder`` allowed) and removed
    again if the write fails. Errors are one OutputError line naming the file and the OS's reason.
    """
    plan = [(Path(p), *_kind(Path(p)), data) for p, data in files.items()]
    created: list[Path] = []
    staged: list[tuple[Path, Path]] = []
    renamed, current = 0, None
    try:
        for path, kind, real, data in plan:
            current = path
            if kind == "stream":
                continue
            if not real.parent.is_dir() and real.parent not in created:
                real.parent.mkdir()
                created.append(real.parent)
            staged.append((_stage(real, data), real))
        for path, kind, real, data in plan:
            current = path
            if kind == "stream":
                _write_stream(path, data)
        for tmp, real in staged:
            current = real
            os.replace(tmp, real)
            renamed += 1
    except OSError as exc:
        done = f"{renamed} of {len(staged)} files were already renamed into place" if renamed else \
            "no output was written or replaced"
        raise OutputError(f"writing {current} failed ({exc.strerror or exc}); {done}") from None
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for folder in reversed(created):
            try:
                folder.rmdir()  # only when empty: i.e. when the write failed
            except OSError:
                pass


def json_safe(value: Any) -> Any:
    """numpy scalars and arrays to JSON types; NaN and infinities to null (JSON has none)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
