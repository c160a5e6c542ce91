"""Leaf pieces every architecture file composes: config, shard, workspace, and the blocks.

A model's forward runs over a *shard*: a range of KV heads (with their query heads), a
range of FFN columns and a range of experts. One device is the shard that holds all of
them. The blocks below return partial sums; the model file reduces them through its
communicator (the identity on one device) at the two points of each layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import numba as nb
import numpy as np

from edgert import kernels as K
from edgert.cache import KVCache
from edgert.comm import Identity
from edgert.errors import FormatError, UnsupportedError
from edgert.offload.stream import RowReader
from edgert.quant.formats import QType
from edgert.quant.kernels import MatmulScratch, PackedWeight, dequantize_rows, get_rows, matmul, pack
from edgert.quant.kv import QuantKVCache, check_kv_bits
from edgert.rope import llama3_factors
from edgert.weights import TensorRef, WeightStore

# ---- config --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelArgs:
    arch: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    norm_eps: float
    rope_base: float
    rope_neox: bool  # True: rotate-half pairs (HF, and GGUF qwen/gemma); False: interleaved (GGUF llama)
    n_rot: int
    context_length: int
    rope_scale: float = 1.0  # linear RoPE scaling: angle * rope_scale
    rope_factors: tuple[float, ...] = ()  # Llama 3 scaling from a config: frequency i / factor i
    n_experts: int = 0
    n_experts_used: int = 0
    expert_ffn_dim: int = 0
    norm_topk: bool = True  # renormalise the chosen experts' weights to sum to 1
    # gemma-style knobs; the defaults are the plain transformer
    sliding_window: int = 0
    sliding_layers: tuple[bool, ...] = ()
    rope_local_base: float = 10000.0
    attn_scale: float = 0.0  # 0: 1/sqrt(head_dim)
    scale_q: bool = False  # the scale multiplies q before the attention (gemma, as llama.cpp does)
    embed_scale: float = 1.0
    final_softcap: float = 0.0
    attn_softcap: float = 0.0
    norm_shift: float = 0.0  # HF gemma stores RMSNorm weights as w - 1
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise FormatError(f"{self.n_heads} attention heads do not divide into {self.n_kv_heads} KV heads")
        if self.n_experts and not self.expert_ffn_dim:  # mixtral: experts are ffn_dim wide
            object.__setattr__(self, "expert_ffn_dim", self.ffn_dim)

    @property
    def q_scale(self) -> float:
        return self.attn_scale or 1.0 / math.sqrt(self.head_dim)


GGUF_NEOX = {"qwen2", "qwen3", "qwen3moe", "gemma3", "gemma2", "gemma"}


def args_from_gguf(meta: dict[str, Any], arch: str, **overrides) -> ModelArgs:
    def get(key, default=None):
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise FormatError(f"GGUF metadata lacks {arch}.{key}")
        return v

    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", dim // n_heads))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    scale = 1.0
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        scale = 1.0 / float(meta.get(f"{arch}.rope.scaling.factor", 1.0))
    kw = dict(
        arch=arch,
        n_layers=int(get("block_count")),
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        ffn_dim=int(get("feed_forward_length", 0)),
        vocab_size=int(vocab),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_base=float(get("rope.freq_base", 10000.0)),
        rope_neox=arch in GGUF_NEOX,
        n_rot=int(get("rope.dimension_count", head_dim)),
        context_length=int(get("context_length", 4096)),
        rope_scale=scale,
        n_experts=int(get("expert_count", 0)),
        n_experts_used=int(get("expert_used_count", 0)),
        expert_ffn_dim=int(get("expert_feed_forward_length", 0)),
        attn_softcap=float(get("attn_logit_softcapping", 0.0)),
        final_softcap=float(get("final_logit_softcapping", 0.0)),
    )
    kw.update(overrides)
    return ModelArgs(**kw)


def args_from_hf(cfg: dict[str, Any], arch: str, **overrides) -> ModelArgs:
    cfg = {**cfg, **cfg.get("text_config", {})}
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if "full_attention" in rope and isinstance(rope["full_attention"], dict):
        rope = rope["full_attention"]
    n_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    scale, factors = 1.0, ()
    rope_type = rope.get("rope_type", rope.get("type"))
    rope_base = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if rope_type == "linear":
        scale = 1.0 / float(rope["factor"])
    elif rope_type == "llama3":
        factors = tuple(float(f) for f in llama3_factors(rope, head_dim, rope_base))
    elif rope_type not in (None, "default"):
        raise UnsupportedError(f"RoPE scaling {rope_type!r} is not supported")
    kw = dict(
        arch=arch,
        n_layers=cfg["num_hidden_layers"],
        dim=cfg["hidden_size"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        ffn_dim=cfg.get("intermediate_size", 0),
        vocab_size=cfg["vocab_size"],
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_base=rope_base,
        rope_neox=True,
        n_rot=int(head_dim * cfg.get("partial_rotary_factor", 1.0)),
        context_length=cfg.get("max_position_embeddings", 4096),
        rope_scale=scale,
        rope_factors=factors,
        n_experts=cfg.get("num_local_experts") or cfg.get("num_experts") or 0,
        n_experts_used=cfg.get("num_experts_per_tok", 0),
        expert_ffn_dim=cfg.get("moe_intermediate_size", 0),
        norm_topk=cfg.get("norm_topk_prob", True),
        attn_softcap=float(cfg.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(cfg.get("final_logit_softcapping") or 0.0),
    )
    kw.update(overrides)
    names = {f.name for f in fields(ModelArgs)}
    return ModelArgs(**{k: v for k, v in kw.items() if k in names})


# ---- shard ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """What one device computes: KV heads [kv), their query heads, FFN columns, experts."""

    kv: range
    ffn: range
    experts: range
    expert_ffn: range = range(0)

    @classmethod
    def full(cls, a: ModelArgs) -> Shard:
        return cls(range(a.n_kv_heads), range(a.ffn_dim), range(a.n_experts), range(a.expert_ffn_dim))


class Linear(NamedTuple):
    w: PackedWeight | np.ndarray  # GGUF blocks: repacked at load, or raw rows in a streamer's slot
    qtype: QType  # a QType, not an int: matmul then skips re-validating it on every call
    bias: np.ndarray | None = None


def _cols(raw: np.ndarray, ref: TensorRef, cols: range) -> np.ndarray:
    """Columns `cols` of `ref`'s rows `raw`, as a strided zero-copy view (TensorRef.columns
    checks the block boundaries)."""
    piece = ref.columns(cols.start, cols.stop)
    lo = piece.offset - ref.offset
    return raw[:, lo : lo + piece.nbytes]


def linear(store: WeightStore, name: str, rows: range | None = None, cols: range | None = None) -> Linear:
    """The weight `name`.weight (+ `name`.bias if present), restricted to the shard's rows/cols."""
    ref = store.ref(f"{name}.weight")
    if rows is not None and (rows.start, rows.stop) != (0, ref.n_rows):
        ref = ref.rows(rows.start, rows.stop)
    sliced = cols is not None and (cols.start, cols.stop) != (0, ref.shape[-1])
    bias = None
    if f"{name}.bias" in store:
        b = store.ref(f"{name}.bias")
        if rows is not None and (rows.start, rows.stop) != (0, b.shape[0]):
            b = b.elements(rows.start, rows.stop)  # a shard's unit holds only these bytes
        bias = store.f32(b)
    if not store.packs:
        # A streamer's slot: the kernels read the weight where it lies, as the packed stream
        # file's records or the model file's blocks (SlotStore.matrix knows which); a column
        # slice is one piece of the packed stream file.
        return Linear(store.matrix(ref, cols if sliced else None), ref.qtype, bias)
    raw = store.raw(ref)
    if sliced:
        raw = _cols(raw, ref, cols)
    # Repacking copies the bytes once into the kernels' row-interleaved layout; the file
    # mapping is dropped after loading, so no weight is held twice.
    # Release the file's pages chunk by chunk as they are packed; a shard's column slice
    # interleaves with other shards' bytes, so its pages go once the whole slice is packed.
    contiguous = raw.flags.c_contiguous
    w = pack(raw, ref.qtype, done=(lambda r0, r1: store.evict(ref, (r0, r1))) if contiguous else None)
    if not contiguous:
        store.evict(ref)
    return Linear(w, ref.qtype, bias)


