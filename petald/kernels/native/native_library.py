"""petald's C kernels (``kernels/native/*.c``): compiled into one shared library on first use, loaded with ctypes.

They are plain C, not a torch extension: no Python or torch headers, no ninja, one ``cc``
call (about a second), cached under petald's cache directory by the sources', compiler's,
flags' and machine's hash. Each kernel's module (``int4_native.py``, ``decode_attention.py``)
asks this one for the library (``PROCESS_LIBRARY``, unless handed another ``NativeLibrary``)
and checks the CPU features its kernel needs; where there is no C compiler, or the library
will not build or load, every caller keeps its torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from petald.kernels.cache_dir import petald_cache_dir

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("int4_matmul.c", "decode_attention.c")]
CFLAGS = ["-O3", "-shared", "-fPIC"]  # no -m flags: the AVX512 functions carry their own target attributes
LIBS = ["-lm"]  # expf, sqrtf
_INT, _PTR = ctypes.c_int, ctypes.c_void_p
# Every exported function's (argument types, result type): ctypes converts and checks by these.
SIGNATURES: dict[str, tuple[list[type], type]] = {
    "petald_int4_cpu_supported": ([], _INT),
    "petald_int4_matmul": ([_PTR, _INT, _INT, _INT, _PTR, _INT, _INT, _INT, _PTR], _INT),
    "petald_attention_cpu_supported": ([], _INT),
    "petald_decode_attention": ([_PTR, _INT, _INT, _INT, _INT, _INT, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _INT,
                                 _PTR, _INT, _PTR], _INT),
}

_UNLOADED = object()


class NativeLibrary:
    """The C kernels, built into ``cache_dir`` (default: petald's cache directory, read at the
    first use) and loaded at the first use, once: every later caller sees that one outcome. A
    process uses ``PROCESS_LIBRARY``; another instance builds and loads its own (in a fresh
    cache, a fresh build)."""

    def __init__(self, cache_dir: Path | None = None):
        self.cache_dir = cache_dir
        self._loaded: ctypes.CDLL | None | object = _UNLOADED
        self._lock = threading.Lock()

    def load(self) -> ctypes.CDLL | None:
        """The compiled kernels, or None (logged once) where they cannot be built or loaded here."""
        with self._lock:  # one build per instance
            if self._loaded is _UNLOADED:
                self._loaded = _load(self.cache_dir or petald_cache_dir())
            return self._loaded  # type: ignore[return-value]

    def running(self, cpu_check: str, lacking: str) -> ctypes.CDLL | None:
        """The library where it loaded and its function ``cpu_check`` says this CPU has what a
        kernel needs; else None, with ``lacking`` logged once."""
        library = self.load()
        return library if library is not None and _cpu_has(library, cpu_check, lacking) else None


PROCESS_LIBRARY = NativeLibrary()


@functools.cache
def _cpu_has(library: ctypes.CDLL, cpu_check: str, lacking: str) -> bool:
    if getattr(library, cpu_check)():
        return True
    log.info(lacking)
    return False


def _load(cache_dir: Path) -> ctypes.CDLL | None:
    try:
        path = _build(cache_dir, rebuild=False)
        try:
            library = ctypes.CDLL(str(path))
        except OSError:  # a truncated or foreign file in the cache: build it again, once
            library = ctypes.CDLL(str(_build(cache_dir, rebuild=True)))
        for name, (argtypes, restype) in SIGNATURES.items():
            function = getattr(library, name)  # AttributeError: a library without this kernel
            function.argtypes, function.restype = argtypes, restype
    except (OSError, subprocess.SubprocessError, RuntimeError, AttributeError) as e:
        log.warning("petald's C kernels are not available (%s): --quant int4 uses torch's kernel (about half "
                    "as fast) and decode attention torch's ops", e)
        return None
    return library


def _build(cache_dir: Path, rebuild: bool) -> Path:
    """Compile the sources into ``cache_dir`` (once per sources, compiler, flags and machine)."""
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or ""]
    if not compiler[0]:
        raise RuntimeError("no C compiler (cc) on PATH")
    key = b"\0".join([*(source.read_bytes() for source in SOURCES), " ".join(compiler + CFLAGS + LIBS).encode(),
                      platform.machine().encode()])
    target = cache_dir / "native" / f"petald_kernels-{hashlib.sha256(key).hexdigest()[:16]}.so"
    if target.exists() and not rebuild:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    os.close(fd)
    try:
        result = subprocess.run([*compiler, *CFLAGS, "-o", tmp, *map(str, SOURCES), *LIBS],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(compiler)} failed: {result.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: another process sees the old file or the whole new one
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target
