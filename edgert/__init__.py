"""edgert: run language models larger than the device.

import edgert
llm = edgert.load("smollm2-135m")
print(llm.generate("The capital of France is", max_tokens=16))
"""

from edgert.api import LLM, load
from edgert.errors import (
    BudgetError,
    CacheError,
    ClusterError,
    CompileError,
    ContextError,
    DownloadError,
    EdgertError,
    FormatError,
    ModelNotFoundError,
    OptionError,
    UnsupportedError,
)
from edgert.generate import GenerationResponse, Stats, generate, stream_generate
from edgert.sample import make_sampler

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "load",
    "generate",
    "stream_generate",
    "make_sampler",
    "GenerationResponse",
    "Stats",
    "EdgertError",
    "FormatError",
    "UnsupportedError",
    "ModelNotFoundError",
    "DownloadError",
    "ContextError",
    "BudgetError",
    "ClusterError",
    "OptionError",
    "CacheError",
    "CompileError",
]
