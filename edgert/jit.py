"""Whether numba's on-disk cache already holds edgert's compiled kernels.

The first run after an install compiles every kernel (tens of seconds on a small
device); later runs load machine code from the cache in milliseconds. The CLI uses this
to say so up front instead of looking hung.
"""

from __future__ import annotations

from numba.core.registry import CPUDispatcher


def _dispatchers():
    from edgert import kernels, sample
    from edgert.models import base
    from edgert.quant import kernels as qkernels
    from edgert.quant import kv_kernels

    for mod in (kernels, qkernels, kv_kernels, sample, base):
        for obj in vars(mod).values():
            if isinstance(obj, CPUDispatcher) and obj._cache is not None:
                yield obj


def kernels_cached() -> bool:
    """True unless some kernel has no valid entry in numba's cache for its current source."""
    for d in _dispatchers():
        try:
            if not d._cache._cache_file._load_index():
                return False
        except Exception:  # numba internals moved: we cannot tell, so do not claim a compile
            continue
    return True
