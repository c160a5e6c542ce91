"""Residency units: what the streamer moves between disk and memory, as byte ranges.

A unit is a group of tensors that the forward needs at the same moment: the attention
block of layer i (q, k, v, o and their biases), its dense FFN (gate, up and down, with their
biases; in an MoE layer, the router and any shared expert), one MoE expert of layer i, the
token embedding, the output head, and the norms (every per-channel vector of the model, a
few KiB per layer). Every tensor of the catalog is in exactly one unit.

Where a model's FFN projections are large (SPLIT_FFN, 16 MiB), each is a unit of its own,
because the streamer's slots are all the size of the largest streamed unit: a whole FFN is
3-5x an attention block (126 MiB against 17 MiB in a 7B Q4_K_M), so one-FFN slots left the
reader idle while an FFN computed, and cost most of a window's bytes. Its projections are
within 1.5x of each other and of an attention block's size, so the same bytes buy a deeper
window and the reader runs further ahead. Where they are small, the whole FFN is one unit,
and so one read: a few MiB per read is slower on a disk than tens (Qwen2.5-0.5B's 8.6 MiB
FFN read at 1.58-1.76 GB/s while decoding, its 2-5 MiB projections at 1.32-1.47).

A unit's reads are its tensors' byte ranges, merged where they touch (or are separated
only by the file's alignment padding), so a layer's attention block is as few large reads
as the file's tensor order allows.

For a shard (one device of a cluster) a unit holds only that device's bytes: row slices
(q/k/v, FFN gate/up, expert gate/up) are contiguous ranges; column slices (attn_output and
ffn_down, split by their input columns) are strided: one piece per row, recorded as one
`ByteRange` with `repeat` pieces `stride` bytes apart instead of thousands of tuples.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

from edgert.quant.pack import resident_nbytes

from edgert.errors import UnsupportedError
from edgert.models.base import ModelArgs, Shard
from edgert.weights import ColumnSlice, TensorRef, WeightStore

KINDS = ("embedding", "attention", "ffn", "expert", "head", "norms")
_MAX_PAD = 4096  # GGUF aligns tensors to general.alignment (32 by default); padding is never larger

_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^ffn_(gate|up|down)\.(\d+)\.weight$")
_NORM = re.compile(r"(^|_)norm(\.|$)|^rope_freqs\.")


class ByteRange(NamedTuple):
    """`nbytes` at `offset` of `path`, repeated `repeat` times `stride` bytes apart (a column
    slice: one piece per row). Plain ranges have repeat=1."""

    path: Path
    offset: int
    nbytes: int
    repeat: int = 1
    stride: int = 0

    @property
    def total(self) -> int:
        return self.nbytes * self.repeat

    @property
    def end(self) -> int:
        return self.offset + (self.repeat - 1) * self.stride + self.nbytes


@dataclass(frozen=True)
class Unit:
    """One residency unit. `nbytes` counts its tensors' bytes (for this shard);
    `per_token` is the expected fraction of them a decode step reads: 1 for dense blocks,
    n_experts_used / n_experts for an expert, one row's share for an embedding that is not
    also the output head (its rows are read on demand)."""

    name: str
    kind: str
    layer: int | None
    expert: int | None
    ranges: tuple[ByteRange, ...]
    nbytes: int
    tensors: tuple[str, ...]
    per_token: float = 1.0
    rows: tuple[int, int] | None = None  # a row chunk [start, stop) of a one-tensor unit
    # The unit's tensors as it holds them (this shard's row slices, a head chunk's rows; a
    # column slice is a ColumnSlice): what the packed stream file packs (edgert.offload.packed).
    parts: tuple = field(default=(), compare=False, repr=False)

    @property
    def strided(self) -> bool:
        """It holds a shard's column slice: one piece per row, which the model file interleaves
        with the other shards' pieces (the packed stream file holds it contiguous)."""
        return any(r.repeat != 1 for r in self.ranges)

    @property
    def read_bytes(self) -> int:
        """Bytes the unit's reads cover: nbytes plus any alignment padding merged in."""
        return sum(r.total for r in self.ranges)

    @cached_property  # the planner asks for it many times over
    def resident_bytes(self) -> int:
        """Bytes the unit holds once loaded resident: its matrices repacked into the kernels'
        records where their type has them (`edgert.quant.pack`), vectors as float32 copies.
        A unit described by its size alone (planning what-ifs) holds `nbytes`."""
        if not self.parts:
            return self.nbytes
        total = 0
        for r in self.parts:
            if len(r.shape) == 2:  # a matrix, or a shard's column slice of one
                total += resident_nbytes(r.qtype, r.n_rows, r.row_bytes)
            else:
                total += max(r.nbytes, 4 * r.shape[0])
        return total

    @property
    def token_bytes(self) -> float:
        """Expected bytes of this unit a decode step reads."""
        return self.nbytes * self.per_token


