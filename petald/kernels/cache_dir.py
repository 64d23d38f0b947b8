"""Where petald keeps what it computed once: fingerprints, throughput figures."""

from __future__ import annotations

import os
from pathlib import Path


def petald_cache_dir() -> Path:
    """``$PETALD_CACHE_DIR``, else ``$XDG_CACHE_HOME/petald``, else ``~/.cache/petald``."""
    root = os.environ.get("PETALD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "petald")
    return Path(root)
