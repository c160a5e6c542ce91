"""The streamer: carries out a plan's streamed units through a ring of preallocated slots.

The streamed units are used in a fixed cyclic order (a layer's attention, its FFN's gate,
up and down, ..., the head, then the first streamed layer again for the next token), so the
slots form a ring buffer: item k of the endless sequence is unit k mod n, and it lives in
slot k mod window. Background readers (two, so a request is always queued) fill item k as
soon as item k - window has been released, so the disk is always busy up to `window` units
ahead of the compute, and the window wraps from the last layer to the first with no pause
between tokens. Compute `acquire`s the unit it needs next (it waits only if the read is
still in flight) and, in doing so, releases the previous one. MoE experts, whose use is
known only once their layer has routed, go through `ExpertCache` instead.

Reads are one `preadv` per merged byte range of a unit (a layer's attention block or an FFN
projection is one range of tens of MiB), so they are large and sequential. They bypass the
page cache with O_DIRECT where the file system allows it, because the page cache would
otherwise become a hidden second copy of every streamed byte, counted against a memory
cgroup's limit, and because on the machines measured it is also the faster path (cold
reads of the 7B file, 8 MiB requests: 1.0 GB/s with O_DIRECT against 0.12-0.23 GB/s
buffered in this sandbox's VM). Where O_DIRECT is refused, reads are buffered and the
pages are dropped from the cache with POSIX_FADV_DONTNEED once copied.

Kernels read a streamed unit straight from its slot (no copy). A unit's bytes come either
from the model file, as its GGUF blocks, which only the raw-layout kernels take (3-4 GB/s
on 2 threads), or from the packed stream file (edgert.offload.packed), which holds them
already repacked into the row-interleaved records of the packed kernels (28-30 GB/s), and
a shard's column slices made contiguous: the `Layout` says which, and where each tensor
lies in the slot.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from edgert.quant.pack import PackedWeight

from edgert.errors import FormatError, UnsupportedError
from edgert.weights import TensorRef, WeightStore

if TYPE_CHECKING:  # units imports the models, which import this module
    from edgert.offload.units import Unit

ALIGN = 4096  # O_DIRECT needs offsets, lengths and buffer addresses aligned to the block size
CHUNK = 1 << 30  # one preadv moves at most this much (Linux caps a read near 2 GiB)


class Read(NamedTuple):
    """Bytes [offset, offset + nbytes) of the file land at `pos` in the slot; `need` of them
    (from the start) must be there, the rest is alignment padding past the unit's bytes."""

    offset: int
    nbytes: int
    pos: int
    need: int


class Piece(NamedTuple):
    """One tensor of a unit read from the packed stream file: `nbytes` at slot position `pos`,
    packed records if `interleaved`, else the tensor's raw bytes (biases, float tensors, a
    shard's column slice of a type without records: its rows made contiguous)."""

    pos: int
    nbytes: int
    interleaved: bool


@dataclass(frozen=True)
class Layout:
    """Where one unit's bytes sit in a slot. `pieces` is empty when the unit is read from the
    model file (a tensor then lies at the slot position of its file bytes); for a unit read
    from the packed stream file it maps each tensor's model-file offset to its piece."""

    unit: Unit
    path: Path
    reads: tuple[Read, ...]
    size: int  # slot bytes this unit needs
    pieces: Mapping[int, Piece] = field(default_factory=dict, compare=False, repr=False)

    def position(self, offset: int) -> int:
        """Slot position of the byte at `offset` of `path`."""
        for r in self.reads:
            if r.offset <= offset < r.offset + r.need:
                return r.pos + offset - r.offset
        raise KeyError(f"byte {offset} is not in unit {self.unit.name}")

    def place(self, ref: TensorRef) -> Piece:
        """Where tensor `ref` (a catalog ref, or the row slice of one that the unit holds; a
        column slice is keyed by its first byte, as `SlotStore.matrix` asks for it) lies."""
        if not self.pieces:
            return Piece(self.position(ref.offset), ref.nbytes, False)
        try:
            return self.pieces[ref.offset]
        except KeyError:
            raise KeyError(f"{ref.name} at byte {ref.offset} is not in unit {self.unit.name}") from None