SPLIT_FFN = 16 << 20  # a projection this large makes each projection a unit (module docstring)


def units(store: WeightStore, args: ModelArgs, shard: Shard | None = None) -> list[Unit]:
    """The model's residency units, in forward order: embedding, then per layer attention,
    FFN and experts, then the head (absent when tied to the embedding), then the norms.

    A shard restricts each unit to that device's bytes (its KV heads, FFN columns, experts);
    the embedding, head and norms stay whole: the master device holds them.

    Raises:
        UnsupportedError: a tensor that belongs to no unit kind (so it would go unplanned),
            or a shard boundary inside a quantization block.
    """
    full = Shard.full(args)
    shard = shard or full
    groups: dict[tuple[str, int | None, int | None, str], list[TensorRef]] = {}
    split_ffn = (
        not args.n_experts
        and max((r.nbytes for n, r in store.refs.items() if _LAYER.match(n) and ".ffn_" in n), default=0)
        >= SPLIT_FFN
    )

    def add(kind: str, layer: int | None, expert: int | None, ref: TensorRef, part: str = "") -> None:
        groups.setdefault((kind, layer, expert, part), []).append(ref)

    for name, ref in store.refs.items():
        m = _LAYER.match(name)
        if name == "token_embd.weight":
            add("embedding", None, None, ref)
        elif name in ("output.weight", "output.bias"):
            add("head", None, None, ref)
        elif m is None:
            if _NORM.search(name) or len(ref.shape) == 1:
                add("norms", None, None, ref)
            else:
                raise UnsupportedError(
                    f"tensor {name!r} belongs to no residency unit; offload cannot plan it"
                )
        else:
            i, rest = int(m[1]), m[2]
            e = _EXPERT.match(rest)
            if _NORM.search(rest):
                add("norms", None, None, ref)
            elif e:
                if int(e[2]) in shard.experts:
                    add("expert", i, int(e[2]), _shard_expert(ref, e[1], shard, full))
            elif rest.startswith("attn_"):
                add("attention", i, None, _shard_attention(ref, rest, args, shard))
            elif rest.startswith("ffn_"):
                part = rest.split(".")[0][4:] if split_ffn else ""  # gate | up | down
                add("ffn", i, None, _shard_ffn(ref, rest, shard, full), part)
            elif len(ref.shape) == 1:
                add("norms", None, None, ref)
            else:
                raise UnsupportedError(
                    f"tensor {name!r} belongs to no residency unit; offload cannot plan it"
                )

    spans = _tensor_spans(store.refs.values())
    tied = ("head", None, None, "") not in groups
    out = []
    for (kind, layer, expert, part), refs in groups.items():
        per_token = 1.0
        if kind == "expert":
            per_token = args.n_experts_used / args.n_experts if args.n_experts else 1.0
        elif kind == "embedding" and not tied:
            per_token = 1.0 / max(1, refs[0].n_rows)  # one row per decoded token
        out.append(
            Unit(
                name=_unit_name(kind, layer, expert, part),
                kind=kind,
                layer=layer,
                expert=expert,
                ranges=_merge(refs, spans),
                nbytes=sum(r.nbytes * _pieces(r) for r in refs),
                tensors=tuple(sorted(r.name for r in refs)),
                per_token=per_token,
                parts=tuple(refs),
            )
        )
    out = _chunk_output(out, groups, tied)
    order = {"embedding": 0, "attention": 1, "ffn": 2, "expert": 3, "head": 4, "norms": 5}
    parts = {"gate": 0, "up": 1, "down": 2}  # the order the forward uses them
    return sorted(
        out,
        key=lambda u: (
            u.kind in ("head", "norms"),
            -1 if u.layer is None else u.layer,
            order[u.kind],
            parts.get(u.name.rsplit("_", 1)[-1], -1) if u.kind == "ffn" else 0,
            u.expert or 0,
            u.rows or (0, 0),
        ),
    )


