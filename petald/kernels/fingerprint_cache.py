"""Weights fingerprints are costly for large files: cache them by path, size and mtime."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from petald.kernels.cache_dir import petald_cache_dir


def _cache_file() -> Path:
    return petald_cache_dir() / "fingerprints.json"


def file_stamp(paths: list[Path]) -> str:
    parts = []
    for p in sorted(paths):
        st = p.stat()
        parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def cached_fingerprint(path: Path, compute: Callable[[], str], files: list[Path] | None = None) -> str:
    """Return ``compute()`` for ``path``, reusing a cached value while its files are unchanged."""
    key = file_stamp(files or [path])
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), str):
        return cache[key]
    value = compute()
    cache[key] = value
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(cache_path)
    except OSError:
        pass  # a read-only home only costs a recomputation next time
    return value
