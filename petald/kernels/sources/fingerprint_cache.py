"""Weights fingerprints are costly for large files: cache them by path, size and mtime."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from petald.kernels.cache_dir import petald_cache_dir, read_json, write_json


def file_stamp(paths: list[Path]) -> str:
    parts = []
    for p in sorted(paths):
        st = p.stat()
        parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def cached_fingerprint(path: Path, compute: Callable[[], str], files: list[Path] | None = None) -> str:
    """Return ``compute()`` for ``path``, reusing a cached value while its files are unchanged."""
    key = file_stamp(files or [path])
    cache_path = petald_cache_dir() / "fingerprints.json"
    cache = read_json(cache_path)
    cache = cache if isinstance(cache, dict) else {}
    if isinstance(cache.get(key), str):
        return cache[key]
    value = compute()
    cache[key] = value
    write_json(cache_path, cache)
    return value
