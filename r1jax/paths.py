"""Workdir files on a local disk or on cloud storage (`--workdir=gs://bucket/run`), one small layer.

Every file r1jax writes into a workdir goes through here, never through a plain `open` or
`os.makedirs`, so that a TPU run can keep its workdir in a bucket. Paths are strings throughout
(`os.path.join("gs://bucket/run", "x")` is "gs://bucket/run/x"); `etils.epath` (which orbax uses
for its own files) does the I/O: the local disk for plain paths, fsspec for gs://, s3://, az://
(install `gcsfs` for gs://, `s3fs` for s3://; orbax's checkpoints on gs:// also need
`google-cloud-storage`; `check_workdir` names what is missing before a run starts).

What cloud storage cannot do, and what happens instead:
- An object cannot be appended to. Files that grow line by line while a run goes on (metrics.jsonl,
  TensorBoard event files, the log) are written to a local working copy under
  `$R1JAX_HOME/staging/<scheme>/<bucket>/<path>` and uploaded whole by `Staged.sync`, now and then
  and when the writer closes. A run killed between two uploads loses those last lines from the
  bucket's copy (a restart on the same machine recovers them from the working copy).
- An object cannot be renamed atomically, but writing one is atomic (it appears complete or not at
  all), so `write_text`/`write_bytes` write a cloud object directly and a local file through a
  temporary file and `os.replace`: a kill never leaves half a file either way.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterable
from typing import IO

from etils import epath

# URI prefixes etils.epath (and therefore orbax) can read and write.
CLOUD_PREFIXES = ("gs://", "s3://", "az://")


def r1jax_home() -> str:
    """r1jax's local cache ($R1JAX_HOME, default ~/.cache/r1jax): the toy base model, the XLA
    compilation cache, working copies of cloud workdir files."""
    # (expanded and absolute: a "~/r1" from an env file, or a relative folder, is no path)
    home = os.environ.get("R1JAX_HOME") or os.path.join("~", ".cache", "r1jax")
    return os.path.abspath(os.path.expanduser(home))


def is_remote(path: str | os.PathLike) -> bool:
    """True for a cloud URI (gs://, s3://, az://); False for a local path."""
    return os.fspath(path).startswith(CLOUD_PREFIXES)


def check_workdir(path: str | os.PathLike) -> None:
    """Raise ValueError naming the problem when `path` cannot be used as a workdir.

    Refuses URI schemes the I/O layer does not handle (which would otherwise become an odd local
    directory such as `./memory:/x`) and cloud URIs whose packages are missing (gcsfs/s3fs:
    fsspec's own message says which; google-cloud-storage for orbax on gs://). Touches the network
    only to ask whether `path` exists. A local directory is created and written to once.
    """
    path = os.fspath(path)
    if re.match(r"(gs|s3|az):/?(?!/)", path):  # ("gs:/b/x" is a local folder named "gs:")
        fixed = re.sub(r"^(\w+):/?", r"\1://", path)
        raise ValueError(f"workdir {path!r}: a cloud URI takes two slashes: {fixed!r}")
    if "://" in path and not is_remote(path):
        raise ValueError(
            f"workdir {path!r}: unsupported scheme; give a local directory or a "
            f"{', '.join(p + '...' for p in CLOUD_PREFIXES)} URI"
        )
    if not is_remote(path):
        # Created now (as the stage would) and written to once: a file in the way, no permission
        # or a read-only disk is named here; so is a checkpoints/ folder a resumed run would
        # write into (mounted read-only, or another user's).
        for folder in (path, os.path.join(path, "checkpoints")):
            if folder != path and not os.path.isdir(folder):
                continue
            try:
                os.makedirs(folder, exist_ok=True)
                with tempfile.TemporaryFile(dir=folder):
                    pass
            except OSError as e:
                raise ValueError(f"workdir {folder!r} cannot be written ({e.strerror})") from None
        return
    try:
        epath.Path(path).exists()
    except ImportError as e:
        raise ValueError(f"workdir {path!r} needs a filesystem package: {e}") from None
    except Exception as e:  # credentials, permissions, no such bucket: the library's words
        raise ValueError(f"workdir {path!r} is not reachable ({type(e).__name__}: {e})") from None
    if path.startswith("gs://") and not _module_available("google.cloud.storage"):
        # orbax asks the bucket for its layout (hierarchical namespace) with this client.
        raise ValueError(
            f"workdir {path!r}: orbax's checkpoints on gs:// need google-cloud-storage; "
            "pip install google-cloud-storage gcsfs"
        )


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def makedirs(path: str | os.PathLike) -> None:
    """Create a directory and its parents (a no-op when it exists)."""
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def exists(path: str | os.PathLike) -> bool:
    return epath.Path(path).exists()


def open_file(path: str | os.PathLike, mode: str = "r") -> IO:
    """Open for reading ("r", "rb"); writes go through `write_text`/`write_bytes` (atomic) or a
    `Staged` working copy (files that grow)."""
    if mode not in ("r", "rb"):
        raise ValueError(f"open_file is for reading; got mode {mode!r}")
    return epath.Path(path).open(mode)


def read_text(path: str | os.PathLike) -> str:
    return epath.Path(path).read_text()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a whole text file atomically (see the module docstring), creating its directory."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a whole file atomically (see the module docstring), creating its directory."""
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(path):
        target.write_bytes(data)  # a single object write is atomic on cloud storage
        return
    tmp = os.fspath(path) + ".tmp"
    try:
        with open(tmp, "wb") as f:  # local only: the one plain `open` of the layer
            f.write(data)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # (a full disk: no empty .tmp left behind)
        raise
    os.replace(tmp, path)


def copy_file(local: str, target: str | os.PathLike) -> None:
    """Copy a local file to `target` (local or cloud), streaming, atomically (see the module
    docstring); creates the target's directory."""
    if not is_remote(target):
        dest = os.fspath(target)
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        shutil.copyfile(local, dest + ".tmp")
        os.replace(dest + ".tmp", dest)
        return
    dest = epath.Path(target)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Streamed: checkpoint shards can be gigabytes. The object appears only once complete: an
    # error part way discards the upload (fsspec's close() would commit what was written).
    with open(local, "rb") as src:
        dst = dest.open("wb")
        try:
            shutil.copyfileobj(src, dst, 64 * 1024 * 1024)
        except BaseException:
            discard = getattr(dst, "discard", None)
            if callable(discard):  # gcsfs: cancels the resumable upload
                try:
                    with contextlib.suppress(Exception):  # (the copy's error is the one to raise)
                        discard()
                finally:
                    with contextlib.suppress(Exception):
                        dst.closed = True  # (fsspec's __del__ would close, i.e. commit, it)
            raise
        dst.close()


def copy_dir(
    local: str, target: str | os.PathLike, *, last: str | None = None, stale=None
) -> list[str]:
    """Copy every file under the local directory `local` to the same relative path under `target`
    (local or cloud); returns the relative paths copied.

    `last`: a relative path removed from `target` before anything is copied and copied last, so
    that an interrupted copy leaves a folder without it (not one that mixes old and new files
    and looks complete). `stale(name)`: files directly in `target` for which it is true and that
    `local` does not hold are removed first (an earlier export's shards)."""
    rels = []
    for root, _, files in os.walk(local):
        rels += sorted(os.path.relpath(os.path.join(root, name), local) for name in files)
    target = os.fspath(target)
    if last is not None and exists(os.path.join(target, last)):
        epath.Path(os.path.join(target, last)).unlink()
    if stale is not None and exists(target):
        for old in epath.Path(target).iterdir():
            if stale(old.name) and old.name not in rels and old.is_file():
                old.unlink()
    rels = [r for r in rels if r != last] + ([last] if last in rels else [])
    for rel in rels:
        copy_file(os.path.join(local, rel), os.path.join(target, rel))
    return rels


def staging_dir(workdir: str | os.PathLike) -> str:
    """Where files of `workdir` that grow are written: `workdir` itself when it is local, else a
    local mirror `$R1JAX_HOME/staging/<scheme>/<bucket>/<path>`."""
    workdir = os.fspath(workdir)
    if not is_remote(workdir):
        return workdir
    scheme, rest = workdir.split("://", 1)
    return os.path.join(r1jax_home(), "staging", scheme, *[p for p in rest.split("/") if p])


class Staged:
    """Local working copies of some files of a workdir, uploaded to it by `sync`.

    For a local workdir the working copy *is* the workdir file and `sync` does nothing.

    Args:
      workdir: the run directory, local or a cloud URI.
      names: the files or directories (relative to workdir) this object uploads, e.g.
        ("metrics.jsonl", "tb"); a directory's files are uploaded recursively.
      every_secs: `sync()` without `force` uploads at most this often.
    """

    def __init__(self, workdir: str | os.PathLike, names: Iterable[str], every_secs: float = 30.0):
        self.workdir = os.fspath(workdir)
        self.local = staging_dir(self.workdir)
        self.remote = is_remote(self.workdir)
        self.names = tuple(names)
        self.every_secs = every_secs
        self._uploaded: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns)
        self._last_sync = time.monotonic()

    def local_path(self, name: str) -> str:
        """The working copy of `name` (relative to the workdir); its directory exists."""
        path = os.path.join(self.local, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def due(self) -> bool:
        """Whether a cloud workdir's last upload is `every_secs` old (always False when local)."""
        return self.remote and time.monotonic() - self._last_sync >= self.every_secs

    def sync(self, *, force: bool = False) -> int:
        """Upload working copies changed since their last upload; returns how many were.

        Without `force`, does nothing unless `due()`.
        """
        if not self.remote or not (force or self.due()):
            return 0
        self._last_sync = time.monotonic()
        uploaded = 0
        for rel in self._files():
            path = os.path.join(self.local, rel)
            st = os.stat(path)
            if self._uploaded.get(rel) == (st.st_size, st.st_mtime_ns):
                continue
            copy_file(path, os.path.join(self.workdir, rel))
            self._uploaded[rel] = (st.st_size, st.st_mtime_ns)
            uploaded += 1
        return uploaded

    def _files(self) -> list[str]:
        out = []
        for name in self.names:
            path = os.path.join(self.local, name)
            if os.path.isfile(path):
                out.append(name)
            elif os.path.isdir(path):
                for root, _, files in os.walk(path):
                    rel_root = os.path.relpath(root, self.local)
                    out += sorted(os.path.join(rel_root, f) for f in files)
        return out


# --------------------------------------------------------------------------------------------------
# Writers a failed stage must still close
# --------------------------------------------------------------------------------------------------

_open_writers: weakref.WeakSet = weakref.WeakSet()


def track_open(writer) -> None:
    """Register `writer`, whose `close()` finishes what it is still writing (a checkpoint's
    asynchronous save, the metrics' last upload), until it is closed (`untrack`)."""
    _open_writers.add(writer)


def untrack(writer) -> None:
    _open_writers.discard(writer)


def close_open_writers() -> list[BaseException]:
    """Close every writer still open, e.g. when a stage raised midway: a save already under way
    commits instead of being cut off at interpreter exit (and deleted at the next start as a
    temporary directory). Returns the errors closing raised, so as not to mask the stage's own."""
    errors = []
    for writer in list(_open_writers):
        try:
            writer.close()
        except BaseException as e:  # noqa: BLE001 -- reported by the caller, never raised over
            errors.append(e)
    return errors
