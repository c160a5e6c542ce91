"""Whether numba's on-disk cache already holds edgert's compiled kernels.

The first run after an install compiles the kernels it uses (tens of seconds on a small
device); later runs load machine code from the cache in milliseconds. The CLI says so up
front instead of looking hung.

A run compiles only the kernels its path needs (a greedy chat never compiles the 4-bit KV
cache's), so "every kernel is cached" never becomes true for most users; instead the CLI
marks the sources as compiled once a run has generated (`mark_kernels_cached`). The mark is
named after the kernel modules' paths, sizes and modification times, which is what numba's
own cache is keyed on: an upgrade or an edit recompiles, and announces it again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def _kernel_sources() -> list[Path]:
    from edgert import kernels, sample
    from edgert.models import base
    from edgert.quant import kernels as qkernels
    from edgert.quant import kv_kernels, pack

    return [Path(m.__file__) for m in (kernels, qkernels, pack, kv_kernels, sample, base)]


def _mark(cache_dir: Path) -> Path:
    h = hashlib.sha256()
    for f in _kernel_sources():
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return Path(cache_dir) / "compiled" / f"kernels-{h.hexdigest()[:20]}"


def kernels_cached(cache_dir: Path) -> bool:
    """True once a run of these kernel sources has compiled and cached what it used."""
    try:
        return _mark(cache_dir).exists()
    except OSError:  # cannot tell: do not claim a compile
        return True


def mark_kernels_cached(cache_dir: Path) -> None:
    """Record that a run has compiled the kernels (best effort: a read-only cache only means
    the notice shows again)."""
    try:
        m = _mark(cache_dir)
        m.parent.mkdir(parents=True, exist_ok=True)
        m.touch()
    except OSError:
        pass
