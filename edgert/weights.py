"""The weight catalog: tensor references (file, byte range, block type, shape) and their bytes.

A model is a catalog of `TensorRef`s; nothing is read when it is built. `WeightStore.raw`
maps a tensor's bytes (read-only, zero copy) as a 2-D uint8 array of whole rows, the form
every kernel takes. GGUF files and HF safetensors files give the same kind of catalog.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgert.errors import FormatError, UnsupportedError
from edgert.gguf import GGUFFile
from edgert.quant.formats import BLOCK_SIZE, TYPE_SIZE, QType, dequantize, row_nbytes

_ST_DTYPES = {"F32": QType.F32, "F16": QType.F16, "BF16": QType.BF16}


@dataclass(frozen=True)
class TensorRef:
    """A tensor's bytes on disk. `shape` is numpy order (..., rows, row_length)."""

    name: str
    path: Path
    offset: int
    nbytes: int
    qtype: QType
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return row_nbytes(self.qtype, self.shape[-1])

    @property
    def n_rows(self) -> int:
        return self.nbytes // self.row_bytes

    def rows(self, start: int, stop: int, name: str | None = None) -> TensorRef:
        """Rows [start, stop) of the flattened (rows, row_length) view: a contiguous byte range."""
        rb = self.row_bytes
        return replace(
            self,
            name=name or self.name,
            offset=self.offset + start * rb,
            nbytes=(stop - start) * rb,
            shape=(stop - start, self.shape[-1]),
        )

    def elements(self, start: int, stop: int) -> TensorRef:
        """Elements [start, stop) of a vector (a shard's share of a bias)."""
        item = self.nbytes // self.shape[0]
        return replace(
            self, offset=self.offset + start * item, nbytes=(stop - start) * item, shape=(stop - start,)
        )

    def columns(self, start: int, stop: int) -> ColumnSlice:
        """Columns [start, stop) of every row (a shard's share of attn_output or ffn_down).

        Raises:
            UnsupportedError: a boundary inside a quantization block.
        """
        bs, ts = BLOCK_SIZE[self.qtype], TYPE_SIZE[self.qtype]
        if start % bs or stop % bs:
            raise UnsupportedError(f"{self.name}: a shard boundary at column {start}/{stop} splits a block")
        piece = replace(self, offset=self.offset + start // bs * ts, nbytes=(stop - start) // bs * ts)
        return ColumnSlice(piece, self.n_rows, self.row_bytes)

    def split(self, name_fmt: str) -> list[TensorRef]:
        """A stacked 3-D tensor (n, rows, cols) as n 2-D refs, e.g. one per MoE expert."""
        n, r = self.shape[0], self.shape[1]
        return [self.rows(e * r, (e + 1) * r, name_fmt.format(e)) for e in range(n)]


@dataclass(frozen=True)
class ColumnSlice:
    """Columns of a matrix's rows: `repeat` pieces of `ref.nbytes`, `stride` bytes apart from
    `ref.offset`. It reads as the matrix it is (`n_rows`, `row_bytes`, `shape`), while
    `nbytes` stays one piece, as the file's byte ranges count it."""

    ref: TensorRef  # the first row's piece
    repeat: int
    stride: int

    name = property(lambda self: self.ref.name)
    path = property(lambda self: self.ref.path)
    offset = property(lambda self: self.ref.offset)
    nbytes = property(lambda self: self.ref.nbytes)
    qtype = property(lambda self: self.ref.qtype)
    n_rows = property(lambda self: self.repeat)
    row_bytes = nbytes  # a row of the slice is one piece

    @property
    def shape(self) -> tuple[int, int]:
        return self.repeat, self.nbytes // TYPE_SIZE[self.qtype] * BLOCK_SIZE[self.qtype]


# The largest folio the page cache maps on one fault: a PMD (2 MiB with 4 KiB pages).
_FOLIO = mmap.PAGESIZE // 8 * mmap.PAGESIZE


class WeightStore:
    """Maps tensor names to refs, and refs to bytes (one read-only mapping per file)."""

    packs = True  # `linear` repacks these bytes for the kernels (a streamer's slots do not)
    drop_cache = False  # evict drops the bytes from the page cache too (under a memory budget)

    def __init__(self, refs: dict[str, TensorRef]):
        self.refs = refs
        self._maps: dict[Path, np.memmap] = {}
        self._fds: dict[Path, int] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.refs

    def ref(self, name: str) -> TensorRef:
        try:
            return self.refs[name]
        except KeyError:
            raise FormatError(f"model is missing tensor {name!r}") from None

    def raw(self, ref: TensorRef | str) -> np.ndarray:
        """The tensor as uint8 [rows, row_bytes], a zero-copy view of the file."""
        ref = self.ref(ref) if isinstance(ref, str) else ref
        mm = self._maps.get(ref.path)
        if mm is None:
            mm = self._maps[ref.path] = np.memmap(ref.path, dtype=np.uint8, mode="r")
        if ref.offset + ref.nbytes > mm.shape[0]:
            raise FormatError(f"{ref.path}: file is truncated (tensor {ref.name!r}); re-download it")
        return mm[ref.offset : ref.offset + ref.nbytes].reshape(-1, ref.row_bytes)

    def evict(self, ref: TensorRef, rows: tuple[int, int] | None = None) -> None:
        """Tell the OS this process is done with a tensor's bytes (or those of rows [start,
        stop)): its mapped pages stop counting as ours, so a copy made from them is not held
        twice. With `drop_cache` they leave the page cache too, which a memory cgroup counts.

        The span unmapped reaches out to the largest page-cache folio around the bytes: Linux
        (6.18 on ext4, here) maps a whole large folio on a fault, so reading a 4 KiB norm
        maps up to 2 MiB of the weights beside it, and over a model's load those pages added
        up to 50 MiB (SmolLM2: peak RSS 241 MiB, 40 over what it holds). Unmapping a page
        another tensor still reads only costs a refault from the page cache. The page cache
        drops only the bytes' own pages: a neighbour's may be read next."""
        mm = self._maps.get(ref.path)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        lo, hi = ref.offset, ref.offset + ref.nbytes
        if rows is not None:
            lo, hi = ref.offset + rows[0] * ref.row_bytes, ref.offset + rows[1] * ref.row_bytes
        if hi <= lo:
            return
        start = lo // _FOLIO * _FOLIO
        mm._mmap.madvise(mmap.MADV_DONTNEED, start, -(-hi // _FOLIO) * _FOLIO - start)  # clamped to the file
        first, last = -(-lo // mmap.PAGESIZE) * mmap.PAGESIZE, hi // mmap.PAGESIZE * mmap.PAGESIZE
        if self.drop_cache and last > first:
            fd = self._fds.get(ref.path)
            if fd is None:
                fd = self._fds[ref.path] = os.open(ref.path, os.O_RDONLY)
            os.posix_fadvise(fd, first, last - first, os.POSIX_FADV_DONTNEED)

    def release(self) -> None:
        """Drop the file mappings (a later `raw` maps the file again)."""
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def f32(self, ref: TensorRef | str) -> np.ndarray:
        """A small tensor (norm weights, biases) dequantized into its own float32 array."""
        ref = self.ref(ref) if isinstance(ref, str) else ref
        out = np.ascontiguousarray(dequantize(self.raw(ref), ref.qtype, ref.shape), dtype=np.float32)
        self.evict(ref)
        return out

    def nbytes(self, prefix: str = "") -> int:
        return sum(r.nbytes for n, r in self.refs.items() if n.startswith(prefix))


def gguf_catalog(gf: GGUFFile) -> dict[str, TensorRef]:
    return {
        t.name: TensorRef(t.name, gf.path, t.offset, t.nbytes, t.qtype, t.shape) for t in gf.tensors.values()
    }


def safetensors_catalog(path: str | os.PathLike) -> dict[str, TensorRef]:
    """Parse a .safetensors header (8-byte length + JSON) into refs; reads no tensor data."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 1 << 28):
            raise FormatError(f"{path}: corrupt safetensors header (length {n:,})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: corrupt safetensors header ({e})") from None
    base = 8 + n
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: corrupt safetensors entry for {name!r}") from None
        if dtype not in _ST_DTYPES:
            raise UnsupportedError(f"{path}: tensor {name!r} has dtype {dtype}; edgert reads F32, F16, BF16")
        qtype = _ST_DTYPES[dtype]
        expect = int(np.prod(shape, dtype=np.int64)) * (4 if qtype == QType.F32 else 2)
        if end - begin != expect:
            raise FormatError(f"{path}: tensor {name!r} has {end - begin} bytes, expected {expect}")
        if base + end > size:
            raise FormatError(f"{path}: file is truncated (tensor {name!r} ends past the end of the file)")
        refs[name] = TensorRef(name, path, base + begin, end - begin, qtype, shape or (1,))
    return refs
