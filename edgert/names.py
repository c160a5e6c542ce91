"""The one table from Hugging Face safetensors names to edgert's internal (GGUF) tensor names.

Internal names are GGUF names, so a GGUF file loads 1:1 and an HF checkpoint goes through
`gguf_name`. The table only renames; it never changes data. What a tensor needs besides its
new name is applied by the loader / `edgert.convert`, and is listed here so it lives in one place:

* llama / mistral / mixtral (GGUF arch ``llama``): ``attn_q`` and ``attn_k`` (weight and bias)
  are permuted from HF's rotate-half RoPE layout to GGUF's interleaved-pair layout
  (llama.cpp ``LlamaModel.permute``); see `edgert.convert.permute_rope`. qwen2, qwen3, qwen3moe
  and gemma3 use NeoX-style RoPE in llama.cpp and are stored unpermuted.
* gemma3: every ``*norm.weight`` (attn_norm, post_attention_norm, ffn_norm, post_ffw_norm,
  attn_q_norm, attn_k_norm, output_norm) is stored as ``w + 1`` in GGUF, because HF's
  Gemma3RMSNorm computes ``x * (1 + w)``. Internally edgert uses the GGUF convention (``x * w``).
* MoE experts: HF keeps one 2-D tensor per expert; edgert addresses them one by one as
  ``blk.{i}.ffn_{gate,up,down}.{e}.weight``. GGUF stores them stacked per layer as
  ``blk.{i}.ffn_{gate,up,down}_exps.weight`` with numpy shape [n_expert, rows, cols]
  (GGUF/ggml dims reversed: gate/up ``{n_embd, n_ff, n_expert}``, down ``{n_ff, n_embd, n_expert}``);
  `stacked_name` gives the stacked name of a per-expert one.
* Fused HF expert tensors (``mlp.experts.gate_up_proj`` [n_expert, 2*n_ff, n_embd] with gate rows
  first, ``mlp.experts.down_proj`` [n_expert, n_embd, n_ff], as transformers 5 holds them in memory)
  map to ``blk.{i}.ffn_gate_up_exps.weight`` / ``blk.{i}.ffn_down_exps.weight``; the gate/up
  pair must be split before use. transformers 5.23 still *saves* mixtral and qwen3_moe with one
  tensor per expert (``block_sparse_moe.experts.{e}.w1/w2/w3``, ``mlp.experts.{e}.*_proj``).
* Tied embeddings (``tie_word_embeddings``): there is no ``lm_head.weight``; ``output.weight`` is
  absent and the runtime uses ``token_embd.weight`` as the output head.
* Dropped: ``rotary_emb.inv_freq`` and attention mask buffers (`gguf_name` returns None).

HF ``post_attention_layernorm`` is ambiguous: it is the pre-FFN norm (``ffn_norm``) in llama,
qwen and mixtral, but the norm applied to the attention output (``post_attention_norm``) in
gemma2/3, whose pre-FFN norm is ``pre_feedforward_layernorm``. Pass ``arch`` for gemma models.
"""

from __future__ import annotations

import re

# (HF name pattern, internal name template). "{i}" is the layer, "{e}" the expert, "{p}" the
# parameter kind (weight / bias). Patterns are full matches; the optional prefixes cover text
# towers of multimodal checkpoints ("model.language_model.") and bare "LlamaModel" checkpoints.
_L = r"(?:model\.(?:language_model\.)?)?layers\.(?P<i>\d+)\."
_P = r"(?P<p>weight|bias)"

