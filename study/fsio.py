"""Atomic file writes, the one helper for every file a reader or another job may open.

A writer fills a temp file with a name unique to this call, in the target's folder (so the
rename never crosses file systems), flushes it to disk, then `os.replace`s it over the target.
Readers see either the old file or a complete new one; concurrent writers of one path never
share a temp file, and the last rename wins with a complete file.

A leaf module: `study.data` and `study.metrics` use it, so it imports nothing from the project.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import BinaryIO, Callable


def _temp_name(path: Path) -> Path:
    # pid + thread + random: unique across processes, threads and hosts sharing the folder
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], durable: bool = True) -> Path:
    """Call `write(handle)` on a fresh binary file, fsync it, and rename it to `path`.

    `write` may be `lambda f: torch.save(obj, f)`, `lambda f: np.savez(f, **arrays)`, ...
    On any error the temp file is removed and `path` is left as it was. The rename alone keeps
    readers and killed processes from ever seeing half a file; the fsync (`durable`) also keeps
    the content through an OS crash. `durable=False` is for files rewritten all the time whose
    loss only repeats work (a stage's status), where the fsync would be most of the write's cost."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    # O_EXCL: never write into a file someone else created; 0o666 & umask, like open()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, durable: bool = True) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode()), durable)


def atomic_copy(source: str | Path, path: str | Path, durable: bool = True) -> Path:
    """A copy of `source` at `path`, written as `atomic_write` writes."""
    with open(source, "rb") as src:
        return atomic_write(path, lambda dst: shutil.copyfileobj(src, dst), durable)


def cache_root() -> Path:
    """`$VFMSTUDY_CACHE`, or `~/.cache/vfmstudy`: the root of every cache (data, Inception
    statistics, reference classifiers)."""
    return Path(os.environ.get("VFMSTUDY_CACHE", "~/.cache/vfmstudy")).expanduser()
