"""petald's C kernels (``kernels/native/*.c``): compiled into one shared library on first use, loaded with ctypes,
and the one place that decides which of them runs on this CPU.

They are plain C, not a torch extension: no Python or torch headers, no ninja, one ``cc``
call (a few seconds), cached under petald's cache directory by the sources', compiler's,
flags' and machine's hash. Each kernel comes in variants for an instruction set (``Variant``):
AVX512 (int4: AVX512-BF16) and AVX2 with FMA, the CPUs most volunteers have. ``NativeLibrary.choose``
picks, per kernel, the first variant this CPU runs (``cpu_features``), or the one
``PETALD_CPU_KERNELS`` names (``CPU_KERNEL_SETTINGS``: ``auto``, the default; ``avx512``; ``avx2``,
which also makes a CPU with AVX512 act as an AVX2-only one, bfloat16 included, so that it tests
those paths; ``torch``: none of petald's kernels). Where there is no C compiler, or the library
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from petald.kernels.cache_dir import petald_cache_dir

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in (
    "cpu_features.c", "int4_matmul.c", "int4_matmul_avx2.c", "int8_matmul.c", "decode_attention_avx512.c",
    "decode_attention_avx2.c")]
HEADERS = [Path(__file__).with_name("decode_attention_body.h")]  # in the build's hash, not on its command line
CFLAGS = ["-O3", "-shared", "-fPIC"]  # no -m flags: the vector functions carry their own target attributes
LIBS = ["-lm"]  # expf, sqrtf
_INT, _PTR = ctypes.c_int, ctypes.c_void_p
# Every exported function's (argument types, result type): ctypes converts and checks by these.
_INT4 = ([_PTR, _INT, _INT, _INT, _PTR, _INT, _INT, _INT, _PTR], _INT)
_INT8 = ([_PTR, _INT, _INT, _PTR, _INT, _INT, _INT, _PTR], _INT)
_ATTENTION = ([_PTR, _INT, _INT, _INT, _INT, _INT, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _INT, _PTR, _INT, _PTR], _INT)
SIGNATURES: dict[str, tuple[list[type], type]] = {
    "petald_cpu_features": ([], _INT),
    "petald_int4_matmul_avx512": _INT4,
    "petald_int4_matmul_avx2": _INT4,
    "petald_int8_matmul_avx512": _INT8,
    "petald_int8_matmul_avx2": _INT8,
    "petald_decode_attention_avx512": _ATTENTION,
    "petald_decode_attention_avx2": _ATTENTION,
}
FEATURE_BITS = ("avx2", "fma", "avx512f", "avx512bw", "avx512bf16")  # cpu_features.c's bits, lowest first

SWITCH = "PETALD_CPU_KERNELS"
CPU_KERNEL_SETTINGS = ("auto", "avx512", "avx2", "torch")


class NativeKernelError(RuntimeError):
    """A call a matmul kernel cannot take (wrong width, device) or a kernel that is not there."""


class CpuKernelError(ValueError):
    """``PETALD_CPU_KERNELS`` names no kernel set, or one this CPU cannot run."""


@dataclass(frozen=True)
class Variant:
    """One instruction set's build of a kernel: its name in ``PETALD_CPU_KERNELS``, C function and CPU needs."""

    isa: str
    symbol: str
    needs: frozenset[str]


@dataclass(frozen=True)
class ChosenKernel:
    """The variant of a kernel that runs here, and its C function."""

    isa: str
    function: Any


def cpu_kernel_setting() -> str:
    """``PETALD_CPU_KERNELS``, read at each choice (default ``auto``); an unknown value is an error."""
    setting = os.environ.get(SWITCH, "auto").strip().lower() or "auto"
    if setting not in CPU_KERNEL_SETTINGS:
        raise CpuKernelError(f"{SWITCH}={os.environ[SWITCH]!r} is not a kernel set: use one of "
                             f"{', '.join(CPU_KERNEL_SETTINGS)}")
    return setting

_UNLOADED = object()


class NativeLibrary:
    """The C kernels, built into ``cache_dir`` (default: petald's cache directory, read at the
    first use) and loaded at the first use, once: every later caller sees that one outcome. A
    process uses ``PROCESS_LIBRARY``; another instance builds and loads its own (in a fresh
    cache, a fresh build)."""

    def __init__(self, cache_dir: Path | None = None, features: frozenset[str] | None = None):
        self.cache_dir = cache_dir
        self._features = features  # a CPU's view to act as (tests); None: this CPU's own
        self._loaded: ctypes.CDLL | None | object = _UNLOADED
        self._lock = threading.Lock()

    def load(self) -> ctypes.CDLL | None:
        """The compiled kernels, or None (logged once) where they cannot be built or loaded here."""
        with self._lock:  # one build per instance
            if self._loaded is _UNLOADED:
                self._loaded = _load(self.cache_dir or petald_cache_dir())
            return self._loaded  # type: ignore[return-value]

    def cpu_features(self) -> frozenset[str]:
        """The features of ``FEATURE_BITS`` this CPU has (as the library's cpuid says; none where it did
        not load), or the ones this instance was told to act as having."""
        if self._features is not None:
            return self._features
        library = self.load()
        bits = library.petald_cpu_features() if library is not None else 0
        return frozenset(name for i, name in enumerate(FEATURE_BITS) if bits >> i & 1)

    def choose(self, kernel: str, variants: tuple[Variant, ...]) -> ChosenKernel | None:
        """The first of ``variants`` (fastest first) this CPU runs, or the one ``PETALD_CPU_KERNELS``
        names (``CpuKernelError`` if this CPU lacks what it needs); None for torch's path (why, logged
        once): the setting ``torch``, no library, or no variant this CPU runs."""
        setting = cpu_kernel_setting()
        if setting == "torch" or self.load() is None:
            return None
        features = self.cpu_features()
        for variant in variants:
            if setting in ("auto", variant.isa) and variant.needs <= features:
                return ChosenKernel(variant.isa, getattr(self.load(), variant.symbol))
        if setting != "auto":
            needs = next((v.needs for v in variants if v.isa == setting), frozenset())
            raise CpuKernelError(f"{SWITCH}={setting}: petald's {kernel} kernel for {setting} needs "
                                 f"{', '.join(sorted(needs - features)) or 'a variant there is not'}, which this CPU "
                                 f"lacks; use {SWITCH}=auto")
        _log_once(f"this CPU has none of {', '.join(sorted(set().union(*(v.needs for v in variants))))} "
                  f"in the combinations petald's {kernel} kernel needs: it uses torch's ops")
        return None


PROCESS_LIBRARY = NativeLibrary()


def native_bfloat16_view() -> bool:
    """False where ``PETALD_CPU_KERNELS=avx2`` makes this CPU act as one without native bfloat16."""
    return cpu_kernel_setting() != "avx2"


@functools.cache
def _log_once(message: str) -> None:
    log.info(message)


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
    key = b"\0".join([*(source.read_bytes() for source in SOURCES + HEADERS), " ".join(compiler + CFLAGS + LIBS).encode(),
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
