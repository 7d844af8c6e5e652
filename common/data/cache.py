"""Preprocessing caches that invalidate themselves.

A cache folder is keyed by a hash of the preprocessing config and the source files' contents, so a changed
config or changed data rebuilds it by itself (an edit that keeps a file's size and modification time too).
Builders write into a temporary folder that is renamed into place only when complete, so an interrupted build
never leaves a half cache that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from common.data.staging import staged_folder

log = logging.getLogger(__name__)

_COMPLETE = "_COMPLETE.json"


def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return repr(obj)


def fingerprint(config: Mapping, files: Iterable[Path | str]) -> str:
    """SHA-256 over the config (as sorted JSON) and each file's path and content (BLAKE2b of its bytes).

    Content, not size and mtime: a same-size edit within the file system's timestamp resolution (or a copy that
    keeps the timestamps) must not serve stale data. Hashing runs at about 1 GB/s; the sources are small.
    """
    h = hashlib.sha256()
    h.update(json.dumps(_jsonable(config), sort_keys=True).encode())
    for f in sorted(str(Path(p).resolve()) for p in files):
        content = hashlib.blake2b()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                content.update(chunk)
        h.update(f"\n{f}\t{content.hexdigest()}".encode())
    return h.hexdigest()


class ArtifactCache:
    """One named cache folder ``<cache_root>/<name>-<key[:16]>`` built once per (config, files) state."""

    def __init__(self, cache_root: Path | str, name: str, config: Mapping, files: Iterable[Path | str]):
        self.cache_root = Path(cache_root)
        self.name = name
        self.config = _jsonable(config)
        self.files = [Path(f) for f in files]
        self.key = fingerprint(self.config, self.files)
        self.path = self.cache_root / f"{name}-{self.key[:16]}"

    def is_valid(self) -> bool:
        marker = self.path / _COMPLETE
        if not marker.is_file():
            return False
        try:
            return json.loads(marker.read_text()).get("key") == self.key
        except (OSError, json.JSONDecodeError):
            return False

    def build(self, builder: Callable[[Path], None], force: bool = False) -> Path:
        """Return the cache folder, running ``builder(tmp_folder)`` first if it is missing or stale."""
        if self.is_valid() and not force:
            log.info("cache %s is up to date: %s", self.name, self.path)
            return self.path
        t0 = time.perf_counter()
        with staged_folder(self.path) as tmp:
            builder(tmp)
            meta = {"key": self.key, "name": self.name, "config": self.config,
                    "files": [str(f) for f in self.files], "built_s": round(time.perf_counter() - t0, 3)}
            (tmp / _COMPLETE).write_text(json.dumps(meta, indent=1))
        for stale in self.cache_root.glob(f"{self.name}-*"):
            if stale != self.path and stale.is_dir():
                log.info("removing stale cache %s", stale)
                shutil.rmtree(stale, ignore_errors=True)
        log.info("built cache %s in %.1fs: %s", self.name, time.perf_counter() - t0, self.path)
        return self.path
