"""The packed stream file: the streamed units' weights, already repacked for the fast kernels.

Resident weights are repacked once at load into the 16-row interleaved records that the
AVX512-VNNI kernels run on (edgert.quant.pack: 28-30 GB/s on 2 threads). A streamed unit is
read again every token, so repacking it as it arrives would cost more than the read, and
computing on the model file's raw GGUF blocks runs at 3-4 GB/s: on a 7B under a 1.5 GB
budget that is ~1.3 s of compute per token, on the two cores the reader needs too. So the
packed bytes are written once to a sidecar file in the cache folder, and the streamer reads
them from there into its slots, where the model views them as `PackedWeight`s (no copy).
The packed and raw kernels give the same bits, so streamed logits equal resident ones.

The file holds *units*, not tensors: each unit is one block starting on an ALIGN boundary
(one O_DIRECT read), its tensors one after another (PIECE_ALIGN apart): packed records for
the block types that have them, the raw bytes for the rest (biases, float tensors), so a
unit reads from this one file. A unit's block is a pure function of the unit (`block`), so
the planner sizes slots from it before the file exists. A head row chunk packs its own
rows (chunks start on 16-row groups, so the bytes are those of the whole tensor's packing).

Which units are in it: every unit of the model that packs, whatever the plan streams, so
that it is written once per model: plans drift with the runtime's measured overhead and
with the budget, and a file holding only one plan's units was rewritten on nearly every
run. Units that cannot pack (no block type with records, a CPU without VNNI) stream from
the model file as before, unless they hold a column slice.

A device of a cluster holds a shard: its rows of q/k/v and the FFN's gate and up, which
are contiguous in the model file, and its columns of attn_output and ffn_down, which are
not (one piece of every row, the other devices' pieces between). In the file those
columns are one contiguous piece like any other tensor, so a shard streams with one read
per unit too; the file is then the shard's own (`stream_file_path`).

The file is keyed on the model files' paths, sizes and mtimes, the layout version and the
CPU capability (a shard's description is in its name); it is written under a temporary name
and renamed into place once complete, and its header (written last) records where its index
ends, which must be the file's size: a stale, truncated or damaged file is rebuilt, never
read as weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from edgert.offload.stream import ALIGN, Layout, Piece, Read, layout
from edgert.offload.units import Unit
from edgert.quant.pack import HAVE_VNNI, G, pack, packed_nbytes

from edgert.errors import CacheError, FormatError
from edgert.weights import ColumnSlice, TensorRef, WeightStore

LAYOUT_VERSION = 2  # bump when the records or this file's layout change: old files are rebuilt
MAGIC = b"EDGERTPK"
_HEADER = struct.Struct("<8sIIQQ")  # magic, layout version, reserved, index offset, index length
PIECE_ALIGN = 64  # a tensor's records start on a cache line
CHUNK = 8 << 20  # source bytes packed at a time: the build never holds a large tensor twice
_SYNC = 64 << 20  # written bytes between flushes out of the page cache

Progress = Callable[[str, int, int], None]  # (what, done, total), as edgert.hub's


def _up(n: int, a: int) -> int:
    return -(-n // a) * a


class Block(NamedTuple):
    """A unit's bytes in the packed file: each tensor (a catalog ref, the row slice of one
    that the unit holds, or a shard's ColumnSlice of one) and its piece (`pos` from the
    block's start), and the block's size."""

    parts: tuple[tuple[TensorRef | ColumnSlice, Piece], ...]
    nbytes: int

    @property
    def signature(self) -> str:
        """What the reader expects of the block; a file whose unit differs is rebuilt."""
        desc = [(r.name, r.offset, r.nbytes, int(r.qtype), r.shape, tuple(p)) for r, p in self.parts]
        return hashlib.sha1(repr(desc).encode()).hexdigest()[:16]


def block(unit: Unit) -> Block | None:
    """The unit's block in a packed file, or None when it gains nothing from one: none of its
    tensors has a packed record layout here and none is a column slice. A column slice (a
    shard's columns of attn_output or ffn_down, strided in the model file) is written here as
    one contiguous piece, records or raw rows, so that it streams as one read."""
    if not unit.parts or not all(type(r) in (TensorRef, ColumnSlice) for r in unit.parts):
        return None
    parts, at, gains = [], 0, False
    for ref in sorted(unit.parts, key=lambda r: r.offset):
        n = packed_nbytes(ref.qtype, ref.n_rows, ref.shape[-1]) if len(ref.shape) == 2 else None
        size = n or ref.n_rows * ref.row_bytes  # a column slice's rows, made contiguous
        gains |= n is not None or type(ref) is ColumnSlice
        parts.append((ref, Piece(at, size, n is not None)))
        end = at + size
        at = _up(end, PIECE_ALIGN)
    return Block(tuple(parts), end) if gains else None


def slot_bytes(unit: Unit) -> int:
    """What one slot must hold to take this unit when it streams from a packed file."""
    b = block(unit)
    if b is None:
        from edgert.offload.stream import slot_bytes as raw

        return raw(unit)
    return _up(b.nbytes, ALIGN)


class StreamFile:
    """An open, valid packed stream file: where each of its units' blocks lies."""

    def __init__(self, path: Path, units: dict[str, tuple[int, int, str]]):
        self.path = path
        self.units = units  # name -> (offset, bytes, block signature)

    def has(self, unit: Unit, b: Block | None = None) -> bool:
        b = b or block(unit)
        entry = self.units.get(unit.name)
        return b is not None and entry is not None and entry[1:] == (b.nbytes, b.signature)

    def layout(self, unit: Unit) -> Layout:
        """Where the unit's bytes go in a slot: read from this file when it packs, else from
        the model file (`edgert.offload.stream.layout`).

        Raises:
            FormatError: a unit that packs but is not in the file (it was built for other units).
        """
        b = block(unit)
        if b is None:
            return layout(unit)
        if not self.has(unit, b):
            raise FormatError(f"{self.path} lacks unit {unit.name}; delete the file and load again")
        off, n = self.units[unit.name][:2]
        size = _up(n, ALIGN)
        return Layout(unit, self.path, (Read(off, size, 0, n),), size, {r.offset: p for r, p in b.parts})


def stream_file_path(model: Path, cache_dir: Path, shard: str = "") -> Path:
    """The packed file of `model` in the cache: one per model path and `shard` (a device's
    shard, described; "" for the whole model). Its size, mtime and the layout version are
    checked inside."""
    key = str(Path(model).resolve()) + (f"\n{shard}" if shard else "")
    tag = hashlib.sha1(key.encode()).hexdigest()[:12]
    return Path(cache_dir) / "packed" / f"{Path(model).name}.{tag}.packed"


def _key(store: WeightStore) -> dict:
    sources = {}
    for p in sorted({str(r.path) for r in store.refs.values()}):
        st = os.stat(p)
        sources[p] = [st.st_size, st.st_mtime_ns]
    return {"layout": LAYOUT_VERSION, "cpu": "avx512vnni" if HAVE_VNNI else "", "sources": sources}


def read_index(path: Path, store: WeightStore) -> StreamFile | None:
    """The file at `path` if it is complete and was built from the model `store` catalogs as
    it is now; None if it is missing, stale (the model or the layout changed), truncated or
    damaged."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            magic, version, _, ioff, ilen = _HEADER.unpack(f.read(_HEADER.size))
            if magic != MAGIC or version != LAYOUT_VERSION or ioff < ALIGN or ioff + ilen != size:
                return None
            f.seek(ioff)
            meta = json.loads(f.read(ilen))
        units = {n: (int(o), int(b), str(s)) for n, (o, b, s) in meta["units"].items()}
    except (OSError, struct.error, ValueError, KeyError, TypeError):
        return None
    if meta.get("key") != _key(store) or any(o < ALIGN or o + b > ioff for o, b, _ in units.values()):
        return None
    return StreamFile(path, units)


def stream_file(
    model: Path,
    store: WeightStore,
    units: Sequence[Unit],
    streamed: Iterable[str],
    cache_dir: Path,
    progress: Progress | None = None,
    shard: str = "",
) -> StreamFile | None:
    """The packed stream file holding the `streamed` units (of the model's `units`) that pack:
    the one in the cache if it is valid and has them, else built with every unit that packs
    and renamed into place. None when none of the streamed units packs. `shard` describes
    the device's shard that `units` hold ("" for the whole model): each has its own file.

    Raises:
        CacheError: the file cannot be written (the message names it and what to do).
        FormatError: the model file is truncated.
    """
    by_name = {u.name: u for u in units}
    want = {n for n in streamed if block(by_name[n]) is not None}
    if not want:
        return None
    path = stream_file_path(model, cache_dir, shard)
    have = read_index(path, store)
    if have is not None and all(have.has(by_name[n]) for n in want):
        return have
    # once for every plan: each unit that can stream whole (not an embedding read by rows)
    want = {u.name for u in units if block(u) is not None and not (u.kind == "embedding" and u.per_token < 1)}
    try:
        _build(path, store, [u for u in units if u.name in want], progress)
    except OSError as e:
        raise CacheError(
            f"cannot write the packed stream file {path}: {e.strerror or e}. Free some space, choose "
            "another cache folder (EDGERT_HOME for the CLI, cache_dir for edgert.load), or stream "
            "from the model file (EDGERT_PACKED_STREAM=0, pack_stream=False)"
        ) from None
    done = read_index(path, store)
    if done is None:  # the model file changed while it was packed
        raise FormatError(f"{model} changed while its packed stream file was being written; load it again")
    return done


def _build(path: Path, store: WeightStore, units: Sequence[Unit], progress: Progress | None) -> None:
    """Write `units`' blocks, then the index, then the header, to a temporary file; rename it."""
    blocks = [(u, block(u)) for u in units]
    total = sum(b.nbytes for _, b in blocks)
    what = f"packing the streamed weights into {path.name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # like the models beside it (mkstemp makes it private)
    w = _Writer(fd, store, lambda n: progress(what, n, total) if progress else None)
    try:
        index, off = {}, ALIGN
        for u, b in blocks:
            for ref, piece in b.parts:
                w.piece(ref, piece, off + piece.pos)
            index[u.name] = [off, b.nbytes, b.signature]
            off = _up(off + b.nbytes, ALIGN)
        meta = json.dumps({"key": _key(store), "units": index}).encode()
        w.write(np.frombuffer(meta, np.uint8), off)
        w.write(np.frombuffer(_HEADER.pack(MAGIC, LAYOUT_VERSION, 0, off, len(meta)), np.uint8), 0)
        w.flush()
        os.close(fd)
        fd = -1
        os.replace(tmp, path)  # only a complete file ever has the name
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)
        raise
    finally:
        w.close()


class _Writer:
    """Reads tensors from the model files a chunk at a time, packs them, writes them out, and
    keeps neither side in the page cache (it would be a hidden copy of the model)."""

    def __init__(self, fd: int, store: WeightStore, progress: Callable[[int], None]):
        self.fd, self.store, self.progress = fd, store, progress
        self.src: dict[Path, int] = {}
        self.done = self.unsynced = 0

    def piece(self, ref: TensorRef | ColumnSlice, piece: Piece, at: int) -> None:
        src = self.src.get(ref.path)
        if src is None:
            src = self.src[ref.path] = os.open(ref.path, os.O_RDONLY)
        if piece.interleaved or type(ref) is ColumnSlice:
            self._rows(src, ref, piece, at)
            return
        for o in range(0, ref.nbytes, CHUNK):
            self.write(self._read(src, ref, ref.offset + o, min(CHUNK, ref.nbytes - o)), at + o)
            self.progress(self.done)

    def _rows(self, src: int, ref: TensorRef | ColumnSlice, piece: Piece, at: int) -> None:
        """A matrix, whole groups of 16 rows at a time so that a chunk's records are contiguous,
        packed into records, or without them (a column slice of a type that has none) copied.
        A column slice's rows are read whole, the other shards' pieces between ours too: this
        is done once."""
        stride = ref.stride if type(ref) is ColumnSlice else ref.row_bytes
        out = packed_nbytes(ref.qtype, G, ref.shape[-1]) if piece.interleaved else G * ref.row_bytes
        step = max(G, CHUNK // stride // G * G)
        for r0 in range(0, ref.n_rows, step):
            n = min(step, ref.n_rows - r0)
            span = self._read(src, ref, ref.offset + r0 * stride, (n - 1) * stride + ref.row_bytes)
            rows = np.lib.stride_tricks.as_strided(span, (n, ref.row_bytes), (stride, 1))
            self.write(pack(rows, ref.qtype).data.reshape(-1), at + r0 // G * out)
            self.progress(self.done)

    def _read(self, src: int, ref: TensorRef | ColumnSlice, offset: int, n: int) -> np.ndarray:
        buf = np.empty(n, np.uint8)
        got = 0
        while got < n:
            m = os.preadv(src, [memoryview(buf[got:])], offset + got)
            if m == 0:
                raise FormatError(f"{ref.path}: the file is truncated (tensor {ref.name!r}); re-download it")
            got += m
        os.posix_fadvise(src, offset, n, os.POSIX_FADV_DONTNEED)
        return buf

    def write(self, data: np.ndarray, at: int) -> None:
        view, got = memoryview(data), 0
        while got < len(view):
            got += os.pwrite(self.fd, view[got:], at + got)
        self.done += len(view)
        self.unsynced += len(view)
        if self.unsynced >= _SYNC:
            self.flush()

    def flush(self) -> None:
        os.fdatasync(self.fd)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self.unsynced = 0

    def close(self) -> None:
        for fd in self.src.values():
            os.close(fd)
        self.src.clear()