TABLE: list[tuple[str, str]] = [
    (r"(?:model\.(?:language_model\.)?)?embed_tokens\.weight", "token_embd.weight"),
    (r"(?:model\.(?:language_model\.)?)?norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    # attention
    (_L + r"input_layernorm\.weight", "blk.{i}.attn_norm.weight"),
    (_L + r"self_attn\.q_proj\." + _P, "blk.{i}.attn_q.{p}"),
    (_L + r"self_attn\.k_proj\." + _P, "blk.{i}.attn_k.{p}"),
    (_L + r"self_attn\.v_proj\." + _P, "blk.{i}.attn_v.{p}"),
    (_L + r"self_attn\.o_proj\." + _P, "blk.{i}.attn_output.{p}"),
    (_L + r"self_attn\.q_norm\.weight", "blk.{i}.attn_q_norm.weight"),  # qwen3, qwen3moe, gemma3
    (_L + r"self_attn\.k_norm\.weight", "blk.{i}.attn_k_norm.weight"),  # qwen3, qwen3moe, gemma3
    # norms around the FFN (post_attention_layernorm is arch-dependent, see gguf_name)
    (_L + r"post_attention_layernorm\.weight", "blk.{i}.ffn_norm.weight"),
    (_L + r"pre_feedforward_layernorm\.weight", "blk.{i}.ffn_norm.weight"),  # gemma2/3
    (_L + r"post_feedforward_layernorm\.weight", "blk.{i}.post_ffw_norm.weight"),  # gemma2/3
    # dense FFN
    (_L + r"mlp\.gate_proj\.weight", "blk.{i}.ffn_gate.weight"),
    (_L + r"mlp\.up_proj\.weight", "blk.{i}.ffn_up.weight"),
    (_L + r"mlp\.down_proj\.weight", "blk.{i}.ffn_down.weight"),
    # MoE router
    (_L + r"block_sparse_moe\.gate\.weight", "blk.{i}.ffn_gate_inp.weight"),  # mixtral
    (_L + r"mlp\.gate\.weight", "blk.{i}.ffn_gate_inp.weight"),  # qwen2moe, qwen3moe
    # MoE experts, one tensor per expert
    (_L + r"block_sparse_moe\.experts\.(?P<e>\d+)\.w1\.weight", "blk.{i}.ffn_gate.{e}.weight"),  # mixtral
    (_L + r"block_sparse_moe\.experts\.(?P<e>\d+)\.w2\.weight", "blk.{i}.ffn_down.{e}.weight"),  # mixtral
    (_L + r"block_sparse_moe\.experts\.(?P<e>\d+)\.w3\.weight", "blk.{i}.ffn_up.{e}.weight"),  # mixtral
    (_L + r"mlp\.experts\.(?P<e>\d+)\.gate_proj\.weight", "blk.{i}.ffn_gate.{e}.weight"),  # qwen3moe
    (_L + r"mlp\.experts\.(?P<e>\d+)\.up_proj\.weight", "blk.{i}.ffn_up.{e}.weight"),  # qwen3moe
    (_L + r"mlp\.experts\.(?P<e>\d+)\.down_proj\.weight", "blk.{i}.ffn_down.{e}.weight"),  # qwen3moe
    # MoE experts, fused 3-D (transformers 5 in-memory layout; split gate/up before use)
    (_L + r"mlp\.experts\.gate_up_proj(?:\.weight)?", "blk.{i}.ffn_gate_up_exps.weight"),
    (_L + r"mlp\.experts\.down_proj(?:\.weight)?", "blk.{i}.ffn_down_exps.weight"),
]

# HF names that carry no weights: RoPE caches and attention mask buffers.
DROP = re.compile(r".*(?:rotary_emb\.inv_freq|\.attention\.masked_bias|\.attention\.bias)")

# gemma2/3: post_attention_layernorm normalises the attention output before the residual add.
_GEMMA_OVERRIDE = (re.compile(_L + r"post_attention_layernorm\.weight"), "blk.{i}.post_attention_norm.weight")

_COMPILED = [(re.compile(pat), tmpl) for pat, tmpl in TABLE]

# Per-expert internal name -> name of the stacked 3-D GGUF tensor it belongs to.
_EXPERT = re.compile(r"blk\.(?P<i>\d+)\.ffn_(?P<kind>gate|up|down)\.(?P<e>\d+)\.weight")


def gguf_name(hf_name: str, arch: str | None = None) -> str | None:
    """Map an HF safetensors tensor name to its internal (GGUF) name.

    Args:
        hf_name: e.g. ``"model.layers.3.self_attn.q_proj.weight"``.
        arch: HF ``model_type`` or GGUF architecture; only needed to resolve
            ``post_attention_layernorm`` for gemma models (``"gemma3"``, ``"gemma3_text"``, ...).

    Returns:
        The internal name (``"blk.3.attn_q.weight"``), or None for a tensor that is dropped.

    Raises:
        KeyError: the name is not in the table (an unknown tensor is never silently dropped).
    """
    if DROP.fullmatch(hf_name):
        return None
    if arch is not None and arch.startswith("gemma"):
        m = _GEMMA_OVERRIDE[0].fullmatch(hf_name)
        if m:
            return _GEMMA_OVERRIDE[1].format(**m.groupdict())
    for pat, tmpl in _COMPILED:
        m = pat.fullmatch(hf_name)
        if m:
            return tmpl.format(**m.groupdict())
    raise KeyError(f"no GGUF name for HF tensor {hf_name!r}")


def stacked_name(name: str) -> tuple[str, int] | None:
    """``"blk.1.ffn_gate.3.weight"`` -> ``("blk.1.ffn_gate_exps.weight", 3)``; None if not per-expert."""
    m = _EXPERT.fullmatch(name)
    if m is None:
        return None
    return f"blk.{m['i']}.ffn_{m['kind']}_exps.weight", int(m["e"])
