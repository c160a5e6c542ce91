"""`Memory`: a byte count as a value, parsed from and printed in human units.

"1.5GiB", "800MB", "2G", "512M", "4096" (bytes) all parse. Binary suffixes (KiB, MiB, GiB,
TiB) are powers of 1024 and decimal ones (kB, MB, GB, TB) powers of 1000, as `free` and
`df -H` use them; a bare letter (K, M, G, T) means the binary unit, as `ulimit`, `docker
--memory` and `java -Xmx` read it.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import math
import re
from dataclasses import dataclass
from functools import total_ordering

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


@total_ordering
@dataclass(frozen=True)
class Memory:
    """A non-negative number of bytes. Supports +, -, * and / by numbers, and comparisons."""

    bytes: int

    def __post_init__(self):
        if not isinstance(self.bytes, int) or isinstance(self.bytes, bool):
            raise TypeError(f"Memory holds an int number of bytes, not {type(self.bytes).__name__}")
        if self.bytes < 0:
            raise ValueError(f"a memory size cannot be negative ({self.bytes} bytes)")

    @classmethod
    def parse(cls, text: str | int | Memory) -> Memory:
        """'1.5GiB', '800MB', '2G', '512M', '4096' -> Memory. Raises ValueError on anything else."""
        if isinstance(text, Memory):
            return text
        if isinstance(text, int) and not isinstance(text, bool):
            return cls(text)
        m = _PATTERN.match(str(text))
        unit = m[2].lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(
                f"cannot read {text!r} as a memory size: write a number with an optional unit, "
                "e.g. 512M, 1.5GiB, 800MB, 2G (K/M/G/T and KiB/MiB/GiB are powers of 1024; "
                "kB/MB/GB powers of 1000)"
            )
        value = float(m[1]) * _UNITS[unit]
        if not math.isfinite(value):
            raise ValueError(f"cannot read {text!r} as a memory size: it is not finite")
        return cls(round(value))

    @classmethod
    def of(cls, value: float) -> Memory:
        """Bytes from a float (rounded up): for sizes computed as fractions."""
        return cls(math.ceil(value))

    def __str__(self) -> str:
        return self.human()

    def human(self) -> str:
        """'512 B', '7.50 KiB', '1.25 GiB': binary units, three significant digits."""
        n = self.bytes
        for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if n >= size:
                v = n / size
                return f"{v:.3g} {unit}" if v >= 100 else f"{v:.2f} {unit}"
        return f"{n} B"

    def __int__(self) -> int:
        return self.bytes

    def __index__(self) -> int:
        return self.bytes

    def __add__(self, other: Memory) -> Memory:
        if not isinstance(other, Memory):
            return NotImplemented
        return Memory(self.bytes + other.bytes)

    def __radd__(self, other):  # sum() starts from 0
        if other == 0:
            return self
        return NotImplemented

    def __sub__(self, other: Memory) -> Memory:
        """Raises ValueError when the result would be negative (sizes are never negative)."""
        if not isinstance(other, Memory):
            return NotImplemented
        return Memory(self.bytes - other.bytes)

    def __mul__(self, k: int | float) -> Memory:
        if isinstance(k, Memory) or not isinstance(k, (int, float)):
            return NotImplemented
        return Memory(self.bytes * k) if isinstance(k, int) else Memory.of(self.bytes * k)

    __rmul__ = __mul__

    def __truediv__(self, other: Memory | int | float):
        """Memory / Memory is a ratio (float); Memory / number is a Memory (rounded up)."""
        if isinstance(other, Memory):
            return self.bytes / other.bytes
        if isinstance(other, (int, float)):
            return Memory.of(self.bytes / other)
        return NotImplemented

    def __floordiv__(self, other: Memory) -> int:
        if not isinstance(other, Memory):
            return NotImplemented
        return self.bytes // other.bytes

    def __lt__(self, other: Memory) -> bool:
        if not isinstance(other, Memory):
            return NotImplemented
        return self.bytes < other.bytes

    def __bool__(self) -> bool:
        return self.bytes > 0


ZERO = Memory(0)


def release_free_heap() -> None:
    """Hand the heap's free pages back to the OS, so that the resident set is what the process
    holds: opening a model frees the transient strings of its vocabulary and tokenizer (16 MiB
    for a 152k-token vocabulary), which glibc otherwise keeps. A no-op without glibc."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now (file pages are re-read if touched again)


def release_library_pages(name: str = "libllvmlite") -> None:
    """Hand back the resident pages of the shared library `name`: numba's compiler (LLVM,
    a 170 MB file) has 40 MiB of it resident after `import numba`, touched by its static
    initialisers and symbol binding, and the kernels run without it once they are loaded.
    Clean file pages, so nothing is lost: a page touched again (loading another kernel from
    numba's cache) is read back. A no-op where the kernel or libc lacks madvise(PAGEOUT)."""
    madvise = _madvise()
    if madvise is None:
        return
    try:
        with open("/proc/self/maps") as f:
            spans = [line.split(None, 1)[0] for line in f if line.rstrip().endswith(name + ".so")]
    except OSError:
        return
    for span in spans:
        lo, hi = (int(x, 16) for x in span.split("-"))
        madvise(lo, hi - lo, MADV_PAGEOUT)  # EINVAL on kernels before 5.4: nothing happens


@functools.cache
def _madvise():
    try:
        f = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return f


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # the process's own symbols: glibc's, where it is glibc
    except (OSError, AttributeError):
        return None
