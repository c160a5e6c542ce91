"""The offload plan: a pure function from unit sizes, a budget and a device profile to which
units stay resident, how deep the prefetch window is, and the predicted time per token.

The budget covers everything the process holds (peak RSS): the runtime's own overhead,
the KV cache for the full context, the activation workspace, the pinned units, and the
streamer's prefetch window (`window` slots, each the size of the largest streamed unit).

Decisions, and why:
- Norms are always resident: a few KiB per layer, and the model keeps float32 copies.
- An embedding that is not also the output head is never streamed whole: a decode step
  needs one row of it, which the streamer reads on demand (a row is KiBs). It is pinned
  only once every other unit is, so that a fully resident plan reads no disk at all.
  A tied embedding is the output head too, and is read whole every token like any unit.
- Units are counted at what they hold in memory, not their size in the file: a pinned
  unit at its repacked size (`Unit.resident_bytes`), a unit streamed from the packed
  stream file at its block's size (records are the size of the GGUF blocks, but a
  matrix's rows are padded to whole groups of 16, and a block to the read alignment).
- Every dense unit is read once per token, so each pinned byte saves one streamed byte
  per token, whichever unit it belongs to. The units larger than the slot must be pinned,
  so the planner tries every slot size (each distinct unit size) and keeps the one that
  streams the fewest bytes per token; this is what pins a big output head first, since
  pinning it shrinks every slot to the size of a layer block. The rest of the budget
  pins whole layers, spread evenly through the depth (layers 0, n/2, n/4, 3n/4, ...):
  the streamed layers then alternate with resident ones, so the reader fills the window
  while the resident layers compute, instead of idling through one long resident run (on
  the 7B at 3.5 GB, a resident run of 15 layers left the disk idle for 15% of each token).
  Any set of resident layers is also a layer-skipping draft for self-speculative decoding.
  Whatever is left pins the largest units that still fit.
- MoE experts are read with probability n_experts_used / n_experts per token (uniform
  routing; the expert cache does better), so a pinned expert byte saves less than a
  dense one: experts are pinned after every dense unit. Streamed experts do not ride the
  window (which units a layer uses is known only once its router has run): they have
  their own pool of `expert_slots` slots, an LRU cache (edgert.offload.stream.ExpertCache).
  An MoE model's plan reserves both pools, and gives the dense pool's slots to the
  experts when no dense unit streams.
- The window is at least 2 slots (one being computed on, one being filled) whenever any
  unit streams, and 4 where the budget allows, even at the price of streaming more: with 2,
  the reader is one unit ahead and idles whenever a unit takes longer to compute than the
  next one takes to read, and during the resident layers it can fill only the slot the
  head released. A 4-slot window kept the 7B's reader busy (72-77% of the disk limit with 2
  slots of whole FFNs). Leftover budget deepens it up to MAX_WINDOW.
  It is trimmed to LEAN_WINDOW (3) slots, pinning one more slot's worth, where that still
  covers the longest run of resident units: the disk reads less while the kernels go
  through that run (at the profile's disk and kernel rates) than 3 slots hold. The 7B at
  1.5 GB decoded 3-4% faster with 3 slots (5 of 6 paired runs; reads in flight 99%); at 2.5
  and 3.5 GB, where the resident runs are long, 3 slots left the disk idle 5-8% of the time.
  2 slots lost at 1.5 GB too (reads in flight 88-97%): the compute between streamed units is
  slower than the kernel rate alone, so 3 is the floor of the trim.
  The trim makes the plan non-monotone in one place: just past the budget where the extra
  pinning makes the resident run too long for 3 slots, the plan keeps 4 and streams up to
  one slot more per token than it did just below.
- Seconds per token = max(disk, memory, compute), since the window overlaps reading with
  computing: disk = streamed bytes / disk bandwidth; memory = (weights read + streamed
  bytes written + the KV cache read at the end of the context) / memory bandwidth;
  compute = weights read / the kernels' weight throughput.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

from edgert.offload import packed as packed_file
from edgert.offload.memory import ZERO, Memory, release_free_heap, release_library_pages
from edgert.offload.profile import DeviceProfile
from edgert.offload.stream import slot_bytes
from edgert.offload.units import Unit, units
from edgert.quant.kv import cache_bytes
from edgert.quant.pack import ACC_MAX, TC

from edgert.errors import BudgetError
from edgert.kernels import AttentionScratch
from edgert.models.base import ModelArgs, Shard
from edgert.weights import WeightStore

MIN_WINDOW = 2
GOOD_WINDOW = 4
LEAN_WINDOW = 3
MAX_WINDOW = 8
# Measured RSS of this runtime minus the model file's resident pages, the KV cache and the
# workspace, after loading and decoding 8 tokens at context 64 (Python 3.11, numpy, numba
# 0.61 with edgert's cached kernels, x86-64): 173 MiB for SmolLM2-135M (49k-token vocab),
# 211 MiB for gemma-3-270m (262k), 224 MiB for qwen2.5-coder-0.5b (151k). The tokenizer
# and GGUF metadata are most of the spread. Rounded up to leave ~7% headroom.
DEFAULT_OVERHEAD = Memory(240 << 20)
# What loading adds to a process that has opened its model (imported edgert, parsed the
# metadata, built the tokenizer) and handed back numba's compiler pages: numba's cached
# kernels (loading them reads some of libllvmlite back; a budgeted process never compiles
# one, edgert.jit), the file pages of the tensor being packed, allocator slack, the CLI.
# With the margin, the peak resident set (the context filled, so that the KV cache is all
# written) stayed 19-45 MiB under the budget for the three real models and the 7B
# (`/work/notes/s9/margin3.py`: SmolLM2 27, Gemma 3 19, Qwen2.5 30, the 7B at 1.5 GB 45;
# Gemma 3's four block types load the most kernels).
LOAD_MARGIN = Memory(96 << 20)


def measured_overhead() -> Memory:
    """The runtime's share of a budget for this process, measured instead of guessed: what it
    holds now (interpreter, libraries, tokenizer: 81-113 MiB for the real models and the 7B,
    most of the spread being the tokenizer), once the heap is trimmed and the compiler
    library's pages are handed back (38 MiB that `import numba` leaves resident and nothing
    runs again), plus LOAD_MARGIN. Call it after the model is opened, before it is built."""
    import psutil

    release_free_heap()
    release_library_pages()
    return Memory(psutil.Process().memory_info().rss) + LOAD_MARGIN


@dataclass(frozen=True)
class Plan:
    """Which units are pinned, which stream, and what that costs per token."""

    budget: Memory
    minimum: Memory  # the smallest budget that can run this model at this context
    context: int
    profile: str
    pinned: tuple[str, ...]  # unit names, resident for the whole run
    streamed: tuple[str, ...]  # unit names read through the window every token
    on_demand: tuple[str, ...]  # units read a row at a time (an untied embedding)
    window: int  # prefetch depth in slots; 0 when no dense unit streams
    slot: Memory  # one slot: the largest streamed unit, with its reads' alignment padding
    expert_slots: int  # slots of the MoE expert cache; 0 when no expert streams
    pinned_bytes: Memory  # includes the norms
    weight_bytes: Memory  # all units
    streamed_per_token: Memory  # expected disk reads per decode step
    read_per_token: Memory  # expected weight bytes a decode step reads from memory
    kv: Memory  # KV cache for the full context
    workspace: Memory
    overhead: Memory
    used: Memory  # overhead + kv + workspace + pinned + (window + expert_slots) * slot <= budget
    seconds_per_token: float
    bottleneck: str  # "disk" | "memory" | "compute"
    seconds: dict  # {"disk": s, "memory": s, "compute": s}
    packed: bool = False  # slots sized for the packed stream file's blocks (edgert.offload.packed)
    units: tuple[Unit, ...] = field(default=(), repr=False, compare=False)  # what it was made from

    @property
    def tokens_per_second(self) -> float:
        return 1.0 / self.seconds_per_token if self.seconds_per_token > 0 else float("inf")

    @property
    def window_bytes(self) -> Memory:
        """The streamer's slots and the expert cache's."""
        return self.slot * (self.window + self.expert_slots)

    def to_dict(self) -> dict:
        """The plan as JSON-ready values (byte counts as ints), without its units."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "units"}
        for k, v in d.items():
            if isinstance(v, Memory):
                d[k] = v.bytes
            elif isinstance(v, tuple):
                d[k] = list(v)
        d["tokens_per_second"] = self.tokens_per_second
        d["window_bytes"] = self.window_bytes.bytes
        return d


