"""Atomic file writes: a crash or a failed write never leaves a half-written file behind."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells (/proc), else by setting
    and restoring it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp)` on a temporary name in `path`'s folder, then rename it over `path`.

    The file gets the mode a plain `open(path, "w")` would give it (0666 less the umask, so
    0644 as a rule), not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """`write_atomically` for a text file."""
    return write_atomically(path, lambda tmp: Path(tmp).write_text(text))
