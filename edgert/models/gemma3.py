"""gemma3: sliding-window and global layers, q/k norms, post-norms, GeGLU, scaled embedding."""

from __future__ import annotations

import math

import numpy as np

from edgert import kernels as K
from edgert.models.base import (
    LayerWeights,
    Transformer,
    args_from_gguf,
    args_from_hf,
    attention_block,
    embed,
    ffn_block,
    head,
    norm,
    rope_tables,
)

SWA_PATTERN = 6  # llama.cpp's rule for gemma3 GGUF files: layer i slides iff i % 6 < 5


def args_from_gguf_gemma3(meta, arch):
    n = int(meta[f"{arch}.block_count"])
    dim = int(meta[f"{arch}.embedding_length"])
    a = args_from_gguf(meta, arch)
    return _finish(
        a,
        n,
        dim,
        int(meta.get(f"{arch}.attention.sliding_window", 0)),
        tuple(i % SWA_PATTERN < SWA_PATTERN - 1 for i in range(n)),
        10000.0,
        0.0,
    )


def args_from_hf_gemma3(cfg, arch):
    cfg = {**cfg, **cfg.get("text_config", {})}
    n = cfg["num_hidden_layers"]
    if "layer_types" in cfg:
        sliding = tuple(t == "sliding_attention" for t in cfg["layer_types"])
    else:
        p = cfg.get("sliding_window_pattern", SWA_PATTERN)
        sliding = tuple((i + 1) % p != 0 for i in range(n))
    rope = cfg.get("rope_parameters") or {}
    local = rope.get("sliding_attention", {}).get("rope_theta", cfg.get("rope_local_base_freq", 10000.0))
    if "full_attention" in rope:
        cfg = {**cfg, "rope_theta": rope["full_attention"].get("rope_theta", 1e6)}
    a = args_from_hf(cfg, arch, norm_shift=1.0)
    qpas = cfg.get("query_pre_attn_scalar") or a.head_dim
    return _finish(a, n, cfg["hidden_size"], cfg.get("sliding_window") or 0, sliding, local, qpas**-0.5)


def _finish(a, n, dim, window, sliding, local_base, attn_scale):
    from dataclasses import replace

    return replace(
        a,
        sliding_window=window,
        sliding_layers=sliding,
        rope_local_base=float(local_base),
        attn_scale=attn_scale,
        scale_q=True,
        embed_scale=math.sqrt(dim),
    )


class Model(Transformer):
    def __init__(self, args, store, context, **kw):
        super().__init__(args, store, context, **kw)
        self.rope_local = rope_tables(args, context, args.rope_local_base)

    def load_norms(self, store, i):
        s = self.args.norm_shift
        L = LayerWeights()
        L.attn_norm = norm(store, f"blk.{i}.attn_norm", s)
        L.post_attn_norm = norm(store, f"blk.{i}.post_attention_norm", s)
        L.ffn_norm = norm(store, f"blk.{i}.ffn_norm", s)
        L.post_ffw_norm = norm(store, f"blk.{i}.post_ffw_norm", s)
        return L

    def __call__(self, tokens: np.ndarray, cache, pos: int, all_logits: bool = False) -> np.ndarray:
        a, ws, T = self.args, self.ws, len(tokens)
        geglu = K.geglu_ggml if ws.scratch.ggml_order else K.geglu  # llama.cpp parity: its GELU table
        x = embed(ws, a, self.embed, tokens)  # (T, dim), scaled by sqrt(dim)
        for i, L in enumerate(self.layers):
            sliding = a.sliding_layers[i]
            rope, window = (self.rope_local, a.sliding_window) if sliding else (self.rope, 0)
            K.rmsnorm(ws.h[:T], x, L.attn_norm, a.norm_eps)
            y = self.comm.allreduce(attention_block(ws, a, self.attention(i), cache[i], pos, T, rope, window))
            K.rmsnorm(y, y, L.post_attn_norm, a.norm_eps)  # the post-norm needs the whole sum
            x += y
            K.rmsnorm(ws.h[:T], x, L.ffn_norm, a.norm_eps)
            y = self.comm.allreduce(ffn_block(ws, self.ffn(i), T, act=geglu))
            K.rmsnorm(y, y, L.post_ffw_norm, a.norm_eps)
            x += y
        return head(ws, a, self.out_norm, self.head(), T, all_logits)
