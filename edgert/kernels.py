"""Numba kernels for everything but the quantized matmul (that is `edgert.quant.kernels`).

Each kernel writes into an `out` argument that the caller preallocated; none allocates.
The numpy twins at the bottom are the references the tests hold the kernels to.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from numba import prange

from edgert.quant.kernels import _fma32 as fma32
from edgert.quant.kernels import _round_f16 as _round_half
from edgert.quant.kernels import _u64_as_f64

# ---- ggml's float arithmetic ------------------------------------------------------------
# llama.cpp's CPU kernels fix an order for every float sum and fuse products into FMAs where
# its compiler contracts them. edgert repeats that order exactly, so that its activations
# equal llama.cpp's bit for bit and greedy decoding does not part from it on a rounding.


_F0, _F1 = np.float32(0.0), np.float32(1.0)
_SHIFT = np.float32(float.fromhex("0x1.8p23"))  # adding it rounds to an integer
_LOG2E = np.float32(float.fromhex("0x1.715476p+0"))
_LN2_HI, _LN2_LO = np.float32(float.fromhex("0x1.62e4p-1")), np.float32(float.fromhex("0x1.7f7d1cp-20"))
_E1, _E2, _E3, _E4, _E5 = (
    np.float32(float.fromhex(h))
    for h in ("0x1.ffffecp-1", "0x1.fffdb6p-2", "0x1.555e66p-3", "0x1.573e2ep-5", "0x1.0e4020p-7")
)


@nb.njit(inline="always")
def expf_ggml(x):
    """exp(x) in float32 by ggml's AVX512 `ggml_v_expf` (Arm's optimized-routines method):
    x = n ln2 + b with n an integer, a degree-5 polynomial in b, scaled by 2^n; 0 or inf past
    |n| > 192. Within 1.5 ulp of exp, and what llama.cpp's softmax and SiLU use on x86."""
    n = fma32(x, _LOG2E, _SHIFT) - _SHIFT
    b = fma32(-n, _LN2_LO, fma32(-n, _LN2_HI, x))
    u = b * b
    j = fma32(fma32(fma32(_E5, b, _E4), u, fma32(_E3, b, _E2)), u, fma32(_E1, b, _F1))
    # j * 2^n with one rounding (AVX-512 scalef): exact in float64, whose 2^n is built from bits;
    # branch-free (selects only), so that loops over it vectorize
    big = abs(n) > np.float32(192.0)
    c = np.float32(192.0) if n > np.float32(192.0) else n
    c = np.float32(-192.0) if c < np.float32(-192.0) else c
    e = np.int64(c) + 1023
    r = np.float32(np.float64(j) * _u64_as_f64(e << 52))
    return (_F0 if n <= _F0 else np.float32(np.inf)) if big else r


@nb.njit(inline="always")
def sum16(a, o, step):
    """a[o] + ... + a[o + 15 step] in the tree of GCC's `_mm512_reduce_add_ps`: halves, then
    quarters, then (0 + 2) + (1 + 3)."""
    t0 = a[o + 0 * step] + a[o + 8 * step]
    t1 = a[o + 1 * step] + a[o + 9 * step]
    t2 = a[o + 2 * step] + a[o + 10 * step]
    t3 = a[o + 3 * step] + a[o + 11 * step]
    t4 = a[o + 4 * step] + a[o + 12 * step]
    t5 = a[o + 5 * step] + a[o + 13 * step]
    t6 = a[o + 6 * step] + a[o + 14 * step]
    t7 = a[o + 7 * step] + a[o + 15 * step]
    u0, u1, u2, u3 = t0 + t4, t1 + t5, t2 + t6, t3 + t7
    return (u0 + u2) + (u1 + u3)


@nb.njit(inline="always")
def sum64(a, tmp):
    """ggml_vec_dot_f16's reduction of its 4 x 16 lanes a[0:64]: lane by lane (0 + 2) + (1 + 3)
    (GGML_F32x16_REDUCE), then `sum16`. tmp: 16 floats of scratch, which may be a itself."""
    for i in range(16):
        tmp[i] = (a[i] + a[32 + i]) + (a[16 + i] + a[48 + i])
    return sum16(tmp, 0, 1)


