"""A native GGUF reader: metadata and a catalog of tensors with byte offsets.

Opening a file reads only its header; tensor bytes are touched when a caller
maps or reads them. Every structural check (magic, version, lengths, offsets,
alignment, the file's end) raises `FormatError` with the path and what is wrong.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgert.errors import FormatError, UnsupportedError
from edgert.quant.formats import BLOCK_SIZE, TYPE_SIZE, QType

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> (struct code, numpy dtype)
_SCALARS = {
    0: ("<B", np.uint8),
    1: ("<b", np.int8),
    2: ("<H", np.uint16),
    3: ("<h", np.int16),
    4: ("<I", np.uint32),
    5: ("<i", np.int32),
    6: ("<f", np.float32),
    7: ("<?", np.bool_),
    10: ("<Q", np.uint64),
    11: ("<q", np.int64),
    12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives. `shape` is numpy order: (..., rows, row_length)."""

    name: str
    qtype: QType
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    """Bounds-checked little-endian reads over the header bytes."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise FormatError(f"{self.path}: truncated or corrupt GGUF header (needs byte {end:,})")
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > 1 << 24:
            raise FormatError(f"{self.path}: corrupt GGUF header (string of {n:,} bytes)")
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype][0])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype in _SCALARS:
                dtype = np.dtype(_SCALARS[etype][1]).newbyteorder("<")
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).copy()
            if etype == _STRING:
                return self._strings(count)
            if etype == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            raise FormatError(f"{self.path}: corrupt GGUF header (array of unknown type {etype})")
        raise FormatError(f"{self.path}: corrupt GGUF header (unknown value type {vtype})")

    def _strings(self, count: int) -> list[str]:
        # Token lists hold up to ~260k strings; a tight loop over the buffer is the fast path.
        buf, pos, out = self.buf, self.pos, []
        end = len(buf)
        unpack_from = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > end:
                raise FormatError(f"{self.path}: truncated GGUF header (string array)")
            (n,) = unpack_from(buf, pos)
            pos += 8
            if pos + n > end:
                raise FormatError(f"{self.path}: truncated GGUF header (string array)")
            out.append(str(buf[pos : pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        return out


class GGUFFile:
    """A parsed GGUF header: `metadata` (plain dict) and `tensors` (name -> TensorInfo)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FormatError(f"{self.path}: no such model file")
        self.file_size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(24)
            if len(head) < 24 or head[:4] != GGUF_MAGIC:
                raise FormatError(f"{self.path}: not a GGUF file (bad magic {head[:4]!r})")
        # The header's size is unknown up front: parse it from a mapping of the file, which reads
        # only the pages the header spans.
        cur = _Cursor(memoryview(np.memmap(self.path, dtype=np.uint8, mode="r")), self.path)
        cur.take(4)
        self.version = cur.unpack("<I")
        if self.version not in (2, 3):
            raise UnsupportedError(f"{self.path}: GGUF version {self.version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise FormatError(f"{self.path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")

        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.unpack("<I"))

        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            if n_dims > 4:
                raise FormatError(f"{self.path}: corrupt tensor info for {name!r} ({n_dims} dims)")
            dims = [cur.unpack("<Q") for _ in range(n_dims)]
            infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))

        align = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if align <= 0 or align & (align - 1):
            raise FormatError(f"{self.path}: bad alignment {align}")
        data_start = -(-cur.pos // align) * align
        del cur  # drop the header mapping; weights are mapped by the weight store

        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, type_id, rel in infos:
            try:
                qtype = QType(type_id)
                block, tsize = BLOCK_SIZE[qtype], TYPE_SIZE[qtype]
            except (ValueError, KeyError):
                raise UnsupportedError(
                    f"{self.path}: tensor {name!r} uses GGML block type {type_id}, which edgert does not "
                    f"read; supported: {', '.join(q.name for q in BLOCK_SIZE)}"
                ) from None
            if dims and dims[0] % block:
                raise FormatError(f"{self.path}: tensor {name!r} row of {dims[0]} is not whole blocks")
            n = int(np.prod(dims, dtype=np.int64)) if dims else 1
            nbytes = n // block * tsize
            offset = data_start + rel
            if rel % align:
                raise FormatError(f"{self.path}: tensor {name!r} is misaligned")
            if offset + nbytes > self.file_size:
                raise FormatError(
                    f"{self.path}: file is truncated: tensor {name!r} ends at byte {offset + nbytes:,} "
                    f"but the file has {self.file_size:,} bytes (re-download it)"
                )
            if name in self.tensors:
                raise FormatError(f"{self.path}: duplicate tensor {name!r}")
            self.tensors[name] = TensorInfo(
                name, qtype, tuple(int(d) for d in reversed(dims)), offset, nbytes
            )

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise FormatError(f"{self.path}: GGUF metadata has no general.architecture")
        return arch