def norm(store: WeightStore, name: str, shift: float = 0.0) -> np.ndarray:
    w = store.f32(f"{name}.weight")
    return w + np.float32(shift) if shift else w


# ---- workspace -----------------------------------------------------------------------


class Workspace:
    """Every activation buffer of the forward, allocated once for `max_tokens` rows."""

    def __init__(self, a: ModelArgs, shard: Shard, max_tokens: int, context: int):
        hq = len(shard.kv) * (a.n_heads // a.n_kv_heads)
        hkv = len(shard.kv)
        ff = max(len(shard.ffn), len(shard.expert_ffn))
        T = max_tokens
        f32 = np.float32
        self.max_tokens = T
        self.x = np.zeros((T, a.dim), f32)  # residual stream
        self.h = np.zeros((T, a.dim), f32)  # normed input of a block
        self.out = np.zeros((T, a.dim), f32)  # a block's (partial) output
        self.q = np.zeros((T, hq * a.head_dim), f32)
        self.k = np.zeros((T, hkv * a.head_dim), f32)
        self.v = np.zeros((T, hkv * a.head_dim), f32)
        self.att = np.zeros((T, hq * a.head_dim), f32)
        self.gate = np.zeros((T, ff), f32)
        self.up = np.zeros((T, ff), f32)
        self.logits = np.zeros((1, a.vocab_size), f32)
        if a.n_experts:
            self.router = np.zeros((T, a.n_experts), f32)
            self.sel = np.zeros((T, a.n_experts_used), np.int32)
            self.sel_w = np.zeros((T, a.n_experts_used), f32)
            self.eh = np.zeros((T * a.n_experts_used, a.dim), f32)
            self.eo = np.zeros((T * a.n_experts_used, a.dim), f32)
            self.offsets = np.zeros(a.n_experts + 1, np.int64)
            self.order = np.zeros(T * a.n_experts_used, np.int64)
        self.scratch = MatmulScratch(T, max(a.dim, ff, hq * a.head_dim))
        self.scores = np.zeros((T * hq, context), f32)  # attention_f16: one row per (token, head)
        self.attn = K.AttentionScratch(hq, hkv, a.head_dim)  # split-K attention, parity lanes


def rope_tables(a: ModelArgs, max_len: int, base: float, freq_factors: np.ndarray | None = None):
    half = a.n_rot // 2
    cos = np.empty((max_len, half), np.float32)
    sin = np.empty((max_len, half), np.float32)
    ff = np.ones(half, np.float64) if freq_factors is None else freq_factors.astype(np.float64)
    K.rope_table(cos, sin, base, a.n_rot, ff, a.rope_scale)
    return cos, sin


# ---- blocks --------------------------------------------------------------------------


def project(ws: Workspace, out: np.ndarray, x: np.ndarray, lin: Linear, same_input: bool = False) -> None:
    matmul(out, x, lin.w, lin.qtype, ws.scratch, same_input)  # same_input: x as in the previous call
    if lin.bias is not None:
        out += lin.bias


def attention_block(
    ws: Workspace,
    a: ModelArgs,
    L,
    cache,
    pos: int,
    T: int,
    rope: tuple[np.ndarray, np.ndarray],
    window: int = 0,
) -> np.ndarray:
    """ws.h[:T] -> partial attention output in ws.out[:T]. L has wq, wk, wv, wo, q_norm, k_norm."""
    h = ws.h[:T]
    hd = a.head_dim
    q, k, v = ws.q[:T], ws.k[:T], ws.v[:T]
    project(ws, q, h, L.wq)
    project(ws, k, h, L.wk, same_input=True)  # h quantized once for q, k and v
    project(ws, v, h, L.wv, same_input=True)
    q3 = q.reshape(T, -1, hd)  # (T, Hq, D)
    k3 = k.reshape(T, -1, hd)  # (T, Hkv, D)
    if L.q_norm is not None:  # qwen3, gemma3: RMSNorm over each head
        K.rmsnorm(q.reshape(-1, hd), q.reshape(-1, hd), L.q_norm, a.norm_eps)
        K.rmsnorm(k.reshape(-1, hd), k.reshape(-1, hd), L.k_norm, a.norm_eps)
    K.rope(q3, rope[0], rope[1], pos, a.rope_neox)
    K.rope(k3, rope[0], rope[1], pos, a.rope_neox)
    att = ws.att[:T].reshape(T, -1, hd)  # (T, Hq, D)
    if isinstance(cache, QuantKVCache):  # 8/4-bit: attention reads the codes directly
        cache.update(k3, v.reshape(T, -1, hd), pos)
        cache.attend(att, q3, pos, a.q_scale, window, a.attn_softcap, ws.scores, ws.attn)
    else:
        keys, values = cache.update_and_fetch(k3, v.reshape(T, -1, hd), pos)
        if keys.dtype == np.float16 and ws.scratch.ggml_order:  # llama.cpp parity
            k16, v16 = keys.view(np.uint16), values.view(np.uint16)
            scale = a.q_scale
            if a.scale_q:  # before q's fp16 rounding, which a subnormal half makes inexact to move
                q3 *= np.float32(scale)
                scale = 1.0
            scratch = (ws.scores, K.F16_TABLE, ws.attn.lanes, ws.scratch.ggml_batch or T)
            K.attention_f16_ggml(att, q3, k16, v16, pos, scale, window, a.attn_softcap, *scratch)
        elif keys.dtype == np.float16:
            K.attention_f16(
                att,
                q3,
                keys.view(np.uint16),
                values.view(np.uint16),
                pos,
                a.q_scale,
                window,
                a.attn_softcap,
                ws.scores,
                K.F16_TABLE,
                ws.attn.part,
                ws.attn.stats,
                ws.attn.rows,
                nb.get_num_threads(),
            )
        else:
            K.attention(att, q3, keys, values, pos, a.q_scale, window, a.attn_softcap)
    att = ws.att[:T]
    project(ws, ws.out[:T], att, L.wo)
    return ws.out[:T]


def ffn_block(ws: Workspace, L, T: int, act=K.swiglu) -> np.ndarray:
    """Gated FFN over the shard's columns: ws.h[:T] -> partial output in ws.out[:T]."""
    h = ws.h[:T]
    w = L.gate  # each projection is taken once, in the order of use (a streamed FFN acquires it)
    gate = ws.gate[:T, : w.w.shape[0]]
    project(ws, gate, h, w)
    w = L.up
    up = ws.up[:T, : w.w.shape[0]]
    project(ws, up, h, w, same_input=True)
    act(gate, up)
    project(ws, ws.out[:T], gate, L.down)
    return ws.out[:T]


@nb.njit(cache=True)
def route(logits, k, renorm, sel, sel_w):
    """Softmax over experts, keep the top k per token; optionally renormalise their weights."""
    T, E = logits.shape
    for t in range(T):
        m = logits[t].max()
        total = 0.0
        for e in range(E):
            total += math.exp(logits[t, e] - m)
        chosen = 0.0
        for j in range(k):  # selection by repeated arg-max: k is small; ties go to the lower id
            best, bp = -1, -1.0
            for e in range(E):
                p = math.exp(logits[t, e] - m) / total
                taken = False
                for i in range(j):
                    taken |= sel[t, i] == e
                if not taken and p > bp:
                    best, bp = e, p
            sel[t, j] = best
            sel_w[t, j] = bp
            chosen += bp
        if renorm:
            for j in range(k):
                sel_w[t, j] /= chosen


@nb.njit(cache=True)
def group_by_expert(sel, n_experts, offsets, order):
    """Counting sort of the (token, slot) choices by expert: order[offsets[e]:offsets[e+1]]
    holds token * k + slot for every choice of expert e."""
    T, k = sel.shape
    offsets[:] = 0
    for t in range(T):
        for j in range(k):
            offsets[sel[t, j] + 1] += 1
    for e in range(n_experts):
        offsets[e + 1] += offsets[e]
    fill = offsets[:n_experts].copy()
    for t in range(T):
        for j in range(k):
            e = sel[t, j]
            order[fill[e]] = t * k + j
            fill[e] += 1


@nb.njit(cache=True)
def gather_rows(dst, src, picks, k):
    for i in range(picks.shape[0]):
        dst[i] = src[picks[i] // k]


@nb.njit(cache=True)
def scatter_add_rows(out, rows, picks, k, weights):
    """out[token] += weight * rows[i] for each pick i = token * k + slot."""
    for i in range(picks.shape[0]):
        t, j = picks[i] // k, picks[i] % k
        w = weights[t, j]
        for d in range(out.shape[1]):
            out[t, d] += w * rows[i, d]


def moe_block(ws: Workspace, a: ModelArgs, L, T: int, act=K.swiglu) -> np.ndarray:
    """Route each token to its top-k experts; sum the shard's experts into ws.out[:T]."""
    h, out, k = ws.h[:T], ws.out[:T], a.n_experts_used
    out[:] = 0.0
    project(ws, ws.router[:T], h, L.router)
    sel, sel_w = ws.sel[:T], ws.sel_w[:T]
    route(ws.router[:T], k, a.norm_topk, sel, sel_w)
    group_by_expert(sel, a.n_experts, ws.offsets, ws.order)
    if type(L.experts) is not dict:  # some experts stream: say which ones the tokens need
        L.experts.want([e for e in range(a.n_experts) if ws.offsets[e] < ws.offsets[e + 1]])
    for e in range(a.n_experts):
        lo, hi = ws.offsets[e], ws.offsets[e + 1]
        if lo == hi:
            continue
        ex = L.experts.get(e)  # None: another shard's expert
        if ex is None:
            continue
        picks = ws.order[lo:hi]
        n = hi - lo
        eh, eo = ws.eh[:n], ws.eo[:n]
        gather_rows(eh, h, picks, k)
        gate, up = ws.gate[:n, : ex.gate.w.shape[0]], ws.up[:n, : ex.up.w.shape[0]]
        project(ws, gate, eh, ex.gate)
        project(ws, up, eh, ex.up)
        act(gate, up)
        project(ws, eo, gate, ex.down)
        scatter_add_rows(out, eo, picks, k, sel_w)
    return out


def embed(ws: Workspace, a: ModelArgs, emb: Linear | RowReader, tokens: np.ndarray) -> np.ndarray:
    T = len(tokens)
    if T > ws.max_tokens:
        raise ValueError(f"{T} tokens exceed the workspace's {ws.max_tokens}")
    if tokens.min() < 0 or tokens.max() >= a.vocab_size:
        raise ValueError(f"token id out of range [0, {a.vocab_size})")
    x = ws.x[:T]
    if type(emb) is RowReader:  # a streamed embedding: read just these rows from the file
        dequantize_rows(x, emb.read(tokens), emb.qtype)
    else:
        get_rows(x, emb.w, emb.qtype, tokens)
    if a.embed_scale != 1.0:
        x *= np.float32(a.embed_scale)
    return x


def head(ws: Workspace, a: ModelArgs, out_norm: np.ndarray, parts, T: int, all_logits: bool):
    """Final norm and the output projection: logits of the last position, or of all T.
    `parts` gives (first row, last row, Linear) pieces of the output matrix: one for a
    resident head, row chunks as they arrive for a streamed one."""
    x = ws.x[:T] if all_logits else ws.x[T - 1 : T]
    hn = ws.h[: len(x)]
    K.rmsnorm(hn, x, out_norm, a.norm_eps)
    logits = np.empty((len(x), a.vocab_size), np.float32) if all_logits else ws.logits
    for r0, r1, lin in parts:
        matmul(logits[:, r0:r1], hn, lin.w, lin.qtype, ws.scratch)
    if a.final_softcap > 0:  # cap * tanh(logits / cap), in place
        np.divide(logits, np.float32(a.final_softcap), out=logits)
        np.tanh(logits, out=logits)
        logits *= np.float32(a.final_softcap)
    return logits


# ---- loading -------------------------------------------------------------------------


class LayerWeights:
    """One layer's tensors for this shard; absent pieces stay None."""

    attn_norm = wq = wk = wv = wo = q_norm = k_norm = post_attn_norm = None
    ffn_norm = gate = up = down = post_ffw_norm = router = None

    def __init__(self):
        self.experts: dict[int, Expert] = {}  # this shard's experts (MoE layers only)


class Expert(NamedTuple):
    gate: Linear
    up: Linear
    down: Linear


def load_attention(L: LayerWeights, store: WeightStore, a: ModelArgs, shard: Shard, i: int) -> None:
    group, hd = a.n_heads // a.n_kv_heads, a.head_dim
    qrows = range(shard.kv.start * group * hd, shard.kv.stop * group * hd)
    kvrows = range(shard.kv.start * hd, shard.kv.stop * hd)
    p = f"blk.{i}"
    L.wq = linear(store, f"{p}.attn_q", rows=qrows)
    L.wk = linear(store, f"{p}.attn_k", rows=kvrows)
    L.wv = linear(store, f"{p}.attn_v", rows=kvrows)
    L.wo = linear(store, f"{p}.attn_output", cols=qrows)


FFN_PARTS = ("gate", "up", "down")  # a dense FFN's projections: one residency unit each


def load_ffn(
    L: LayerWeights, store: WeightStore, a: ModelArgs, shard: Shard, i: int, parts=FFN_PARTS
) -> None:
    """The layer's dense FFN projections `parts`, or in an MoE layer its router (experts load
    one at a time)."""
    p = f"blk.{i}"
    if a.n_experts:
        L.router = linear(store, f"{p}.ffn_gate_inp")
        return
    for part in parts:
        if part == "down":
            L.down = linear(store, f"{p}.ffn_down", cols=shard.ffn)
        else:
            setattr(L, part, linear(store, f"{p}.ffn_{part}", rows=shard.ffn))


def load_expert(store: WeightStore, shard: Shard, i: int, e: int) -> Expert:
    p = f"blk.{i}"
    return Expert(
        linear(store, f"{p}.ffn_gate.{e}", rows=shard.expert_ffn),
        linear(store, f"{p}.ffn_up.{e}", rows=shard.expert_ffn),
        linear(store, f"{p}.ffn_down.{e}", cols=shard.expert_ffn),
    )


class StreamedFFN:
    """Layer i's dense FFN when some of its projections stream and each is a residency unit
    of its own (large projections, edgert.offload.units; a small FFN is one unit, which
    `Transformer.ffn` acquires whole). A resident projection comes from the layer, a streamed
    one is acquired from the streamer when the forward asks for it (ffn_block asks for gate,
    up, down in the order it uses them), which releases the previous unit's slot for the
    reader to refill."""

    def __init__(self, model: Transformer, i: int):
        self.model, self.L, self.i = model, model.layers[i], i

    def _get(self, part: str) -> Linear:
        lin = getattr(self.L, part)
        return lin if lin is not None else self.model._streamed(f"blk.{self.i}.ffn_{part}")

    gate = property(lambda self: self._get("gate"))
    up = property(lambda self: self._get("up"))
    down = property(lambda self: self._get("down"))


class StreamedExperts:
    """Layer i's experts when some of them stream: the resident ones from the layer, the
    others from the model's expert cache. moe_block tells it which experts the routed tokens
    need (`want`) before it asks for them one by one (`get`), so the cache reads the missing
    ones while the present ones compute."""

    def __init__(self, model: Transformer, i: int, resident: dict[int, Expert]):
        self.model, self.i, self.resident = model, i, resident
        self.streamed = frozenset(model.shard.experts) - resident.keys()
        self.names = {e: f"blk.{i}.expert.{e}" for e in self.streamed}

    def want(self, experts) -> None:
        self.model.expert_cache.want([self.names[e] for e in experts if e in self.streamed])

    def get(self, e: int) -> Expert | None:
        if e in self.streamed:
            return self.model._expert(self.i, e)
        return self.resident.get(e)  # None: another shard's expert


class Transformer:
    """What every architecture shares: embedding, output head, layers, workspace, caches.

    Each architecture file subclasses this with its own `load_norms` and its own forward
    (`__call__`), so that each forward reads top to bottom in its model's file. The forward
    takes each block's weights from `attention(i)`, `ffn(i)` and `head()`: the model's own
    copy of a pinned unit, or a view of the streamer's slot that holds a streamed one.

    With a `plan` (edgert.offload), only the plan's pinned units are loaded; the streamed
    ones are read through the streamer's window on every forward.
    """

    def __init__(
        self,
        args: ModelArgs,
        store: WeightStore,
        context: int,
        shard: Shard | None = None,
        comm=None,
        max_tokens: int = 64,
        kv_dtype=np.float16,
        plan=None,
        kv_bits: int = 16,
        stream_file=None,
        llama_parity: bool = False,
    ):
        self.args = a = args
        self.kv_dtype = kv_dtype  # of the 16-bit cache: float16, or float32 (tests)
        self.kv_bits = check_kv_bits(kv_bits)
        self.store = store
        self.context = context
        self.shard = shard or Shard.full(a)
        self.comm = comm or Identity()
        self.plan = plan
        # Where streamed units are read from: the packed stream file (edgert.offload.packed),
        # whose layouts put packed records in the slots, or the model file's raw blocks.
        self.stream_file = stream_file
        self.streamer = self.expert_cache = None
        self._views: dict[tuple[str, int], Any] = {}
        pinned = None if plan is None else set(plan.pinned)
        resident = (lambda _unit: True) if pinned is None else pinned.__contains__
        tied = "output.weight" not in store
        self.head_name = "token_embd" if tied else "output"
        # The output matrix in row pieces: (first row, last row, unit, Linear or None if streamed)
        self.head_parts = [(0, a.vocab_size, "embedding" if tied else "head", None)]
        by_name = {}  # the plan's units, by name
        if plan is not None:
            by_name = {u.name: u for u in plan.units}
            kind = "embedding" if tied else "head"
            self.head_parts = [
                (*(u.rows or (0, a.vocab_size)), u.name, None) for u in by_name.values() if u.kind == kind
            ]
        whole = all(resident(name) for _, _, name, _ in self.head_parts)
        if resident("embedding") or (tied and whole):
            self.embed = linear(store, "token_embd")
        else:  # read a row at a time: the model holds only some of it, or none
            self.embed = RowReader(store.ref("token_embd.weight"), max_tokens)
        self.out_norm = norm(store, "output_norm", a.norm_shift)
        if whole:
            out = self.embed if tied else linear(store, "output")
            self.head_parts = [(0, a.vocab_size, self.head_parts[0][2], out)]
        else:
            self.head_parts = [
                (r0, r1, n, linear(store, self.head_name, rows=range(r0, r1)) if resident(n) else None)
                for r0, r1, n, _ in self.head_parts
            ]
        self.layers = [self.load_layer(store, i, resident) for i in range(a.n_layers)]
        # each block as the forward takes it: the layer, or the name of the unit to acquire
        # (formatted once here, not every token)
        self._attention = [L if L.wq is not None else f"blk.{i}.attention" for i, L in enumerate(self.layers)]
        self._ffns = [self._ffn_source(i, L, by_name, resident) for i, L in enumerate(self.layers)]
        # Llama 3 scaling: GGUF stores the factors as a tensor, a checkpoint in its config
        factors = store.f32("rope_freqs.weight") if "rope_freqs.weight" in store else None
        if factors is None and a.rope_factors:
            factors = np.array(a.rope_factors, np.float32)
        self.rope = rope_tables(a, context, a.rope_base, factors)
        self.ws = Workspace(a, self.shard, max_tokens, context)
        # llama.cpp parity: quantized matmuls (quant.kernels), fp16 attention (attention_f16_ggml)
        # and gemma's GELU in ggml's float orders; norms, RoPE and SiLU always follow them
        self.ws.scratch.ggml_order = llama_parity
        if plan is not None and plan.streamed:
            self.streamer = self._make_streamer(plan, by_name)
            self.expert_cache = self._make_expert_cache(plan, by_name)
        store.release()  # every pinned tensor now lives in the model: unmap the files

    def load_norms(self, store: WeightStore, i: int) -> LayerWeights:
        raise NotImplementedError

    def _ffn_source(self, i: int, L: LayerWeights, by_name: dict, resident):
        """Layer i's FFN as `ffn` hands it out: the name of its unit when the FFN streams as
        one (an MoE layer's router, or a small dense FFN), else the layer itself when it holds
        it (the router, or all three projections), else a StreamedFFN that acquires the
        streamed projections as they are used."""
        whole = f"blk.{i}.ffn"
        if whole in by_name and not resident(whole):
            return whole
        if self.args.n_experts or None not in (L.gate, L.up, L.down):
            return L
        return StreamedFFN(self, i)

    def load_layer(self, store: WeightStore, i: int, resident) -> LayerWeights:
        """Layer i's norms, and those of its blocks that `resident(unit name)` keeps."""
        a, p = self.args, f"blk.{i}"
        L = self.load_norms(store, i)
        if f"{p}.attn_q_norm.weight" in store:
            L.q_norm = norm(store, f"{p}.attn_q_norm", a.norm_shift)
            L.k_norm = norm(store, f"{p}.attn_k_norm", a.norm_shift)
        if resident(f"{p}.attention"):
            load_attention(L, store, a, self.shard, i)
        if resident(f"{p}.ffn"):  # an MoE router, or a dense FFN that is one unit
            load_ffn(L, store, a, self.shard, i)
        elif not a.n_experts:  # the projections that are units of their own and resident
            load_ffn(L, store, a, self.shard, i, [q for q in FFN_PARTS if resident(f"{p}.ffn_{q}")])
        for e in self.shard.experts if a.n_experts else ():
            if resident(f"{p}.expert.{e}"):
                L.experts[e] = load_expert(store, self.shard, i, e)
        return L

    def _make_streamer(self, plan, by_name: dict):
        from edgert.offload.stream import Streamer

        head = [n for _, _, n, lin in self.head_parts if lin is None]
        ring = [n for n in plan.streamed if n not in head and by_name[n].kind != "expert"]
        ring += head  # a tied embedding is read as the head, last
        return Streamer([by_name[n] for n in ring], plan.window, place=self._place()) if ring else None

    def _make_expert_cache(self, plan, by_name: dict):
        """An LRU cache for the streamed experts; their layers ask it for them (StreamedExperts)."""
        from edgert.offload.stream import ExpertCache

        streamed = [by_name[n] for n in plan.streamed if by_name[n].kind == "expert"]
        if not streamed:
            return None
        for i in sorted({u.layer for u in streamed}):
            self.layers[i].experts = StreamedExperts(self, i, self.layers[i].experts)
        return ExpertCache(streamed, plan.expert_slots, place=self._place())

    def _place(self):
        from edgert.offload.stream import layout

        return layout if self.stream_file is None else self.stream_file.layout

    def io_stats(self):
        """What the streamer and the expert cache have read so far (a StreamStats), or None
        when nothing streams."""
        parts = [s.snapshot() for s in (self.streamer, self.expert_cache) if s is not None]
        return sum(parts[1:], parts[0]) if parts else None

    # ---- the blocks, resident or streamed ----------------------------------------------

    def attention(self, i: int):
        a = self._attention[i]
        return self._streamed(a) if type(a) is str else a

    def ffn(self, i: int):
        f = self._ffns[i]
        return self._streamed(f) if type(f) is str else f

    def head(self):
        """The output matrix's row pieces, (first row, last row, Linear), streamed ones as they
        arrive. The last streamed unit of the token is released at the end, so the reader can
        refill its slot while the next token computes its resident layers."""
        for r0, r1, name, lin in self.head_parts:
            yield r0, r1, lin if lin is not None else self._streamed(name)
        if self.streamer is not None:
            self.streamer.release()

    def _streamed(self, name: str):
        """Unit `name`'s weights from the streamer's slot that holds it."""
        return self._slot_view(self.streamer, self.streamer.acquire(name), name)

    def _expert(self, i: int, e: int) -> Expert:
        """Expert e of layer i from the expert cache."""
        name = f"blk.{i}.expert.{e}"
        return self._slot_view(self.expert_cache, self.expert_cache.get(name), name)

    def _slot_view(self, pool, slot: int, name: str):
        """Unit `name`'s weights as views of `pool`'s slot (built once per unit and slot, then
        reused: nothing is allocated per token)."""
        view = self._views.get((name, slot))
        if view is None:
            from edgert.offload.stream import SlotStore

            lay = pool.layout_of(name)
            view = self._views[(name, slot)] = self._load_unit(
                SlotStore(self.store.refs, lay, pool.slots[slot]), lay.unit
            )
        return view

    def _load_unit(self, store: WeightStore, u):
        """A streamed unit's weights, from the store over its slot: the Linear of a head chunk
        or an FFN projection, an attention block or MoE router as LayerWeights, or an Expert."""
        if u.kind in ("head", "embedding"):  # the head, or a row chunk of it
            return linear(store, self.head_name, rows=range(*(u.rows or (0, self.args.vocab_size))))
        i, a, R = u.layer, self.args, self.layers[u.layer]
        if u.kind == "expert":
            return load_expert(store, self.shard, i, u.expert)
        L = LayerWeights()
        if u.kind == "attention":
            load_attention(L, store, a, self.shard, i)
            L.q_norm, L.k_norm = R.q_norm, R.k_norm
            return L
        if u.name.endswith(".ffn"):  # an MoE layer's router, or a whole dense FFN
            load_ffn(L, store, a, self.shard, i)
            L.experts = R.experts
            return L
        part = u.name.rsplit("_", 1)[1]  # blk.{i}.ffn_{gate|up|down}
        load_ffn(L, store, a, self.shard, i, (part,))
        return getattr(L, part)

    def close(self) -> None:
        """Stop the streamer's reader and close its files (the model cannot run after this)."""
        for s in (self.streamer, self.expert_cache):
            if s is not None:
                s.close()
        if type(self.embed) is RowReader:
            self.embed.close()

    def make_cache(self, kv_bits: int | None = None):
        """One KV cache per layer: 16-bit (kv_dtype), or 8/4-bit quantized (default: self.kv_bits)."""
        n_kv, hd, bits = len(self.shard.kv), self.args.head_dim, check_kv_bits(kv_bits or self.kv_bits)
        if bits == 16:
            return [KVCache(n_kv, hd, self.context, self.kv_dtype) for _ in self.layers]
        return [QuantKVCache(n_kv, hd, self.context, bits) for _ in self.layers]

    @property
    def max_tokens(self) -> int:
        return self.ws.max_tokens
