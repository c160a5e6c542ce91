"""The architecture registry: GGUF architecture strings and HF model_types -> model module.

qwen2, qwen3, qwen3moe, mistral and mixtral run llama's forward: what sets them apart
(q/k/v biases, per-head q/k norms, experts, RoPE pairing) is carried by the weights and
the config, not by code, so a copy of the file would only be a second place to fix bugs.
gemma3 has its own forward.
"""

from __future__ import annotations

from dataclasses import replace
from types import ModuleType

from edgert.errors import UnsupportedError
from edgert.models import base, gemma3, llama

# arch -> (module, args_from_gguf, args_from_hf)
_GGUF = {
    "llama": (llama, base.args_from_gguf),
    "qwen2": (llama, base.args_from_gguf),
    "qwen3": (llama, base.args_from_gguf),
    "qwen3moe": (llama, base.args_from_gguf),
    "gemma3": (gemma3, gemma3.args_from_gguf_gemma3),
}
_HF = {
    "llama": (llama, base.args_from_hf),
    "mistral": (llama, base.args_from_hf),
    "mixtral": (llama, base.args_from_hf),
    "qwen2": (llama, base.args_from_hf),
    "qwen3": (llama, base.args_from_hf),
    "qwen3_moe": (llama, base.args_from_hf),
    "gemma3": (gemma3, gemma3.args_from_hf_gemma3),
    "gemma3_text": (gemma3, gemma3.args_from_hf_gemma3),
}

ARCHITECTURES = sorted(set(_GGUF) | set(_HF))


def from_gguf(meta: dict, arch: str) -> tuple[ModuleType, base.ModelArgs]:
    if arch not in _GGUF:
        raise UnsupportedError(
            f"architecture {arch!r} is not supported; edgert runs {', '.join(sorted(_GGUF))}"
        )
    module, make = _GGUF[arch]
    return module, make(meta, arch)


def from_hf(cfg: dict) -> tuple[ModuleType, base.ModelArgs]:
    mt = cfg.get("model_type")
    if mt not in _HF:
        raise UnsupportedError(f"model_type {mt!r} is not supported; edgert runs {', '.join(sorted(_HF))}")
    module, make = _HF[mt]
    args = make(cfg, mt)
    if mt in ("qwen3_moe",):
        args = replace(args, arch="qwen3moe")
    return module, args


def module_for(arch: str) -> ModuleType:
    return gemma3 if arch.startswith("gemma3") else llama
