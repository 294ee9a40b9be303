"""Atomic file output: every file dinotxt writes appears whole or not at all.

Writers produce a temporary sibling (``.NAME.tmpPID``) and ``os.replace`` it onto the
final name, so a run killed mid-write never leaves a half-written checkpoint, shard,
embedding file or report, and a rerun can trust that any file it finds is complete.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, Path]


def temporary_sibling(path: PathLike) -> Path:
    """A hidden, process-unique temporary name next to ``path`` (same filesystem, so rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@functools.lru_cache(maxsize=None)
def current_umask() -> int:
    """The process's umask (read once, by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it is renamed onto ``path``, on error removed.

        with atomic_output(out / "emb.npy") as tmp:
            np.save(tmp, array)          # note: pass a file object to np.save, or it appends .npy
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder where dinotxt writes a file: move it away or write elsewhere")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # as any new file (some writers, e.g. safetensors, make it 0600)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename, so readers never see half a file."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def add_tar_member(tar, name: str, data: bytes) -> None:
    """Add ``data`` to the open ``tarfile`` as the member ``name``, with mtime 0 (the same bytes on every rerun)."""
    import io
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))
