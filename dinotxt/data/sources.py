"""Where training pairs come from: webdataset shards (img2dataset layout) or a manifest.

Shards are tar files whose members are grouped by key: ``key.jpg|png|webp`` with the
caption in ``key.txt`` or in a field of ``key.json`` (img2dataset writes both). A
manifest is a CSV or parquet file with ``image_path`` and ``caption`` columns (paths
relative to the manifest's folder are allowed).

A shard is named the way webdataset users write it: a local path; an fsspec URL
(``https://``, ``s3://``, ``gs://``, ``hf://``, ... and chains such as ``simplecache::s3://``),
read as a stream through fsspec (``s3fs`` / ``gcsfs`` / ``huggingface_hub`` for their schemes);
or ``pipe:COMMAND``, whose standard output is the tar stream. Every shard is read front to
back in tar stream mode, so a remote shard is never downloaded whole first (unless an fsspec
cache chain asks for it), and a shard that ends early, a connection dropped mid-shard
included, counts as one ``corrupt_shard`` like a truncated local file.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import shlex
import signal
import subprocess
import tarfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

log = logging.getLogger(__name__)

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")
# an fsspec URL, chains included (simplecache::s3://...); file:// alone is read as a local path
_URL = re.compile(r"^(?:[A-Za-z][\w+.-]*::)*[A-Za-z][\w+.-]*://")
_PROTOCOL = re.compile(r"[A-Za-z][\w+.-]*")
# the package each fsspec scheme needs, for the install hint
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub", "http": "aiohttp",
             "https": "aiohttp", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs", "adl": "adlfs", "oci": "ocifs",
             "sftp": "paramiko", "ssh": "paramiko"}


def _brace_expand(pattern: str) -> List[str]:
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    out = []
    for i in range(int(lo), int(hi) + 1):
        out.extend(_brace_expand(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end():]))
    return out


def is_pipe(spec: str) -> bool:
    """``pipe:COMMAND``: the shard is what the shell command writes to its standard output."""
    return str(spec).startswith("pipe:")


def is_url(spec: str) -> bool:
    """An fsspec URL (``https://``, ``s3://``, ``simplecache::gs://`` ...), not ``file://``."""
    spec = str(spec)
    return bool(_URL.match(spec)) and not spec.startswith("file://")


def _split_list(spec: str) -> List[str]:
    """``a.tar::b.tar`` -> its parts, keeping fsspec chains (``simplecache::s3://...``) whole."""
    parts = spec.split("::")
    if len(parts) == 1:
        return parts
    out: List[str] = []
    chain = ""
    for part in parts:
        if _PROTOCOL.fullmatch(part) and not Path(part).exists() and _is_fsspec_protocol(part):
            chain += part + "::"
        else:
            out.append(chain + part)
            chain = ""
    if chain:
        out.append(chain.rstrip(":"))
    return out


def _is_fsspec_protocol(name: str) -> bool:
    try:
        import fsspec
    except ImportError:
        return False
    return name in fsspec.available_protocols()


def _filesystem(url: str, key: str = "data.train"):
    """(fsspec filesystem, path) of ``url``; a missing package is a one-line ImportError naming it."""
    try:
        import fsspec
    except ImportError:
        raise ImportError(f"shards given as URLs ({key}={url}) need fsspec: pip install fsspec") from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        protocol = url.split("://", 1)[0].split("::")[-1]
        package = _PACKAGES.get(protocol)
        hint = f"pip install {package}" if package else str(e).splitlines()[0]
        raise ImportError(f"{protocol}:// shards need the {package or protocol} package: {hint} ({key}={url})") from None
    except ValueError as e:
        raise ValueError(f"cannot read {url}: {str(e).splitlines()[0]}; check {key}") from None


def _reason(e: BaseException) -> str:
    """``Type: first line`` of an error, or of its cause for fsspec's bare FileNotFoundError(url)."""
    if isinstance(e, FileNotFoundError) and (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _check_url(url: str, key: str) -> None:
    """A one-line FileNotFoundError when ``url`` cannot be reached or is not there."""
    fs, path = _filesystem(url, key)
    try:
        fs.info(path)
    except ImportError:
        raise
    except Exception as e:  # fsspec backends raise their own client errors for a refused or failed connection
        folder = "" if "." in _url_basename(url) else " (a folder? end it with / to list its .tar files)"
        raise FileNotFoundError(f"shard not found or unreachable: {url} ({_reason(e)}){folder}; check {key}") from None


def _expand_url(part: str, key: str) -> List[str]:
    """Shard URLs of ``part``: brace ranges, and a listing for a glob or a folder ending in ``/``."""
    target = part.split("::")[-1]
    http = target.startswith(("http://", "https://"))
    path_part = target.split("?", 1)[0] if http else target  # "?" starts an HTTP query, not a wildcard
    listing = path_part.endswith("/") or any(c in path_part.split("://", 1)[1] for c in ("*[" if http else "*?["))
    if "::" in part and listing:
        raise ValueError(f"cannot list {part}: name the shards of an fsspec chain one by one (brace ranges work); "
                         f"check {key}")
    if not listing:
        urls = _brace_expand(part)
        _check_url(urls[0], key)  # the first of each range: a wrong host or path stops the run now, not mid-epoch
        return urls
    found: List[str] = []
    for pattern in _brace_expand(part + "*.tar" if path_part.endswith("/") else part):
        fs, path = _filesystem(pattern, key)
        try:
            matches = fs.glob(path)
        except Exception as e:
            raise FileNotFoundError(f"cannot list {pattern} ({_reason(e)}); check {key}") from None
        found.extend(sorted(fs.unstrip_protocol(m) for m in matches if str(m).endswith(".tar")))
    if not found:
        raise FileNotFoundError(f"no .tar shards match {part}; check {key}")
    return found


def expand_shards(spec: Union[str, Sequence[str]], key: str = "data.train") -> List[str]:
    """Shard list from ``dir/{00000..00099}.tar``, a glob, a directory of .tar files, a
    ``::``-separated string or a list of any of these; URLs (``https://host/{000..009}.tar``,
    ``s3://bucket/train/`` to list a folder, ``gs://b/*.tar``) and ``pipe:COMMAND`` too (brace
    ranges expand in both). Missing local shards, and the first shard of each remote range, are
    checked now: an error names the config ``key`` the shards came from."""
    if spec is None:
        raise ValueError(f"no data: set {key} to shards (dir/{{00000..00009}}.tar) or a .csv/.parquet manifest")
    items = [spec] if isinstance(spec, str) else list(spec)
    shards: List[str] = []
    for item in items:
        for part in _split_list(str(item)):
            if part.startswith("file://"):
                part = part[len("file://"):]
            if is_pipe(part):
                shards.extend(_brace_expand(part))
                continue
            if is_url(part):
                shards.extend(_expand_url(part, key))
                continue
            p = Path(part)
            if p.is_dir():
                found = sorted(str(x) for x in p.glob("*.tar"))
                if not found:
                    raise FileNotFoundError(f"no .tar shards in directory {p}; check {key}")
                shards.extend(found)
            elif any(c in part for c in "*?["):
                found = sorted(glob.glob(part))
                if not found:
                    raise FileNotFoundError(f"no shards match {part}; check {key}")
                shards.extend(found)
            else:
                shards.extend(_brace_expand(part))
    missing = [s for s in shards if not (is_pipe(s) or is_url(s)) and not Path(s).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard not found: {missing[0]}{more}; check {key}")
    return shards


def shard_name(spec: str) -> str:
    """The file name of a shard (what sample ids and cache fingerprints use): the same for a local
    path, its URL and ``pipe:cat PATH``, so a moved or served copy keeps its sample ids."""
    spec = str(spec)
    if is_pipe(spec):
        command = spec[len("pipe:"):]
        try:
            tokens = shlex.split(command)
        except ValueError:
            tokens = command.split()
        for token in reversed(tokens):
            name = _url_basename(token)
            if ".tar" in name:
                return name
        return "pipe-" + hashlib.blake2b(command.encode("utf-8"), digest_size=6).hexdigest()
    return _url_basename(spec) if is_url(spec) else Path(spec).name


def _url_basename(url: str) -> str:
    target = url.split("::")[-1]
    if "://" in target:
        target = target.split("://", 1)[1]
        if url.split("::")[-1].startswith(("http://", "https://")):
            target = target.split("?", 1)[0].split("#", 1)[0]
    return target.rstrip("/").rsplit("/", 1)[-1]


def shard_sizes(shards: Sequence[str]) -> List[Optional[int]]:
    """Bytes of each shard (None for ``pipe:`` shards, whose size is known only once read)."""
    sizes: List[Optional[int]] = [None] * len(shards)
    remote: Dict[int, List[Tuple[int, str]]] = {}
    filesystems = {}
    for i, s in enumerate(shards):
        if is_pipe(s):
            continue
        if not is_url(s):
            sizes[i] = Path(s).stat().st_size
            continue
        fs, path = _filesystem(s)
        filesystems[id(fs)] = fs
        remote.setdefault(id(fs), []).append((i, path))
    for fid, items in remote.items():  # one batch per filesystem (concurrent requests for async ones)
        try:
            found = filesystems[fid].sizes([p for _, p in items])
        except Exception as e:
            raise FileNotFoundError(f"cannot read the size of the shards at {shards[items[0][0]]} ({_reason(e)})") from None
        for (i, _), size in zip(items, found):
            sizes[i] = None if size is None else int(size)
    return sizes


def is_manifest(spec) -> bool:
    return isinstance(spec, str) and spec.endswith((".csv", ".parquet", ".tsv"))


def read_manifest(path: str, image_column: str = "image_path", caption_column: str = "caption") -> List[Tuple[str, str]]:
    """Rows (absolute image path, caption) of a CSV / TSV / parquet manifest."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"manifest not found: {p}")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        columns = table.column_names
        get = lambda c: table.column(c).to_pylist()  # noqa: E731
    else:
        import csv

        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if p.suffix == ".tsv" else ","))
        columns = list(rows[0].keys()) if rows else []
        get = lambda c: [r[c] for r in rows]  # noqa: E731
    for c in (image_column, caption_column):
        if c not in columns:
            raise ValueError(f"manifest {p} has no column '{c}' (columns: {columns}); set data.manifest_*_column")
    images, captions = get(image_column), get(caption_column)
    if not images:
        raise ValueError(f"manifest {p} has no rows")
    base = p.parent
    return [(str(Path(i) if Path(i).is_absolute() else base / i), c or "") for i, c in zip(images, captions)]


class ShardCommandError(ValueError):
    """A ``pipe:`` shard's command exited with a non-zero status."""


class _Source:
    """A shard opened for one front-to-back read: ``read`` returns what was asked for unless the data
    ended, and any failure of the transport (a dropped connection, a client error) is an OSError."""

    def __init__(self, spec: str):
        self.spec = spec
        self.proc: Optional[subprocess.Popen] = None
        self.fs = self.path = None
        self.offset = 0
        self.eof = False
        if is_pipe(spec):
            self.command = spec[len("pipe:"):].strip()
            # its own process group, so closing early ends the whole pipeline (curl ... | ...), not only the shell
            self.proc = subprocess.Popen(self.command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         start_new_session=hasattr(os, "killpg"))
            self.file = self.proc.stdout
        elif is_url(spec):
            self.fs, self.path = _filesystem(spec)
            self.file = self._open_remote(block_size=None)
        else:
            self.file = open(spec, "rb")

    def _open_remote(self, block_size):
        try:
            kw = {} if block_size is None else {"block_size": block_size}  # 0: one streamed GET (HTTP)
            return self.fs.open(self.path, "rb", **kw)
        except (OSError, ImportError):
            raise
        except Exception as e:
            raise OSError(f"cannot open {self.spec}: {_reason(e)}") from e

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            chunks = []
            while True:
                chunk = self.read(1 << 20)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
        chunk = self._read(size)
        if 0 < len(chunk) < size:  # a network stream hands out what has arrived: fill the request
            parts = [chunk]
            have = len(chunk)
            while have < size:
                more = self._read(size - have)
                if not more:
                    break
                parts.append(more)
                have += len(more)
            chunk = b"".join(parts)
        if not chunk:
            self.eof = True
        self.offset += len(chunk)
        return chunk

    def _read(self, size: int) -> bytes:
        try:
            return self.file.read(size)
        except OSError:
            raise
        except ValueError as e:
            if self.fs is None or "range requests" not in str(e):
                raise OSError(f"reading {self.spec} failed: {_reason(e)}") from e
            # an HTTP server without Range support (python -m http.server): one streamed GET from here on
            self.file.close()
            self.file = self._open_remote(block_size=0)
            skipped = 0
            while skipped < self.offset:
                chunk = self.file.read(min(1 << 20, self.offset - skipped))
                if not chunk:
                    raise OSError(f"{self.spec} ended before byte {self.offset} when read again") from None
                skipped += len(chunk)
            return self._read(size)
        except Exception as e:  # aiohttp.ClientPayloadError, botocore errors ...
            raise OSError(f"reading {self.spec} failed: {_reason(e)}") from e

    def finish(self, complete: bool = True) -> None:
        """The read is over: a ``pipe:`` command must have exited with status 0. After damaged data
        (``complete=False``) that is asked only once its output has ended: a command still writing
        after a corrupt tar is stopped by ``close``, the shard counted as corrupt."""
        if self.proc is None or not (complete or self.eof):
            return
        try:
            while self.proc.stdout.read(1 << 16):  # the rest (tar padding), so the command can end on its own
                pass
        except (OSError, ValueError):
            pass
        status = self.proc.wait()
        if status != 0:
            how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
            raise ShardCommandError(f"shard command {how}: {self.command}")

    def close(self) -> None:
        try:
            self.file.close()
        except Exception:  # the transport may already be broken; nothing is left to read from it
            pass
        if self.proc is not None and self.proc.poll() is None:  # closed before the end: stop the command
            try:
                if hasattr(os, "killpg"):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                else:
                    self.proc.terminate()
                self.proc.wait(timeout=10)
            except (ProcessLookupError, PermissionError):
                pass
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def member_key(member: tarfile.TarInfo) -> Optional[Tuple[str, str]]:
    """``(sample key, extension)`` of a tar member (webdataset's rule: the key is the path up to the first dot
    of the file name), or None for what is not a sample file (folders, links, hidden files such as
    ``._x.jpg`` from macOS tar)."""
    if not member.isfile():
        return None
    dirname, _, base = member.name.rpartition("/")
    if base.startswith("."):
        return None
    stem, _, ext = base.partition(".")
    return (f"{dirname}/{stem}" if dirname else stem), ext


def iter_tar_samples(path: str, errors: Dict[str, int]) -> Iterator[Dict[str, bytes]]:
    """Group consecutive tar members by key (the part of the name before the first dot).

    ``path`` is a local file, an fsspec URL or ``pipe:COMMAND``, read as a stream. A truncated or
    corrupt tar (a dropped connection too) ends that shard with a counted error instead of a crash;
    a ``pipe:`` command that fails raises ``ShardCommandError`` naming it and its exit status.
    """
    current: Dict[str, bytes] = {}
    source: Optional[_Source] = None
    try:
        source = _Source(path)
        with tarfile.open(fileobj=source, mode="r|*") as tar:
            for member in tar:
                named = member_key(member)
                if named is None:
                    continue
                key, ext = named
                if current and current["__key__"] != key:
                    yield current  # complete before the next member is read, so damage there cannot drop it
                    current = {}
                current["__key__"] = key
                current[ext.lower()] = tar.extractfile(member).read()
            complete = _at_end_marker(tar)
        source.finish()
        problem = None if complete else "no end-of-archive marker"
    except (tarfile.TarError, OSError, EOFError) as e:
        if source is not None:
            source.finish(complete=False)  # a failed command is the cause of the damage: its error, not a skip
        problem = str(e) or type(e).__name__
        current = {}  # the sample being read when the shard broke may be incomplete
    finally:
        if source is not None:
            source.close()
    if current:
        yield current
    if problem:
        errors["corrupt_shard"] = errors.get("corrupt_shard", 0) + 1
        log.warning(f"shard {path} is corrupt or truncated ({problem}); "
              "used the samples before the damage")


def _at_end_marker(tar: tarfile.TarFile) -> bool:
    """Whether the stream ended at an end-of-archive block: tarfile stops quietly at a short or
    missing header too (a copy cut at a member boundary), which has read less than a block."""
    return tar.fileobj.tell() - tar.offset == tarfile.BLOCKSIZE