@nb.njit(cache=True, fastmath=False)
def rmsnorm(out, x, w, eps):
    """out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, for each row r of a 2-D x.

    Rounded as ggml rounds it: squares summed in float64, the mean, its root and the scale
    in float32, then x * scale and that times w, each rounded to float32.
    """
    rows, n = x.shape
    eps32 = np.float32(eps)
    for r in range(rows):
        ss = 0.0
        for i in range(n):
            ss += np.float32(x[r, i] * x[r, i])
        mean = np.float32(ss / n)
        scale = np.float32(1.0) / np.float32(math.sqrt(np.float32(mean + eps32)))
        for i in range(n):
            out[r, i] = np.float32(x[r, i] * scale) * w[i]


@nb.njit(cache=True)
def rope_table(cos, sin, base, n_rot, freq_factors, freq_scale):
    """cos/sin[p, i] of the angle p * freq_scale * base^(-2i/n_rot) / freq_factors[i], i < n_rot/2.

    Computed as ggml does, in float32 with the angle advanced by repeated multiplication,
    so that rotated q/k (which are then rounded to fp16) match llama.cpp bit for bit.
    """
    half = n_rot // 2
    theta_scale = np.float32(np.float32(base) ** np.float32(-2.0 / n_rot))
    fs = np.float32(freq_scale)
    for p in range(cos.shape[0]):
        theta = np.float32(p)
        for i in range(half):
            a = fs * (theta / np.float32(freq_factors[i]))
            cos[p, i] = np.cos(a)
            sin[p, i] = np.sin(a)
            theta = np.float32(theta * theta_scale)


@nb.njit(cache=True)
def rope(x, cos, sin, pos0, neox):
    """Rotate x[T, H, D] in place for positions pos0..pos0+T-1 over the first n_rot dims.

    neox=True pairs dim i with i + n_rot/2 (HF rotate_half); False pairs 2i with 2i+1
    (GGUF llama, whose q/k rows llama.cpp's converter permuted to that layout).
    """
    T, H, _ = x.shape
    half = cos.shape[1]
    for t in range(T):
        p = pos0 + t
        for h in range(H):
            for i in range(half):
                c, s = cos[p, i], sin[p, i]
                j0, j1 = (i, i + half) if neox else (2 * i, 2 * i + 1)
                a, b = x[t, h, j0], x[t, h, j1]
                x[t, h, j0] = fma32(a, c, -(b * s))  # as ggml's rotate_pairs compiles: one FMA each
                x[t, h, j1] = fma32(a, s, b * c)


@nb.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def attention(out, q, k, v, pos0, scale, window, softcap):
    """Causal attention of q[T, Hq, D] over the cache k, v [Hkv, S, D] for positions pos0...

    Query t sits at position pos0 + t and sees cache positions max(0, p - window + 1)..p
    (window <= 0: all). Grouped-query: head h reads kv head h // (Hq / Hkv). One pass of
    online softmax per (t, h), accumulating straight into out, so no score buffer exists.
    """
    T, Hq, D = q.shape
    group = Hq // k.shape[0]
    for th in prange(T * Hq):
        t, h = th // Hq, th % Hq
        kv = h // group
        p = pos0 + t
        lo = 0 if window <= 0 else max(0, p - window + 1)
        m = -np.inf
        l = 0.0
        o = out[t, h]
        for d in range(D):
            o[d] = 0.0
        for j in range(lo, p + 1):
            s = 0.0
            for d in range(D):
                s += q[t, h, d] * k[kv, j, d]
            s *= scale
            if softcap > 0.0:
                s = softcap * math.tanh(s / softcap)
            if s > m:
                c = math.exp(m - s)
                l *= c
                for d in range(D):
                    o[d] *= c
                m = s
            w = math.exp(s - m)
            l += w
            for d in range(D):
                o[d] += w * v[kv, j, d]
        inv = 1.0 / l
        for d in range(D):
            o[d] *= inv


# fp16 bits -> float32, as ggml's ggml_table_f32_f16: a 256 KiB table beats bit twiddling.
F16_TABLE = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)


@nb.njit(inline="always")
def _sees(p, j, window):
    """Whether the query at position p attends to cache position j (causal, optional window)."""
    return j <= p and (window <= 0 or j > p - window)


# ---- split-K: one decoding step's positions spread over the threads -----------------------

CHUNKS = 8  # at most this many position chunks per (kv head, token block)
SPLIT_TOKENS = 4  # positions are split only for at most this many query tokens (decoding)
MIN_CHUNK = 256  # and only into chunks of at least this many positions


