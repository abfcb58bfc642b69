"""An in-memory stand-in for Google Cloud Storage, for testing gs:// workdirs offline.

`etils.epath` (r1jax.paths, orbax) opens gs:// paths through fsspec's "gcs" filesystem; the fixture
`fake_gcs` registers fsspec's in-memory filesystem under that name for one test. Like a bucket and
unlike a disk, it refuses appends (objects are immutable), and nothing reaches the local disk: a
plain `open("gs://bucket/x", "w")` or `os.makedirs("gs://bucket")` that bypasses the path layer
either fails or leaves a local `gs:` directory, which the tests look for.
"""

from __future__ import annotations

import importlib

import pytest
from etils.epath import backend
from fsspec.implementations.memory import MemoryFileSystem


class FakeGCS(MemoryFileSystem):
    """fsspec's memory filesystem answering to gs:// and refusing to append."""

    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs: list = [""]

    @classmethod
    def _strip_protocol(cls, path):
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix) :]
        path = path.strip("/")
        return "/" + path if path else ""

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise OSError(f"{path}: cloud storage objects cannot be appended to")
        return super()._open(path, mode=mode, **kwargs)

    def read(self, uri: str) -> bytes:
        """The bytes of object `uri` (gs://bucket/path)."""
        return self.cat_file(uri)

    def names(self, prefix: str) -> list[str]:
        """Object URIs under `prefix` (gs://bucket/path), sorted."""
        root = self._strip_protocol(prefix)
        return sorted("gs:/" + k for k in self.store if k.startswith(root + "/"))


@pytest.fixture
def fake_gcs(monkeypatch):
    """Route gs:// to a fresh in-memory FakeGCS for this test; yields the filesystem."""
    monkeypatch.setattr(FakeGCS, "store", {})
    monkeypatch.setattr(FakeGCS, "pseudo_dirs", [""])
    FakeGCS.clear_instance_cache()
    # fsspec's class registry (restored by monkeypatch: gcsfs, if installed, comes back).
    registry = importlib.import_module("fsspec.registry")._registry
    for name in ("gs", "gcs"):
        monkeypatch.setitem(registry, name, FakeGCS)
    backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches the filesystem per name
    yield FakeGCS()
    backend.fsspec_backend._get_filesystem.cache_clear()
