"""Shared fixtures. Real models are pulled into a cache (EDGERT_TEST_CACHE, default
~/.cache/edgert) by the same code as `edgert pull`, and their sha256 is checked once per
session. A model that cannot be fetched fails the test that needs it: none is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from edgert import hub

TINY = Path(__file__).parent / "fixtures" / "tiny"
GOLDEN = Path(__file__).parent / "golden"
TINY_ARCHS = ["llama", "qwen2", "qwen3", "gemma3", "mixtral", "qwen3_moe", "llama3"]
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


def pytest_sessionfinish(session, exitstatus):
    """Every kernel specialization the suite ran is in edgert/kernel_signatures.json, the table
    a budgeted run compiles ahead of time (edgert.jit): one that is missing would compile
    inside the budget. The session fails and names it; EDGERT_WRITE_KERNEL_SIGNATURES=1 adds
    what the session compiled to the table instead."""
    import sys

    if "numba" not in sys.modules:
        return
    from edgert import jit

    table = jit.signatures()
    seen = jit.compiled_signatures()
    missing = {k: [s for s in v if s not in table.get(k, [])] for k, v in seen.items()}
    missing = {k: v for k, v in missing.items() if v}
    if not missing:
        return
    if os.environ.get("EDGERT_WRITE_KERNEL_SIGNATURES"):
        for k, v in missing.items():
            table[k] = sorted(table.get(k, []) + v)
        jit.SIGNATURES.write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n")
        return
    lines = [f"  {k}{s}" for k, v in missing.items() for s in v]
    sys.stderr.write(
        "\nkernel specializations missing from edgert/kernel_signatures.json (a budgeted run would "
        "compile them inside its budget; EDGERT_WRITE_KERNEL_SIGNATURES=1 pytest adds them):\n"
        + "\n".join(lines)
        + "\n"
    )
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