class AttentionScratch:
    """Buffers of split-K attention (`attention_f16`, `kv_kernels.attention_q`), allocated once
    per model (`Workspace`) for n_heads query heads: per-chunk partial outputs and softmax
    statistics, and each work item's row buffers; and `attention_f16_ggml`'s per-thread lanes."""

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int):
        b = self._buffers(n_heads, n_kv_heads, head_dim)
        self.part = np.zeros(*b["part"])  # per chunk: unnormalized outputs
        self.stats = np.zeros(*b["stats"])
        self.rows = np.zeros(*b["rows"])
        self.lanes = np.zeros(*b["lanes"])  # attention_f16: per thread

    @staticmethod
    def _buffers(n_heads: int, n_kv_heads: int, head_dim: int) -> dict:
        return {
            "part": ((CHUNKS, SPLIT_TOKENS, n_heads, head_dim), np.float32),
            "stats": ((CHUNKS, SPLIT_TOKENS, n_heads, 2), np.float64),  # sum, max
            "rows": ((max(8, n_kv_heads) * CHUNKS, 3, head_dim), np.float32),  # per work item
            "lanes": ((nb.config.NUMBA_NUM_THREADS, 66, max(64, head_dim)), np.float32),  # attention_f16_ggml
        }

    @classmethod
    def nbytes(cls, n_heads: int, n_kv_heads: int, head_dim: int) -> int:
        """The buffers' bytes, without allocating them (the memory plan)."""
        bufs = cls._buffers(n_heads, n_kv_heads, head_dim).values()
        return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in bufs)


