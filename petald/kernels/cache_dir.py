"""Where petald keeps what it computed once (fingerprints, throughput, parsed GGUF metadata), and how.

Every cache file is JSON, written to a temporary file and renamed so that a reader never
sees half a file; a cache that cannot be read or written only costs a recomputation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def petald_cache_dir() -> Path:
    """``$PETALD_CACHE_DIR``, else ``$XDG_CACHE_HOME/petald``, else ``~/.cache/petald``."""
    root = os.environ.get("PETALD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "petald")
    return Path(root)


def read_json(path: Path) -> Any:
    """The file's JSON, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` atomically; a read-only or full disk is not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    except (OSError, TypeError, ValueError):
        pass  # not cacheable here: computed again next time
