"""Shared fixtures. Real models are pulled into a cache (EDGERT_TEST_CACHE, default
~/.cache/edgert) by the same code as `edgert pull`, and their sha256 is checked once per
session. A model that cannot be fetched fails the test that needs it: none is skipped.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from edgert import hub

TINY = Path(__file__).parent / "fixtures" / "tiny"
GOLDEN = Path(__file__).parent / "golden"
TINY_ARCHS = ["llama", "qwen2", "qwen3", "gemma3", "mixtral", "qwen3_moe"]
REAL_MODELS = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]


def cache_dir() -> Path:
    return Path(os.environ.get("EDGERT_TEST_CACHE", hub.default_cache_dir()))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


_verified: dict[str, Path] = {}


@pytest.fixture(scope="session")
def real_model():
    """real_model(key) -> Path of the verified GGUF file (downloaded on first use)."""

    def get(key: str) -> Path:
        if key not in _verified:
            path = hub.pull(key, cache_dir())
            digest = _sha256(path)
            expect = hub.MODELS[key].sha256
            assert digest == expect, f"{path}: sha256 {digest} != {expect}; delete it to re-download"
            _verified[key] = path
        return _verified[key]

    return get