# ---- sizes from the model config ------------------------------------------------------


def kv_bytes_per_token(
    args: ModelArgs, shard: Shard | None = None, itemsize: int = 2, kv_bits: int = 16, context: int = 1
) -> int:
    """K and V of every layer for one position (fp16 by default; every layer keeps the full
    context, sliding-window layers included, as edgert's KVCache does). kv_bits 8 or 4: the
    quantized caches of edgert.quant.kv, whose fixed fp16 residual is spread over `context`."""
    n_kv = len(shard.kv) if shard else args.n_kv_heads
    if kv_bits == 16:
        return 2 * args.n_layers * n_kv * args.head_dim * itemsize
    return -(-cache_bytes(kv_bits, args.n_layers, n_kv, args.head_dim, context) // context)


def workspace_bytes(
    args: ModelArgs, context: int, max_tokens: int = 64, threads: int = 4, shard: Shard | None = None
) -> int:
    """Bytes of the forward's preallocated buffers (edgert.models.base.Workspace) and RoPE
    tables, computed from the config without allocating them."""
    a = args
    shard = shard or Shard.full(a)
    hq = len(shard.kv) * (a.n_heads // a.n_kv_heads)
    hkv = len(shard.kv)
    ff = max(len(shard.ffn), len(shard.expert_ffn))
    T, f4 = max_tokens, 4
    n = T * a.dim * 3 * f4  # x, h, out
    n += T * hq * a.head_dim * 2 * f4  # q, att
    n += T * hkv * a.head_dim * 2 * f4  # k, v
    n += T * ff * 2 * f4  # gate, up
    n += a.vocab_size * f4  # logits
    if a.n_experts:
        k = a.n_experts_used
        n += T * a.n_experts * f4 + T * k * (4 + 4) + 2 * T * k * a.dim * f4
        n += (a.n_experts + 1) * 8 + T * k * 8
    max_k = max(a.dim, ff, hq * a.head_dim)
    nb = max_k // 32 + 1
    n += T * max_k + 4 * T * nb * f4 + T * (max_k // 16 + 1) * 4 + T * max_k * f4  # MatmulScratch
    n += threads * max_k * f4  # per-thread decoded rows
    n += threads * ACC_MAX * TC * f4  # per-thread matmul accumulators (llama parity's lanes)
    n += T * hq * context * f4  # attention scores, one row per (token, head)
    n += AttentionScratch.nbytes(hq, hkv, a.head_dim)
    rope_sets = 2 if a.sliding_window or a.sliding_layers else 1
    n += rope_sets * 2 * context * (a.n_rot // 2) * f4  # cos, sin
    return n


# ---- the plan -------------------------------------------------------------------------


def plan(
    units: Sequence[Unit],
    budget: Memory,
    context: int,
    kv_bytes_per_token: int,
    profile: DeviceProfile,
    overhead: Memory = DEFAULT_OVERHEAD,
    workspace: Memory = ZERO,
    packed: bool = False,
) -> Plan:
    """Plan residency for `units` under `budget` (see the module docstring for the rules).
    `packed`: streamed units that pack are read from the packed stream file, whose blocks
    set their slots' size.

    Raises:
        BudgetError: the budget is below the minimum working set; the message gives it.
        ValueError: a non-positive context, or no units.
    """
    if context < 1:
        raise ValueError(f"context must be at least 1 token, not {context}")
    if not units:
        raise ValueError("no units to plan")
    kv = Memory(kv_bytes_per_token * context)

    # resident whatever the budget: the norms, and a shard's column slices where the plan reads
    # the model file (which holds them strided: they stream from the packed stream file only)
    def stays(u: Unit) -> bool:
        return u.kind == "norms" or (u.strided and not packed)

    def on_rows(u: Unit) -> bool:
        return u.kind == "embedding" and u.per_token < 1.0

    always = [u for u in units if stays(u)]
    lazy = [u for u in units if on_rows(u)]
    movable = [u for u in units if not stays(u) and not on_rows(u)]
    fixed = overhead + kv + workspace + Memory(sum(u.resident_bytes for u in always))

    best = None  # (streamed per token, used, pinned set, slot, depth)
    minimum = None
    slot_size: Callable[[Unit], int] = packed_file.slot_bytes if packed else slot_bytes
    size = {u.name: slot_size(u) for u in movable}  # a unit's slot, with its reads' alignment
    reads = {u.name: _packed_read(u) if packed else u.token_bytes for u in movable}  # per token, streamed

    def slot_for(pinned) -> int:  # the slot the units left to stream need
        return max((size[u.name] for u in movable if u not in pinned), default=0)

    pools = 2 if any(u.kind == "expert" for u in movable) else 1  # the window, the expert cache
    for cap in sorted({0, *size.values()}):
        must = [u for u in movable if size[u.name] > cap]
        base = fixed + Memory(sum(u.resident_bytes for u in must))
        need = base + Memory(pools * MIN_WINDOW * cap)
        minimum = need if minimum is None else min(minimum, need)
        if need > budget:
            continue
        # the deepest window up to GOOD_WINDOW that the budget allows, before pinning more
        depth = max(w for w in range(MIN_WINDOW, GOOD_WINDOW + 1) if base + Memory(pools * w * cap) <= budget)
        pinned = _fill(movable, must, (budget - fixed).bytes - pools * depth * cap)
        if pools == 1 and depth > LEAN_WINDOW:  # one slot fewer, where the reader still never idles
            lean = _fill(movable, must, (budget - fixed).bytes - LEAN_WINDOW * cap)
            if _resident_run_reads(movable, lean, profile) <= LEAN_WINDOW * slot_for(lean):
                depth, pinned = LEAN_WINDOW, lean
        streamed = [u for u in movable if u not in pinned]
        slot = slot_for(pinned)
        depth = min(depth, max(MIN_WINDOW, len(streamed)))
        used = fixed + Memory(
            sum(u.resident_bytes for u in pinned) + (pools * depth * slot if streamed else 0)
        )
        cost = sum(reads[u.name] for u in streamed)
        if best is None or (cost, used) < (best[0], best[1]):
            best = (cost, used, pinned, slot, depth)
    if best is None:
        raise BudgetError(_below_minimum(budget, minimum, context, overhead, kv, workspace, pools))

    _, used, pinned, slot, depth = best
    streamed = [u for u in movable if u not in pinned]
    free = budget - used
    on_demand = lazy
    if not streamed and lazy and Memory(sum(u.resident_bytes for u in lazy)) <= free:
        pinned = pinned | set(lazy)  # everything else is resident: make the plan read no disk
        used = used + Memory(sum(u.resident_bytes for u in lazy))
        on_demand = []
    window = expert_slots = 0
    if streamed:
        experts = sum(u.kind == "expert" for u in streamed)
        dense = len(streamed) - experts
        extra = (budget - used) // Memory(slot) if slot else 0
        if dense:  # the ring: no deeper than its units, at most MAX_WINDOW
            extra += 0 if experts else (pools - 1) * depth  # the expert pool's slots, unused
            window = min(MAX_WINDOW, max(depth, dense), depth + extra)
            extra -= window - depth
        if experts:  # the cache: whatever the ring leaves of both pools, up to one slot per expert
            expert_slots = min(max(depth, experts), (pools * depth if not dense else depth) + extra)
        used = used + Memory(slot * (window + expert_slots - pools * depth))

    streamed_tok = sum(reads[u.name] for u in streamed) + sum(u.token_bytes for u in on_demand)
    streaming = {u.name for u in streamed}
    read_tok = sum(reads[u.name] if u.name in streaming else u.resident_bytes * u.per_token for u in units)
    seconds = predict(streamed_tok, read_tok, kv_bytes_per_token * context, profile)
    bottleneck = max(seconds, key=seconds.get)
    order = {u.name: i for i, u in enumerate(units)}
    names = lambda us: tuple(sorted((u.name for u in us), key=order.get))  # noqa: E731
    return Plan(
        budget=budget,
        minimum=minimum,
        context=context,
        profile=profile.name,
        pinned=names([*pinned, *always]),
        streamed=names(streamed),
        on_demand=names(on_demand),
        window=window,
        slot=Memory(slot if streamed else 0),
        expert_slots=expert_slots,
        pinned_bytes=Memory(sum(u.resident_bytes for u in [*pinned, *always])),
        weight_bytes=Memory(sum(u.nbytes for u in units)),
        streamed_per_token=Memory.of(streamed_tok),
        read_per_token=Memory.of(read_tok),
        kv=kv,
        workspace=workspace,
        overhead=overhead,
        used=used,
        seconds_per_token=seconds[bottleneck],
        bottleneck=bottleneck,
        seconds=seconds,
        packed=packed,
        units=tuple(units),
    )


def predict(streamed: float, read: float, kv_read: float, profile: DeviceProfile) -> dict[str, float]:
    """Seconds per token each resource needs; the slowest one sets the pace."""
    return {
        "disk": streamed / profile.disk_read_bps,
        "memory": (read + streamed + kv_read) / profile.memory_bps,
        "compute": read / profile.kernel_bps,
    }


def _packed_read(u: Unit) -> float:
    """Bytes a decode step reads of unit `u` streamed from the packed stream file: its block,
    or the model file's bytes where it does not pack."""
    b = packed_file.block(u)
    return (u.nbytes if b is None else b.nbytes) * u.per_token


def _resident_run_reads(movable: list[Unit], pinned: set[Unit], profile: DeviceProfile) -> float:
    """Bytes the disk reads while the kernels go through the longest run of resident units in
    the ring's cyclic order (the head's run continues into the first layers of the next token)."""
    longest = run = 0
    for u in movable * 2:  # twice round: a run may wrap
        run = run + u.resident_bytes if u in pinned else 0
        longest = max(longest, run)
    return longest * profile.disk_read_bps / profile.kernel_bps


def _fill(movable: list[Unit], must: list[Unit], room: int) -> set[Unit]:
    """Pin `must`, then whole layers spread through the depth, then the largest units that fit `room`
    bytes (what the budget leaves once the fixed costs and the window are paid)."""
    pinned = set(must)
    room -= sum(u.resident_bytes for u in must)
    left = [u for u in movable if u not in pinned]
    layers: dict[int | None, list[Unit]] = {}
    for u in left:
        if u.per_token >= 1.0:
            layers.setdefault(u.layer, []).append(u)
    groups = [layers.pop(None)] if None in layers else []  # a head or tied embedding
    groups += [layers[i] for i in _spread(sorted(layers))]
    for g in groups:
        size = sum(u.resident_bytes for u in g)
        if size <= room:
            pinned.update(g)
            room -= size
    rest = sorted(
        (u for u in left if u not in pinned),
        key=lambda u: (-u.per_token, -u.nbytes, u.layer or 0, u.expert or 0),
    )
    for u in rest:
        if u.resident_bytes <= room:
            pinned.add(u)
            room -= u.resident_bytes
    return pinned


def _spread(items: list) -> list:
    """`items` reordered so that every prefix is spread evenly over the list: the van der
    Corput sequence (0, 1/2, 1/4, 3/4, 1/8, ...) scaled to its length."""
    n, order, seen = len(items), [], set()
    j = 0
    while len(order) < n:
        x, f, k = 0.0, 0.5, j
        while k:
            x += f * (k & 1)
            k >>= 1
            f /= 2
        i = int(x * n)
        if i not in seen:
            seen.add(i)
            order.append(i)
        j += 1
    return [items[i] for i in order]


def _below_minimum(budget, minimum, context, overhead, kv, workspace, pools: int = 1) -> str:
    need_mib = -(-minimum.bytes // (1 << 20))
    return (
        f"a memory budget of {budget} is below this model's minimum working set of {need_mib} MiB "
        f"({minimum.bytes:,} bytes) at context {context}: runtime {overhead}, KV cache {kv}, "
        f"workspace {workspace}, plus {pools * MIN_WINDOW} prefetch slots"
        f"{' (half of them for the experts)' if pools > 1 else ''} and the units too large to stream. "
        f"Give --memory-budget {need_mib}MiB or more, or a shorter --ctx"
    )


def plan_model(
    store: WeightStore,
    args: ModelArgs,
    budget: Memory,
    context: int,
    profile: DeviceProfile,
    shard: Shard | None = None,
    overhead: Memory = DEFAULT_OVERHEAD,
    max_tokens: int = 64,
    kv_bits: int = 16,
    packed: bool = False,
) -> Plan:
    """`plan` for a model catalog: units, KV bytes (at kv_bits) and workspace from the config;
    `packed` as for `plan`.

    Raises:
        BudgetError: the budget is below the minimum working set.
    """
    context = min(context, args.context_length)
    return plan(
        units(store, args, shard),
        budget,
        context,
        kv_bytes_per_token(args, shard, kv_bits=kv_bits, context=context),
        profile,
        overhead,
        Memory(workspace_bytes(args, context, max_tokens, profile.cores, shard)),
        packed,
    )