def layout(unit: Unit) -> Layout:
    """Aligned reads for a unit's byte ranges, packed one after another into a slot.

    Raises:
        UnsupportedError: a strided range (a shard's column slice): the packed stream file
            holds it contiguous (edgert.offload.packed), the model file does not.
    """
    paths = {r.path for r in unit.ranges}
    if len(paths) != 1:
        raise UnsupportedError(f"unit {unit.name} spans {len(paths)} files; a unit streams from one file")
    if unit.strided:
        raise UnsupportedError(
            f"unit {unit.name} holds a shard's column slice, which streams from the packed stream "
            "file only, not from the model file (load with pack_stream=True)"
        )
    reads, pos = [], 0
    for r in unit.ranges:
        lo = r.offset // ALIGN * ALIGN
        hi = -(-(r.offset + r.nbytes) // ALIGN) * ALIGN
        reads.append(Read(lo, hi - lo, pos, r.offset + r.nbytes - lo))
        pos += hi - lo
    return Layout(unit, paths.pop(), tuple(reads), pos)


Place = Callable[["Unit"], Layout]  # a unit's layout: `layout`, or a packed stream file's


def slot_bytes(unit: Unit) -> int:
    """What one slot must hold to take this unit (its bytes plus alignment padding)."""
    if not unit.ranges:  # a unit described by its size alone (planning what-ifs)
        return unit.nbytes
    return layout(unit).size


@dataclass
class StreamStats:
    """Cumulative figures; a call's share is the difference from a `snapshot` taken before it."""

    bytes_read: int = 0
    units_read: int = 0
    read_seconds: float = 0.0  # wall time with a read in flight
    wait_seconds: float = 0.0  # compute blocked in acquire, waiting for a read
    direct: bool = field(default=False, compare=False)

    def snapshot(self) -> StreamStats:
        return StreamStats(
            self.bytes_read, self.units_read, self.read_seconds, self.wait_seconds, self.direct
        )

    def __add__(self, other: StreamStats) -> StreamStats:
        """Both sources' figures together (the streamer's and the expert cache's)."""
        return StreamStats(
            self.bytes_read + other.bytes_read,
            self.units_read + other.units_read,
            self.read_seconds + other.read_seconds,
            self.wait_seconds + other.wait_seconds,
            self.direct and other.direct,
        )

    @property
    def read_bps(self) -> float:
        return self.bytes_read / self.read_seconds if self.read_seconds > 0 else 0.0


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 buffer whose address is ALIGN-aligned (pages are backed as written)."""
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes]


class UnitReader:
    """Reads units' bytes into slots: one `preadv` per merged range, O_DIRECT where the file
    system takes it (else buffered, dropping the pages from the cache once copied)."""

    def __init__(self, layouts: Sequence[Layout], direct: bool = True):
        self._lock = threading.Lock()  # several threads read; a fallback to buffered reads is once
        self._fds: dict[Path, int] = {}
        self._retired: list[int] = []
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._layouts = layouts
        for lay in layouts:
            self._open(lay.path)

    def _open(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            flags = os.O_RDONLY | (os.O_DIRECT if self.direct else 0)
            try:
                fd = os.open(path, flags)
            except OSError:
                if not self.direct:
                    raise
                self.direct = False  # e.g. tmpfs: fall back to buffered reads for every file
                fd = os.open(path, os.O_RDONLY)
            self._fds[path] = fd
        return fd

    def fill(self, lay: Layout, slot: np.ndarray) -> int:
        """Read `lay`'s unit into `slot`; returns the unit's bytes.

        Raises:
            FormatError: the file ends before the unit (truncated or changed after load).
            OSError: the read failed.
        """
        fd = self._fds[lay.path]
        total = 0
        for r in lay.reads:
            got = 0
            while got < r.need:
                n = min(CHUNK, r.nbytes - got)
                view = memoryview(slot[r.pos + got : r.pos + got + n])
                try:
                    m = os.preadv(fd, [view], r.offset + got)
                except OSError as e:
                    if not self.direct:
                        raise
                    self._reopen_buffered(e)
                    fd = self._fds[lay.path]
                    continue
                if m == 0:
                    size = os.fstat(fd).st_size
                    raise FormatError(
                        f"{lay.path}: the file is truncated or changed since it was loaded (unit "
                        f"{lay.unit.name} needs bytes up to {r.offset + r.need:,}, the file has {size:,})"
                    )
                got += m
            if not self.direct:
                os.posix_fadvise(fd, r.offset, r.nbytes, os.POSIX_FADV_DONTNEED)
            total += r.need
        return total

    def _reopen_buffered(self, err: OSError) -> None:
        """O_DIRECT opened but a read was refused (EINVAL on some file systems): go buffered."""
        import errno

        if err.errno != errno.EINVAL:
            raise err
        with self._lock:
            if not self.direct:  # another thread got here first
                return
            self._retired += self._fds.values()  # closed at close(): another thread may be reading
            self._fds = {}
            self.direct = False
            for lay in self._layouts:
                self._open(lay.path)

    def close(self) -> None:
        for fd in [*self._fds.values(), *self._retired]:
            os.close(fd)
        self._fds.clear()
        self._retired.clear()


READERS = 2  # reads in flight: the next request is queued before the current one ends


class _SlotPool:
    """Preallocated slots that reader threads fill from disk while compute uses others: what
    the ring (`Streamer`) and the expert cache (`ExpertCache`) share. A subclass says which
    read comes next (`_claim`, under the lock) and records a finished one (`_landed`); the
    pool runs the readers, keeps the statistics and hands a reader's error to the consumer.

    `stats.read_seconds` is wall time with at least one read in flight, so that with several
    readers `stats.read_bps` is the disk's rate, not a reader's.
    """

    def __init__(self, layouts: Sequence[Layout], n_slots: int, direct: bool, readers: int, name: str):
        self.slot_size = max(lay.size for lay in layouts)
        self.slots = [aligned_empty(self.slot_size) for _ in range(n_slots)]
        self.stats = StreamStats()
        self._reader = UnitReader(layouts, direct)
        self.stats.direct = self._reader.direct
        self._cv = threading.Condition()
        self._inflight = 0
        self._busy_since = 0.0
        self._error: BaseException | None = None
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(readers)
        ]
        for t in self._threads:
            t.start()

    def layout_of(self, name: str) -> Layout:
        raise NotImplementedError

    def snapshot(self) -> StreamStats:
        """The statistics so far, the busy period in progress included: `stats.read_seconds`
        grows only when the disk goes idle, which it may not do for a whole token."""
        with self._cv:
            s = self.stats.snapshot()
            if self._inflight:
                s.read_seconds += time.perf_counter() - self._busy_since
            return s

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=10)
        self._reader.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.close()

    # ---- consumer side: called with the lock held ------------------------------------

    def _wait(self, ready: Callable[[], bool]) -> bool:
        """Wait until `ready()`; False if it already was. Counts the wait in stats.

        Raises:
            FormatError, OSError: a reader failed (the file was truncated, a read failed).
        """
        waited = not ready() and self._error is None
        if waited:
            t0 = time.perf_counter()
            while not ready() and self._error is None:
                self._cv.wait()
            self.stats.wait_seconds += time.perf_counter() - t0
        if self._error is not None:
            raise self._error
        return waited

    # ---- reader side -----------------------------------------------------------------

    def _claim(self):
        """The next read as (layout, slot, job), marked in flight; None if there is none yet."""
        raise NotImplementedError

    def _landed(self, job) -> None:
        """The read of `job` is complete."""
        raise NotImplementedError

    def _settled(self, job) -> None:
        """The read of `job` ended, complete or not (its slot is no longer being written)."""

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._closed and (claim := self._claim()) is None:
                        self._cv.wait()
                    if self._closed:
                        return
                    lay, slot, job = claim
                    if self._inflight == 0:
                        self._busy_since = time.perf_counter()
                    self._inflight += 1
                try:
                    read = self._reader.fill(lay, self.slots[slot])
                finally:
                    with self._cv:
                        self._settled(job)
                        self._inflight -= 1
                        if self._inflight == 0:
                            self.stats.read_seconds += time.perf_counter() - self._busy_since
                        self._cv.notify_all()
                with self._cv:
                    self.stats.bytes_read += read
                    self.stats.units_read += 1
                    self.stats.direct = self._reader.direct
                    self._landed(job)
                    self._cv.notify_all()
        except BaseException as e:  # handed to the consumer, who raises it
            with self._cv:
                self._error = e
                self._cv.notify_all()


class Streamer(_SlotPool):
    """Streams `units` (in the order the forward uses them) through `window` slots.

    `READERS` threads fill the ring, each taking the next item whose slot is free, so the disk
    always has a request queued: with one reader, the gap between the end of one read and
    the start of the next (the reader waiting for a core the kernels hold) cost 15% of the
    disk's bandwidth on this 2-core machine under load (1.47 against 1.77 GB/s with two).

    Not thread-safe for consumers: one forward at a time acquires units.
    """

    def __init__(
        self,
        units: Sequence[Unit],
        window: int,
        direct: bool = True,
        readers: int = READERS,
        place: Place = layout,
    ):
        if not units:
            raise ValueError("nothing to stream")
        if window < 1:
            raise ValueError(f"a window of {window} slots")
        self.layouts = [place(u) for u in units]
        self.index = {u.name: i for i, u in enumerate(units)}
        self.window = window
        self._next = 0  # the next item a reader takes
        self._released = 0  # items [0, released) may be overwritten
        self._ready = [-1] * window  # the item each slot holds, complete (-1: none)
        self._busy = [False] * window  # a read into the slot is in flight
        self._held: int | None = None  # the item compute is using
        super().__init__(self.layouts, window, direct, max(1, min(readers, window)), "edgert-streamer")

    def layout_of(self, name: str) -> Layout:
        return self.layouts[self.index[name]]

    def acquire(self, name: str) -> int:
        """Wait until unit `name` is in a slot and return the slot; the unit acquired before
        it is released. A unit further along the cycle than the expected one is fine (the
        units in between are skipped: a forward that stopped early leaves such a gap).

        Raises:
            FormatError: the file was truncated or changed after load.
            OSError: the read failed.
        """
        u = self.index[name]
        n = len(self.layouts)
        with self._cv:
            k = self._released if self._held is None else self._held + 1
            k += (u - k) % n  # the next item that is this unit
            self._released = k
            self._held = None
            self._cv.notify_all()
            slot = k % self.window
            self._wait(lambda: self._ready[slot] == k)
            self._held = k
        return slot

    def release(self) -> None:
        """Release the held unit (acquire does this implicitly)."""
        with self._cv:
            if self._held is not None:
                self._released = self._held + 1
                self._held = None
                self._cv.notify_all()

    def _claim(self):
        k = max(self._next, self._released)  # skipped items need no read
        slot = k % self.window
        if k >= self._released + self.window or self._busy[slot]:
            return None
        self._next = k + 1
        self._busy[slot] = True
        self._ready[slot] = -1
        return self.layouts[k % len(self.layouts)], slot, k

    def _settled(self, k: int) -> None:
        self._busy[k % self.window] = False

    def _landed(self, k: int) -> None:
        self._ready[k % self.window] = k


class ExpertCache(_SlotPool):
    """MoE experts streamed on demand: `n_slots` slots hold the most recently used experts.

    An expert's use cannot be known ahead of its layer's router, so experts do not ride the
    ring. Instead, once a layer has routed its tokens, `want` hands the cache the experts that
    layer will use, in the order it will use them; a background reader fills the missing ones
    into the least recently used slots while compute works through the ones already there,
    and `get` waits only for an expert still in flight. An expert that is wanted but not yet
    used is never evicted, nor is the one compute holds, so two slots always make progress.

    Not thread-safe for consumers: one forward at a time.
    """

    def __init__(self, units: Sequence[Unit], n_slots: int, direct: bool = True, place: Place = layout):
        if n_slots < 2:
            raise ValueError(f"an expert cache needs 2 slots, not {n_slots}")
        self.layouts = {u.name: place(u) for u in units}
        self.hits = 0
        self._where: dict[str, int] = {}  # expert -> slot, read or being read
        self._ready: set[str] = set()
        self._owner: list[str | None] = [None] * n_slots
        self._last_use = [0] * n_slots
        self._clock = 0
        self._queue: list[str] = []  # wanted, in order of use; consumed by get
        self._held: str | None = None
        super().__init__(list(self.layouts.values()), n_slots, direct, 1, "edgert-experts")

    def layout_of(self, name: str) -> Layout:
        return self.layouts[name]

    def want(self, names: Sequence[str]) -> None:
        """The experts the next `get`s will ask for, in that order (replaces any earlier list)."""
        with self._cv:
            self._queue = list(names)
            self._cv.notify_all()

    def get(self, name: str) -> int:
        """The slot holding expert `name` (read now if it was not wanted); the expert
        returned before is released.

        Raises:
            FormatError: the file was truncated or changed after load.
            OSError: the read failed.
        """
        with self._cv:
            self._held = None
            if name in self._queue:  # the wanted ones before it were skipped
                self._queue = self._queue[self._queue.index(name) :]
            else:  # not announced: the wants are stale (and must not pin every slot)
                self._queue = [name]
            self._cv.notify_all()
            if not self._wait(lambda: name in self._ready):
                self.hits += 1
            self._queue.pop(0)
            self._held = name
            slot = self._where[name]
            self._clock += 1
            self._last_use[slot] = self._clock
            return slot

    def _claim(self):
        """The first wanted expert not in a slot, in the least recently used slot that is
        neither held nor still wanted; None if nothing is missing or no slot is free."""
        name = next((n for n in self._queue if n not in self._where), None)
        if name is None:
            return None
        keep = set(self._queue)
        if self._held is not None:
            keep.add(self._held)
        free = [i for i, o in enumerate(self._owner) if o is None or (o not in keep and o in self._ready)]
        if not free:
            return None
        slot = min(free, key=self._last_use.__getitem__)
        old = self._owner[slot]
        if old is not None:
            del self._where[old]
            self._ready.discard(old)
        self._owner[slot] = name
        self._where[name] = slot
        return self.layouts[name], slot, name

    def _landed(self, name: str) -> None:
        self._ready.add(name)


class RowReader:
    """Rows of a tensor read on demand with pread (an untied embedding: a decode step needs
    one row of it). Buffered reads: rows are KiBs and the same ones recur."""

    def __init__(self, ref, max_rows: int):
        self.ref = ref
        self.qtype = ref.qtype
        self.buf = np.empty((max_rows, ref.row_bytes), np.uint8)
        self.fd = os.open(ref.path, os.O_RDONLY)
        self.bytes_read = 0

    def read(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` as uint8 [len(ids), row_bytes] (a view of the reader's buffer)."""
        rb = self.ref.row_bytes
        for j, i in enumerate(ids):
            off = self.ref.offset + int(i) * rb
            if os.preadv(self.fd, [memoryview(self.buf[j])], off) != rb:
                raise FormatError(
                    f"{self.ref.path}: the file is truncated or changed since it was loaded "
                    f"(row {int(i)} of {self.ref.name})"
                )
        self.bytes_read += len(ids) * rb
        return self.buf[: len(ids)]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SlotStore(WeightStore):
    """The tensors of one streamed unit, as zero-copy views of the slot that holds it: `matrix`
    gives a weight as the kernels take it, packed records or raw blocks, whichever the slot
    holds, so the model asks one question whatever file the unit was read from."""

    packs = False  # `linear` takes `matrix` as it is: the slot's bytes are not repacked

    def __init__(self, refs: dict, lay: Layout, slot: np.ndarray):
        super().__init__(refs)
        self.layout = lay
        self.slot = slot

    def raw(self, ref) -> np.ndarray:
        """A tensor's raw rows in the slot (a column slice's as the packed file holds them)."""
        ref = self.ref(ref) if isinstance(ref, str) else ref
        p = self.layout.place(ref)
        if p.interleaved:
            raise ValueError(f"{ref.name} is held as packed records in unit {self.layout.unit.name}")
        return self.slot[p.pos : p.pos + ref.n_rows * ref.row_bytes].reshape(-1, ref.row_bytes)

    def matrix(self, ref: TensorRef, cols: range | None = None) -> PackedWeight | np.ndarray:
        """Weight `ref` for `matmul`: a PackedWeight over the slot's records, or its raw rows.
        `cols`: the shard's columns of it, which the packed stream file holds as one piece
        (records, or the slice's rows made contiguous)."""
        part = ref if cols is None else ref.columns(cols.start, cols.stop)
        p = self.layout.place(part)
        if not p.interleaved:
            return self.raw(part)
        return PackedWeight(self.slot[p.pos : p.pos + p.nbytes], ref.qtype, part.n_rows, part.shape[-1], True)
