"""llama: Llama 2/3, SmolLM2, Mistral; and Mixtral, which GGUF files call llama with experts."""

from __future__ import annotations

import numpy as np

from edgert import kernels as K
from edgert.models.base import (
    LayerWeights,
    Transformer,
    attention_block,
    embed,
    ffn_block,
    head,
    moe_block,
    norm,
)


class Model(Transformer):
    def load_norms(self, store, i):
        L = LayerWeights()
        L.attn_norm = norm(store, f"blk.{i}.attn_norm")
        L.ffn_norm = norm(store, f"blk.{i}.ffn_norm")
        return L

    def __call__(self, tokens: np.ndarray, cache, pos: int, all_logits: bool = False) -> np.ndarray:
        a, ws, T = self.args, self.ws, len(tokens)
        x = embed(ws, a, self.embed, tokens)  # (T, dim)
        for i, L in enumerate(self.layers):
            K.rmsnorm(ws.h[:T], x, L.attn_norm, a.norm_eps)
            x += self.comm.allreduce(attention_block(ws, a, self.attention(i), cache[i], pos, T, self.rope))
            K.rmsnorm(ws.h[:T], x, L.ffn_norm, a.norm_eps)
            x += self.comm.allreduce(
                moe_block(ws, a, self.ffn(i), T) if a.n_experts else ffn_block(ws, self.ffn(i), T)
            )
        return head(ws, a, self.out_norm, self.head(), T, all_logits)
