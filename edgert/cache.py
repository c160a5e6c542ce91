"""The KV cache: one `KVCache` per layer, passed to the forward as `cache=`.

Storage is fp16 (as llama.cpp's default cache) or float32, [kv_heads, max_len, head_dim],
reserved once with np.empty: the OS backs pages only as positions are written, so resident
memory tracks the used length while the cache never moves or grows (no copy, no allocation
while decoding). numpy rounds to fp16 on write (nearest, ties to even, like F16C).
"""

from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, n_kv_heads: int, head_dim: int, max_len: int, dtype=np.float16):
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float16, np.float32):
            raise ValueError(f"KV cache dtype {self.dtype} is not float16 or float32")
        self.keys = np.empty((n_kv_heads, max_len, head_dim), dtype=self.dtype)
        self.values = np.empty((n_kv_heads, max_len, head_dim), dtype=self.dtype)
        self.offset = 0  # number of positions held

    @property
    def max_len(self) -> int:
        return self.keys.shape[1]

    def update_and_fetch(self, k: np.ndarray, v: np.ndarray, pos: int) -> tuple[np.ndarray, np.ndarray]:
        """Write k, v [T, kv_heads, head_dim] at positions pos..pos+T-1; return the full buffers."""
        T = k.shape[0]
        self.keys[:, pos : pos + T] = k.transpose(1, 0, 2)
        self.values[:, pos : pos + T] = v.transpose(1, 0, 2)
        self.offset = pos + T
        return self.keys, self.values

    def trim(self, n: int) -> int:
        """Forget the last n positions (speculative rollback); returns how many were dropped."""
        n = min(n, self.offset)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        """Bytes holding the used positions (what the budget must count)."""
        return 2 * self.keys.shape[0] * self.offset * self.keys.shape[2] * self.dtype.itemsize