@nb.njit(inline="always")
def split_count(T, items, pos0, window, part, rows, threads):
    """Into how many chunks to split the positions of each of `items` (kv head, token block)
    work items: enough for ~4 items per thread, when the tokens are few (part holds them)
    and each chunk keeps MIN_CHUNK positions; else 1."""
    if T > part.shape[1]:
        return 1
    span = pos0 + T if window <= 0 else min(pos0 + T, window + T - 1)
    want = (4 * threads + items - 1) // items
    return max(1, min(part.shape[0], want, span // MIN_CHUNK, rows.shape[0] // items))


@nb.njit(inline="always")
def chunk_range(pos0, t0, t1, window, n_chunks, c):
    """Chunk c of the positions that query tokens t0..t1-1 see, cut at whole groups of 64."""
    lo = 0 if window <= 0 else max(0, pos0 + t0 - window + 1)
    hi = pos0 + t1 if t0 < t1 else lo
    step = ((hi - lo + n_chunks - 1) // n_chunks + 63) // 64 * 64
    c0 = min(hi, lo + c * step)
    return c0, min(hi, c0 + step)


@nb.njit(inline="always")
def work_item(item, n_blocks, n_chunks, per, T, pos0, window):
    """Work item `item` of (kv head, token block, position chunk) as kv, c, t0, t1, c0, c1:
    its KV head, chunk index, query tokens t0..t1-1 and cache positions c0..c1-1."""
    kv, rest = item // (n_blocks * n_chunks), item % (n_blocks * n_chunks)
    b, c = rest // n_chunks, rest % n_chunks
    t0, t1 = b * per, min(T, (b + 1) * per)
    c0, c1 = chunk_range(pos0, t0, t1, window, n_chunks, c)
    return kv, c, t0, t1, c0, c1


@nb.njit(inline="always")
def row_max(s, lo, hi):
    m = np.float32(-np.inf)
    for j in range(lo, hi):
        m = max(m, s[j])
    return m


@nb.njit(inline="always")
def visible(p, window, c0, c1):
    """The positions of chunk c0..c1 that the query at position p sees."""
    lo = c0 if window <= 0 else max(c0, p - window + 1)
    return lo, min(c1, p + 1)


# reassoc lets LLVM split the dot products into SIMD partial sums, as ggml's own f16 dot does.
@nb.njit(inline="always")
def _score_key(scores, q, row, j, t0, t1, pos0, kv, group, window, scale, softcap):
    """Scores of key j (decoded into `row`) for the query heads of KV head kv, tokens t0..t1."""
    Hq, D = q.shape[1], q.shape[2]
    for t in range(t0, t1):
        if not _sees(pos0 + t, j, window):
            continue
        for h in range(kv * group, (kv + 1) * group):
            acc = np.float32(0.0)
            for d in range(D):
                acc += q[t, h, d] * row[d]
            x = acc * np.float32(scale)
            if softcap > 0.0:
                x = np.float32(softcap * math.tanh(x / softcap))
            scores[t * Hq + h, j] = x


@nb.njit(inline="always")
def _add_value(out, scores, row, j, t0, t1, pos0, kv, group, window):
    """out += probability * value j (decoded into `row`) for the same heads and tokens."""
    Hq, D = out.shape[1], out.shape[2]
    for t in range(t0, t1):
        if not _sees(pos0 + t, j, window):
            continue
        for h in range(kv * group, (kv + 1) * group):
            w = scores[t * Hq + h, j]
            o = out[t, h]
            for d in range(D):
                o[d] += w * row[d]


@nb.njit(inline="always")
def _f16_keys(scores, q, k, row, kv, c0, c1, t0, t1, pos0, group, window, scale, softcap, table):
    for j in range(c0, c1):
        for d in range(row.shape[0]):
            row[d] = table[k[kv, j, d]]
        _score_key(scores, q, row, j, t0, t1, pos0, kv, group, window, scale, softcap)


@nb.njit(inline="always")
def _f16_values(out, scores, v, row, kv, c0, c1, t0, t1, pos0, group, window, table):
    for j in range(c0, c1):
        for d in range(row.shape[0]):
            row[d] = table[v[kv, j, d]]
        _add_value(out, scores, row, j, t0, t1, pos0, kv, group, window)


@nb.njit(inline="always")
def _exps_f16(s, lo, hi, m):
    """s[lo:hi] <- exp(s - m) (the C library's exp, not ggml's); their sum, in float64 as ggml's."""
    total = 0.0
    for j in range(lo, hi):
        e = np.float32(math.exp(np.float32(s[j] - m)))
        s[j] = e
        total += e
    return total


@nb.njit(inline="always")
def _round_q(q, t0, t1, h0, h1):
    for t in range(t0, t1):  # q is scratch after RoPE: round it to fp16 in place, once
        for h in range(h0, h1):
            for d in range(q.shape[2]):
                q[t, h, d] = _round_half(q[t, h, d])


@nb.njit(cache=True, nogil=True, parallel=True, fastmath={"reassoc", "nsz", "contract"})
def attention_f16(out, q, k, v, pos0, scale, window, softcap, scores, table, part, stats, rows, threads):
    """attention() over an fp16 cache (k, v: uint16 bits [Hkv, S, D]), with ggml's arithmetic.

    llama.cpp without flash attention computes softmax(K . fp16(q) * scale) and multiplies
    the probabilities, rounded to fp16, by V; each product is summed in float32. Doing the
    same rounding here keeps edgert's logits within float noise of llama.cpp's.

    Work items are (kv head, block of query tokens): each K or V row is converted from fp16
    once per item and reused by every query head of the group and every token of the block,
    so the inner loops are contiguous float32 dots and axpys. A decoding step (few tokens) whose
    items do not divide evenly among the threads also splits the positions into chunks
    (split-K; `split_count`), in three passes so that
    the probabilities are still normalized over the whole context before their fp16 rounding:
    scores and each chunk's maximum; exps and each chunk's sum; rounded probabilities times
    V into per-chunk partial outputs, summed at the end.
    scores: float32 scratch [>= T * Hq, S]; part, stats, rows: an `AttentionScratch`'s;
    threads: numba's thread count.
    """
    T, Hq, D = q.shape
    Hkv = k.shape[0]
    group = Hq // Hkv
    n_blocks = min(T, max(1, 8 // Hkv))  # enough items to keep the threads busy
    per = (T + n_blocks - 1) // n_blocks
    n_chunks = 1  # three passes cost more than they win where the items already balance
    if threads > 0 and (Hkv * n_blocks) % threads:  # (on 2 threads: 1.9x for 1 KV head, 1.1x for 3)
        n_chunks = split_count(T, Hkv * n_blocks, pos0, window, part, rows, threads)
    if n_chunks > 1:
        _round_q(q, 0, T, 0, Hq)
    for item in prange(Hkv * n_blocks * n_chunks):
        kv, c, t0, t1, c0, c1 = work_item(item, n_blocks, n_chunks, per, T, pos0, window)
        row = rows[item, 0]
        if n_chunks == 1:
            _round_q(q, t0, t1, kv * group, (kv + 1) * group)
        _f16_keys(scores, q, k, row, kv, c0, c1, t0, t1, pos0, group, window, scale, softcap, table)
        for t in range(t0, t1):
            lo, hi = visible(pos0 + t, window, c0, c1)
            for h in range(kv * group, (kv + 1) * group):
                s = scores[t * Hq + h]
                m = row_max(s, lo, hi)
                if n_chunks > 1:
                    stats[c, t, h, 1] = m
                    continue
                inv = np.float32(1.0 / _exps_f16(s, lo, hi, m))
                for j in range(lo, hi):
                    s[j] = _round_half(s[j] * inv)
                o = out[t, h]
                for d in range(D):
                    o[d] = 0.0
        if n_chunks == 1:
            _f16_values(out, scores, v, row, kv, c0, c1, t0, t1, pos0, group, window, table)
    if n_chunks == 1:
        return
    for t in range(T):  # the overall maximum, into chunk 0's slot
        for h in range(Hq):
            for c in range(1, n_chunks):
                stats[0, t, h, 1] = max(stats[0, t, h, 1], stats[c, t, h, 1])
    for item in prange(Hkv * n_blocks * n_chunks):
        kv, c, t0, t1, c0, c1 = work_item(item, n_blocks, n_chunks, per, T, pos0, window)
        for t in range(t0, t1):
            lo, hi = visible(pos0 + t, window, c0, c1)
            for h in range(kv * group, (kv + 1) * group):
                stats[c, t, h, 0] = _exps_f16(scores[t * Hq + h], lo, hi, stats[0, t, h, 1])
    for t in range(T):  # 1 / the overall sum, into chunk 0's slot
        for h in range(Hq):
            total = 0.0
            for c in range(n_chunks):
                total += stats[c, t, h, 0]
            stats[0, t, h, 0] = np.float32(1.0 / total)
    for item in prange(Hkv * n_blocks * n_chunks):
        kv, c, t0, t1, c0, c1 = work_item(item, n_blocks, n_chunks, per, T, pos0, window)
        dst = part[c]
        for t in range(t0, t1):
            lo, hi = visible(pos0 + t, window, c0, c1)
            for h in range(kv * group, (kv + 1) * group):
                s, inv = scores[t * Hq + h], np.float32(stats[0, t, h, 0])
                for j in range(lo, hi):
                    s[j] = _round_half(s[j] * inv)
                for d in range(D):
                    dst[t, h, d] = 0.0
        _f16_values(dst, scores, v, rows[item, 0], kv, c0, c1, t0, t1, pos0, group, window, table)
    for t in range(T):
        for h in range(Hq):
            o = out[t, h]
            for d in range(D):
                o[d] = part[0, t, h, d]
            for c in range(1, n_chunks):
                for d in range(D):
                    o[d] += part[c, t, h, d]


@nb.njit(inline="always")
def _f16_score(krow, qr, L, D, table, batched):
    """fp16 key . fp16 query, summed as ggml's mul_mat does: for a batch, tinyBLAS's 16 lanes
    over the head dimension (one FMA chain each, then `sum16`); for one token, ggml_vec_dot_f16's
    4 x 16 lanes over blocks of 64 (pairs added 0+2, 1+3, then together), the rest in float64."""
    if batched:
        for i in range(16):
            L[i] = _F0
        for d0 in range(0, D, 16):
            for i in range(16):
                L[i] = fma32(table[krow[d0 + i]], qr[d0 + i], L[i])
        return sum16(L, 0, 1)
    for i in range(64):
        L[i] = _F0
    dm = D - D % 64
    for d0 in range(0, dm, 64):
        for i in range(64):
            L[i] = fma32(table[krow[d0 + i]], qr[d0 + i], L[i])
    total = np.float64(sum64(L, L))
    for d in range(dm, D):
        total += np.float64(table[krow[d]] * qr[d])
    return np.float32(total)


@nb.njit(cache=True, nogil=True, parallel=True)
def attention_f16_ggml(out, q, k, v, pos0, scale, window, softcap, scores, table, lanes, batch):
    """`attention_f16` bit for bit as llama.cpp computes it without flash attention on x86
    (AVX512), for llama.cpp parity; slower, as its work items do not share decoded rows:

    - scores: K . fp16(q), summed in `_f16_score`'s order, times scale;
    - softmax: exps by `expf_ggml` of (score - max); their sum, 16 cache slots at a time
      (`sum16`, slots counted from 0), added up in float64; probabilities exp * float32(1 / sum),
      rounded to fp16;
    - output: fp16 V . probabilities over the cache slots, for a batch in 16 lanes (slot % 16),
      for one token in 64 (slot % 64, reduced as `_f16_score` reduces), each an FMA chain.

    A batch takes tinyBLAS's orders, which llama.cpp uses for more than one query token, one
    token ggml_vec_dot_f16's: `batch` is the size of the batch llama.cpp would evaluate (T, or
    more when a prompt is fed in chunks). Work items are (token, query head), spread over the
    threads; each thread keeps its fp16 query, its lanes and its output accumulators in
    lanes[thread] ([66, max(D, 64)] float32). scores: float32 scratch [>= T * Hq, S].
    """
    T, Hq, D = q.shape
    group = Hq // k.shape[0]
    batched = batch > 1 and D % 16 == 0
    width = 16 if batched else 64
    for item in prange(T * Hq):
        t, h = item // Hq, item % Hq
        kv = h // group
        p = pos0 + t
        lo = 0 if window <= 0 else max(0, p - window + 1)
        hi = p + 1
        buf = lanes[nb.get_thread_id()]
        qr, L, acc = buf[64], buf[65], buf[:width]
        for d in range(D):
            qr[d] = _round_half(q[t, h, d])
        s = scores[item]
        m = np.float32(-np.inf)
        for j in range(lo, hi):
            x = _f16_score(k[kv, j], qr, L, D, table, batched) * np.float32(scale)
            if softcap > 0.0:
                x = np.float32(softcap * math.tanh(x / softcap))
            s[j] = x
            m = max(m, x)
        for j in range(lo, hi):
            s[j] = expf_ggml(s[j] - m)
        total = 0.0
        for g in range(lo - lo % 16, hi, 16):  # the slots outside lo..hi hold exp(-inf) = 0
            for i in range(16):
                L[i] = s[g + i] if lo <= g + i < hi else _F0
            total += np.float64(sum16(L, 0, 1))
        inv = np.float32(1.0 / total)
        for j in range(lo, hi):
            s[j] = _round_half(s[j] * inv)
        for i in range(width):
            for d in range(D):
                acc[i, d] = _F0
        for j in range(lo, hi):
            a, w, vrow = acc[j % width], s[j], v[kv, j]
            for d in range(D):
                a[d] = fma32(table[vrow[d]], w, a[d])
        o = out[t, h]
        if batched:
            for d in range(D):
                o[d] = sum16(acc[:, d], 0, 1)
        else:
            for d in range(D):
                o[d] = sum64(acc[:, d], L)


@nb.njit(inline="always")
def silu_ggml(x, vector):
    """x * sigmoid(x) as ggml's swiglu computes it: x / (1 + exp(-x)), with ggml_v_expf in its
    16-wide loop (`vector`) and the C library's expf for the last n % 16 values."""
    if vector:
        return x / (_F1 + expf_ggml(_F0 - x))
    return x / (_F1 + np.float32(math.exp(-x)))


# gelu_mul runs on one thread: for one token, a few thousand tanhs cost less than waking others.
@nb.njit(cache=True, fastmath=True)
def gelu_mul(gate, up):
    """gate <- gelu_tanh(gate) * up, in place (GeGLU, gemma)."""
    T, n = gate.shape
    for t in range(T):
        for i in range(n):
            g = gate[t, i]
            gate[t, i] = (
                0.5 * g * (1.0 + math.tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))) * up[t, i]
            )


@nb.njit(cache=True, nogil=True, parallel=True)
def _silu_mul_rows(gate, up):
    nv = gate.shape[1] - gate.shape[1] % 16
    for t in prange(gate.shape[0]):
        for i in range(nv):
            gate[t, i] = silu_ggml(gate[t, i], True) * up[t, i]
        for i in range(nv, gate.shape[1]):
            gate[t, i] = silu_ggml(gate[t, i], False) * up[t, i]


@nb.njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _gelu_mul_rows(gate, up):
    for t in prange(gate.shape[0]):
        for i in range(gate.shape[1]):
            g = gate[t, i]
            gate[t, i] = (
                0.5 * g * (1.0 + math.tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))) * up[t, i]
            )


_GELU_A, _SQRT_2_OVER_PI, _HALF = np.float32(0.044715), np.float32(0.7978845608028654), np.float32(0.5)


@nb.njit(inline="always")
def gelu_ggml(x):
    """ggml's GELU as its fp16 table holds it (ggml_table_gelu_f16): the tanh formula in float32,
    with GCC's one FMA, on fp16(x), rounded to fp16; 0 below -10 and x above 10."""
    h = _round_half(x)
    inner = fma32(_GELU_A * h, h, _F1)
    t = np.float32(math.tanh(_SQRT_2_OVER_PI * h * inner))
    return _round_half(_HALF * h * (_F1 + t))


@nb.njit(cache=True, nogil=True, parallel=True)
def geglu_ggml(gate, up):
    """gate <- gelu(gate) * up exactly as ggml_vec_geglu_f32 computes it (llama.cpp parity)."""
    for t in prange(gate.shape[0]):
        for i in range(gate.shape[1]):
            g = gate[t, i]
            if g <= np.float32(-10.0):
                gate[t, i] = _F0
            elif g >= np.float32(10.0):
                gate[t, i] = g * up[t, i]
            else:
                gate[t, i] = gelu_ggml(g) * up[t, i]


def swiglu(gate, up):
    """gate <- silu(gate) * up: a row per thread. (One token's row runs on one thread either way;
    the parallel kernel's loop vectorizes better: 7 against 17 us for 4864 values.)"""
    _silu_mul_rows(gate, up)


def geglu(gate, up):
    """gate <- gelu_tanh(gate) * up, as swiglu."""
    (gelu_mul if gate.shape[0] == 1 else _gelu_mul_rows)(gate, up)


# ---- numpy references ------------------------------------------------------------------


def rmsnorm_ref(x, w, eps):
    x = x.astype(np.float64)
    return (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w).astype(np.float32)


def rope_ref(x, pos0, base, n_rot, neox):
    T, H, D = x.shape
    half = n_rot // 2
    theta = base ** (-2.0 * np.arange(half) / n_rot)
    ang = (pos0 + np.arange(T))[:, None] * theta[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    y = x.astype(np.float64).copy()
    if neox:
        a, b = y[..., :half].copy(), y[..., half:n_rot].copy()
        y[..., :half], y[..., half:n_rot] = a * c - b * s, a * s + b * c
    else:
        a, b = y[..., 0:n_rot:2].copy(), y[..., 1:n_rot:2].copy()
        y[..., 0:n_rot:2], y[..., 1:n_rot:2] = a * c - b * s, a * s + b * c
    return y.astype(np.float32)


def attention_ref(q, k, v, pos0, scale, window, softcap):
    T, Hq, D = q.shape
    group = Hq // k.shape[0]
    out = np.zeros_like(q)
    for t in range(T):
        p = pos0 + t
        lo = 0 if window <= 0 else max(0, p - window + 1)
        for h in range(Hq):
            kv = h // group
            s = (k[kv, lo : p + 1].astype(np.float64) @ q[t, h].astype(np.float64)) * scale
            if softcap > 0:
                s = softcap * np.tanh(s / softcap)
            w = np.exp(s - s.max())
            out[t, h] = (w / w.sum()) @ v[kv, lo : p + 1]
    return out


# ---- numpy twins of ggml's float order (the kernels above must equal them bit for bit) -------


def fma32_ref(a, b, c):
    """float32 a * b + c through float64: the product is exact there, the sum rounds twice,
    which differs from one FMA rounding in about 2^-29 of random cases."""
    f64 = np.float64
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf in the tests' edge cases: nan, as FMA
        return (np.asarray(a, f64) * np.asarray(b, f64) + np.asarray(c, f64)).astype(np.float32)


def expf_ggml_ref(x):
    x = np.asarray(x, np.float32)
    n = (fma32_ref(x, _LOG2E, _SHIFT) - _SHIFT).astype(np.float32)
    b = fma32_ref(-n, _LN2_LO, fma32_ref(-n, _LN2_HI, x))
    u = (b * b).astype(np.float32)
    j = fma32_ref(fma32_ref(fma32_ref(_E5, b, _E4), u, fma32_ref(_E3, b, _E2)), u, fma32_ref(_E1, b, _F1))
    with np.errstate(over="ignore", invalid="ignore"):
        res = np.ldexp(j.astype(np.float64), np.clip(n, -200, 200).astype(np.int64)).astype(np.float32)
    return np.where(np.abs(n) > 192, np.where(n <= 0, _F0, np.float32(np.inf)), res).astype(np.float32)


def sum16_ref(a):
    """GCC's _mm512_reduce_add_ps over the last axis (16)."""
    t = (a[..., :8] + a[..., 8:]).astype(np.float32)
    u = (t[..., :4] + t[..., 4:]).astype(np.float32)
    return ((u[..., 0] + u[..., 2]) + (u[..., 1] + u[..., 3])).astype(np.float32)


def sum64_ref(a):
    """`sum64` over the last axis (64)."""
    return sum16_ref(((a[..., :16] + a[..., 32:48]) + (a[..., 16:32] + a[..., 48:])).astype(np.float32))


def rmsnorm_ggml_ref(x, w, eps):
    ss = np.array([sum(float(v) for v in (r * r).astype(np.float32)) for r in x])  # float64, in order
    mean = (ss / x.shape[1]).astype(np.float32)
    scale = (np.float32(1) / np.sqrt((mean + np.float32(eps)).astype(np.float32))).astype(np.float32)
    return ((x * scale[:, None]).astype(np.float32) * w).astype(np.float32)


def rope_ggml_ref(x, cos, sin, pos0, neox):
    T, H, _ = x.shape
    half = cos.shape[1]
    y = x.copy()
    c, s = cos[pos0 : pos0 + T, None, :], sin[pos0 : pos0 + T, None, :]
    i0, i1 = (
        (np.arange(half), np.arange(half) + half)
        if neox
        else (np.arange(0, 2 * half, 2), np.arange(1, 2 * half, 2))
    )
    a, b = x[..., i0], x[..., i1]
    y[..., i0] = fma32_ref(a, c, -(b * s).astype(np.float32))
    y[..., i1] = fma32_ref(a, s, (b * c).astype(np.float32))
    return y


def silu_mul_ggml_ref(g, u):
    nv = g.shape[-1] - g.shape[-1] % 16
    e = np.concatenate(
        [expf_ggml_ref(-g[..., :nv]), np.exp(-g[..., nv:].astype(np.float64)).astype(np.float32)], -1
    )
    return ((g / (np.float32(1) + e)).astype(np.float32) * u).astype(np.float32)


def attention_f16_ggml_ref(q, k16, v16, pos0, scale, window, batch=None):
    """llama.cpp's non-flash attention over an fp16 cache, in its float order (see attention_f16_ggml)."""
    T, Hq, D = q.shape
    group = Hq // k16.shape[0]
    batched = (T if batch is None else batch) > 1 and D % 16 == 0
    q16 = q.astype(np.float16).astype(np.float32)
    out = np.zeros_like(q)
    for t in range(T):
        p = pos0 + t
        lo = 0 if window <= 0 else max(0, p - window + 1)
        n = -(-(p + 1) // 64) * 64  # cache slots 0..n: zero probability past the visible ones
        for h in range(Hq):
            kk = k16[h // group, lo : p + 1].astype(np.float32)
            if batched:  # 16 lanes over the head dimension
                acc = np.zeros((len(kk), 16), np.float32)
                for d0 in range(0, D, 16):
                    acc = fma32_ref(kk[:, d0 : d0 + 16], q16[t, h, d0 : d0 + 16], acc)
                sc = sum16_ref(acc)
            else:  # 4 x 16 lanes over blocks of 64, the rest in float64
                dm = D - D % 64
                acc = np.zeros((len(kk), 64), np.float32)
                for d0 in range(0, dm, 64):
                    acc = fma32_ref(kk[:, d0 : d0 + 64], q16[t, h, d0 : d0 + 64], acc)
                tail = (kk[:, dm:] * q16[t, h, dm:]).astype(np.float64)
                sc = sum64_ref(acc).astype(np.float64)
                for d in range(dm, D):
                    sc = sc + tail[:, d - dm]
                sc = sc.astype(np.float32)
            sc = (sc * np.float32(scale)).astype(np.float32)
            e = np.zeros(n, np.float32)
            e[lo : p + 1] = expf_ggml_ref((sc - sc.max()).astype(np.float32))
            total = 0.0
            for g in sum16_ref(e.reshape(-1, 16)):
                total += float(g)
            pr = (e * np.float32(1.0 / total)).astype(np.float16).astype(np.float32)
            vv = np.zeros((n, D), np.float32)
            vv[lo : p + 1] = v16[h // group, lo : p + 1].astype(np.float32)
            width = 16 if batched else 64
            acc = np.zeros((width, D), np.float32)
            for j0 in range(0, n, width):
                acc = fma32_ref(vv[j0 : j0 + width], pr[j0 : j0 + width, None], acc)
            if batched:
                out[t, h] = sum16_ref(acc.T)
            else:
                out[t, h] = sum64_ref(acc.T)
    return out


def geglu_ggml_ref(g, u):
    """ggml_vec_geglu_f32 with its fp16 GELU table: fp16(gelu(fp16(x))) * up, 0 / x past +-10."""
    h = g.astype(np.float16).astype(np.float32)
    inner = fma32_ref((_GELU_A * h).astype(np.float32), h, _F1)
    t = np.tanh((_SQRT_2_OVER_PI * h * inner).astype(np.float32).astype(np.float64)).astype(np.float32)
    gelu = ((_HALF * h).astype(np.float32) * (_F1 + t)).astype(np.float16).astype(np.float32)
    y = (gelu * u).astype(np.float32)
    y = np.where(g >= 10, (g * u).astype(np.float32), y)
    return np.where(g <= -10, _F0, y).astype(np.float32)
