"""`edgert bench` as a user runs it, on the tiny llama (llama.cpp is never needed here)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import TINY


def edgert(*args, timeout=120):
    cmd = [sys.executable, "-m", "edgert.apps.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_bench_quick_json(tmp_path):
    out = tmp_path / "out.json"
    r = edgert("bench", TINY / "llama", "--quick", "--threads", "1", "--json", out)
    assert r.returncode == 0, r.stderr
    assert "decode tok/s" in r.stdout and "memory bandwidth" in r.stdout
    d = json.loads(out.read_text())
    assert d["schema"] == "edgert-bench/1"
    assert d["weights_per_token"] > 0 and d["machine"]["membw_gbs"] > 0
    assert d["settings"]["threads"] == 1 and d["settings"]["prompt_sizes"] == [32, 64]
    e = d["systems"]["edgert"]
    assert list(d["systems"]) == ["edgert"] and d["ratios"] == {}
    for key in ("load_s", "cold_start_s", "prompt32_tps", "prompt64_tps", "decode_tps", "peak_rss"):
        s = e["stats"][key]
        assert 0 < s["min"] <= s["median"] <= s["max"], (key, s)
    (run,) = e["runs"]
    assert run["cold_start_s"] > run["load_s"] > 0
    assert run["peak_rss"] > 1 << 20 and run["threads"] == 1
    assert len(run["tokens"]) == 16


def test_vs_llama_without_llama_cpp_is_one_clear_line(tmp_path):
    # a Python without site-packages cannot import llama_cpp: refused before any run starts
    py = tmp_path / "python-no-site"
    py.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    py.chmod(0o755)
    r = edgert("bench", TINY / "llama", "--quick", "--vs", "llama.cpp", "--llama-python", py)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "edgert[bench]" in lines[0], r.stderr


def test_vs_unknown_system():
    r = edgert("bench", TINY / "llama", "--vs", "vllm")
    assert r.returncode == 2 and "llama.cpp" in r.stderr and "Traceback" not in r.stderr