def bulk_size(sizes: list[int]) -> int:
    """The size most of these bytes come in: the smallest size s such that units of size s
    or less hold at least half of them (a median weighted by bytes)."""
    half, acc = sum(sizes) / 2, 0
    for s in sorted(sizes):
        acc += s
        if acc >= half:
            return s
    raise ValueError("no sizes")


def _chunk_output(out: list[Unit], groups: dict, tied: bool) -> list[Unit]:
    """Split the output head (a tied embedding is the head) into row chunks no larger than
    the size most of the layers' bytes come in. Its rows are independent (each gives some of
    the logits), and a 262k-token vocabulary's head is most of a small model: whole, it would
    set every slot's size, or have to be pinned.

    Not the largest layer unit: a slot the size of the bulk then holds any chunk, and only the
    few larger units have to be pinned for the plan to use it. On the 7B Q4_K_M, whose FFN
    down projections are Q6_K (53 MiB) in half the layers and every other layer unit at most
    36 MiB, chunks of 47 MiB kept every plan's slots at 53 MiB; with chunks of 36 MiB, the
    plan at 1.5 GB pins the Q6_K projections instead and streams 49 MiB less per token."""
    key = ("embedding", None, None, "") if tied else ("head", None, None, "")
    refs = groups.get(key, [])
    layer = [u.nbytes for u in out if u.layer is not None]
    if len(refs) != 1 or not layer or isinstance(refs[0], ColumnSlice):
        return out
    ref, limit = refs[0], bulk_size(layer)
    if ref.nbytes <= limit:
        return out
    step = max(16, limit // ref.row_bytes // 16 * 16)  # whole 16-row groups of the packed layout
    whole = next(u for u in out if (u.kind, u.layer, u.expert) == key[:3])
    chunks = []
    for j, r0 in enumerate(range(0, ref.n_rows, step)):
        part = ref.rows(r0, min(r0 + step, ref.n_rows))
        chunks.append(
            Unit(
                name=f"{whole.name}.{j}",
                kind=whole.kind,
                layer=None,
                expert=None,
                ranges=(ByteRange(part.path, part.offset, part.nbytes),),
                nbytes=part.nbytes,
                tensors=whole.tensors,
                per_token=whole.per_token,
                rows=(r0, r0 + part.n_rows),
                parts=(part,),
            )
        )
    return [u for u in out if u is not whole] + chunks


def _unit_name(kind: str, layer: int | None, expert: int | None, part: str = "") -> str:
    if layer is None:
        return kind
    if expert is not None:
        return f"blk.{layer}.expert.{expert}"
    return f"blk.{layer}.{kind}_{part}" if part else f"blk.{layer}.{kind}"


# ---- shard slices --------------------------------------------------------------------
# A column slice is a ColumnSlice (edgert.weights): one piece per row; `_pieces` tells the
# merge how many rows repeat it.


def _pieces(r) -> int:
    return r.repeat if isinstance(r, ColumnSlice) else 1


def _rows(ref: TensorRef, rows: range):
    if (rows.start, rows.stop) == (0, ref.n_rows):
        return ref
    return ref.rows(rows.start, rows.stop, ref.name)


def _cols(ref: TensorRef, cols: range, width: int):
    if (cols.start, cols.stop) == (0, width):
        return ref
    return ref.columns(cols.start, cols.stop)


def _shard_attention(ref: TensorRef, rest: str, a: ModelArgs, shard: Shard):
    group, hd = a.n_heads // a.n_kv_heads, a.head_dim
    qrows = range(shard.kv.start * group * hd, shard.kv.stop * group * hd)
    kvrows = range(shard.kv.start * hd, shard.kv.stop * hd)
    if len(ref.shape) == 1:  # biases: shard them as rows of one element
        r = (
            qrows
            if rest.startswith("attn_q.")
            else kvrows
            if rest.startswith(("attn_k.", "attn_v."))
            else None
        )
        if r is None or (r.start, r.stop) == (0, ref.shape[0]):
            return ref
        return ref.elements(r.start, r.stop)
    if rest.startswith("attn_q."):
        return _rows(ref, qrows)
    if rest.startswith(("attn_k.", "attn_v.")):
        return _rows(ref, kvrows)
    if rest.startswith("attn_output."):
        return _cols(ref, qrows, a.n_heads * hd)
    return ref


def _shard_ffn(ref: TensorRef, rest: str, shard: Shard, full: Shard):
    if shard.ffn == full.ffn or len(ref.shape) == 1:
        return ref
    if rest.startswith(("ffn_gate.", "ffn_up.")):
        return _rows(ref, shard.ffn)
    if rest.startswith("ffn_down."):
        return _cols(ref, shard.ffn, len(full.ffn))
    return ref  # the router and shared tensors stay whole


def _shard_expert(ref: TensorRef, proj: str, shard: Shard, full: Shard):
    if shard.expert_ffn == full.expert_ffn:
        return ref
    if proj in ("gate", "up"):
        return _rows(ref, shard.expert_ffn)
    return _cols(ref, shard.expert_ffn, len(full.expert_ffn))


# ---- merging -------------------------------------------------------------------------


def _tensor_spans(refs: Iterable[TensorRef]) -> dict[Path, tuple[list[int], list[int]]]:
    """Per file: the sorted tensor starts and, in the same order, their ends."""
    spans: dict[Path, list[tuple[int, int]]] = {}
    for r in refs:
        spans.setdefault(r.path, []).append((r.offset, r.offset + r.nbytes))
    out = {}
    for path, v in spans.items():
        v.sort()
        out[path] = ([a for a, _ in v], [b for _, b in v])
    return out


def _merge(refs: list, spans: dict[Path, tuple[list[int], list[int]]]) -> tuple[ByteRange, ...]:
    """Sorted, merged reads. Two plain ranges merge when the gap between them is under
    _MAX_PAD bytes and no tensor's bytes lie in it (so it is alignment padding)."""
    pieces = sorted(
        (
            ByteRange(r.path, r.offset, r.nbytes, r.repeat, r.stride)
            if isinstance(r, ColumnSlice)
            else ByteRange(r.path, r.offset, r.nbytes)
            for r in refs
        ),
        key=lambda b: (str(b.path), b.offset),
    )
    out: list[ByteRange] = []
    for b in pieces:
        if out and out[-1].repeat == 1 and b.repeat == 1 and out[-1].path == b.path:
            prev = out[-1]
            gap_lo, gap_hi = prev.offset + prev.nbytes, b.offset
            if 0 <= gap_hi - gap_lo < _MAX_PAD and _is_padding(spans[b.path], gap_lo, gap_hi):
                out[-1] = ByteRange(b.path, prev.offset, b.offset + b.nbytes - prev.offset)
                continue
        out.append(b)
    return tuple(out)


def _is_padding(spans: tuple[list[int], list[int]], lo: int, hi: int) -> bool:
    if lo == hi:
        return True
    starts, ends = spans
    i = bisect.bisect_right(starts, lo) - 1  # the last tensor starting at or before lo
    if i >= 0 and ends[i] > lo:
        return False
    return i + 1 == len(starts) or starts[i + 1] >= hi
