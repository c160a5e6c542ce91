"""`edgert bench` as a user runs it, on the tiny llama (llama.cpp is never needed here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
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


# ---- the budget benchmark's tooling -----------------------------------------------------


def test_cgroup_helper_refuses_clearly(tmp_path, monkeypatch):
    from edgert import bench_stream as bs
    from edgert.bench import BenchError

    monkeypatch.setattr(bs, "V1", tmp_path / "v1")
    monkeypatch.setattr(bs, "V2", tmp_path / "v2")
    with pytest.raises(BenchError, match="no memory cgroup hierarchy"):
        bs.MemoryCgroup(1 << 30)
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "memory.limit_in_bytes").write_text("0")
    (tmp_path / "v1" / "edgert-bench-x").write_text("a file where the cgroup would go")
    with pytest.raises(BenchError, match="cannot make a memory cgroup"):
        bs.MemoryCgroup(1 << 30, "edgert-bench-x")


def test_stream_table():
    from edgert.bench_stream import StreamBench, StreamRun, format_stream_table

    e = StreamRun(
        "edgert", 3 << 29, 0.25, 8, 32.0, 1400 << 20, 1500 << 20, 0, bytes_per_token=3.3e9, reader_bps=0.88e9
    )
    ll = StreamRun("llama.cpp", 3 << 29, 0.05, 8, 160.0, 1500 << 20, 1536 << 20, 0)
    bad = StreamRun("llama.cpp", 1 << 30, 0.0, 0, 600, -1, 1 << 30, 1, error="no result within 600 s")
    e2 = StreamRun("edgert", 1 << 30, 0.2, 8, 40.0, 1000 << 20, 1 << 30, 0, bytes_per_token=3.5e9)
    e2.disk_bps = 1.4e9  # measured right before this run: its disk limit uses it
    res = StreamBench("/m/7b.gguf", 4_680_000_000, 512, 2, 1.0e9, 0.2e9, [e, ll, e2, bad])
    table = format_stream_table(res)
    assert (
        "| 1.50 GiB | 0.250 | 0.050 | 5.00× | 3147 MiB | 1.00 GB/s | 0.303 | 82% | 0.88 GB/s (94%) |" in table
    )
    assert "| 1.00 GiB | 0.200 | failed" in table and "| 1.40 GB/s | 0.400 | 50% |" in table
    assert "failed: no result within 600 s" in table and "| 0 / 1 |" in table
    assert res.to_dict()["schema"] == "edgert-bench-stream/3"


def test_stream_table_over_rounds():
    """Several rounds: medians with their range, the ratio of the medians beside the range of
    the rounds' own ratios, the highest peak and every OOM kill; a failed run is left out of
    the medians and said."""
    from edgert.bench_stream import StreamBench, StreamRun, format_stream_table

    def run(system, tps, rnd, **kw):
        r = StreamRun(system, 3 << 29, tps, 8, 8 / tps if tps else 600.0, 1300 << 20, 1430 << 20, 0, **kw)
        r.round = rnd
        return r

    e = [run("edgert", t, i, bytes_per_token=3300 * 2**20) for i, t in enumerate((0.50, 0.56, 0.52))]
    for r, bps in zip(e, (1.8e9, 2.0e9, 1.9e9), strict=True):
        r.disk_bps = bps
    e[1].peak_rss = 1350 << 20
    ll = [run("llama.cpp", t, i) for i, t in enumerate((0.25, 0.29, 0.26))]
    ll[2].oom_kills = 1
    late = run("edgert", 0.0, 3, error="exited with status 1")
    late.peak_rss = -1  # killed: no figure of its own
    res = StreamBench(
        "/m/7b.gguf", 4_680_000_000, 512, 2, 2.0e9, 0.2e9, [e[0], ll[0], ll[1], e[1], e[2], ll[2], late]
    )
    row = next(line for line in format_stream_table(res).splitlines() if line.startswith("| 1.50 GiB"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "0.520 (0.500–0.560), 1 of 4 failed: exited with status 1"
    assert cells[2] == "0.260 (0.250–0.290)"
    assert cells[3] == "2.00× (1.93×–2.00×)"  # 0.52 / 0.26, and the rounds' 0.50/0.25, 0.56/0.29, 0.52/0.26
    assert cells[4] == "3300 MiB"  # no range where every run agrees
    assert cells[5] == "1.90 GB/s (1.80 GB/s–2.00 GB/s)"
    assert cells[10:] == ["1350 MiB", "1430 MiB", "0 / 1"]


def test_stream_ratio_counts_only_rounds_both_finished():
    """A round where one system failed has no ratio: the value is that of the medians over the
    rounds both finished, so it stays within their range; with no such round there is none."""
    from edgert.bench_stream import StreamBench, StreamRun, format_stream_table

    def run(system, tps, rnd, error=""):
        r = StreamRun(system, 1 << 30, tps, 8, 8.0, 900 << 20, 1 << 30, 0, bytes_per_token=2e9, error=error)
        r.round = rnd
        return r

    def ratio(runs):
        table = format_stream_table(StreamBench("/m/7b.gguf", 4_680_000_000, 512, 2, 2.0e9, 0.2e9, runs))
        row = next(line for line in table.splitlines() if line.startswith("| 1.00 GiB"))
        return row.split("|")[4].strip()

    killed = run("llama.cpp", 0.0, 1, error="killed")
    runs = [run("edgert", 0.50, 0), run("llama.cpp", 0.25, 0), run("edgert", 0.90, 1), killed]
    runs += [run("edgert", 0.55, 2), run("llama.cpp", 0.26, 2)]
    assert ratio(runs) == "2.06× (2.00×–2.12×)"  # 0.525 / 0.255; the 0.90 run has no partner
    lone = [run("edgert", 0.5, 0), killed, run("edgert", 0.5, 1, error="killed"), run("llama.cpp", 0.25, 1)]
    lone[1] = run("llama.cpp", 0.0, 0, error="killed")
    assert ratio(lone) == "–"


def test_stream_bench_alternates_and_measures_each_round(monkeypatch):
    """Which system goes first alternates over every round of every budget, and the disk is
    measured once per round, before either system runs; without --vs only edgert runs."""
    import edgert.bench
    from edgert import bench_stream as bs

    log = []

    class NoCgroup:
        def __init__(self, *a):
            pass

        def remove(self):
            pass

    def fake_run(python, spec, budget, timeout_s):
        log.append((spec["system"][0], budget))
        return bs.StreamRun(spec["system"], budget, 1.0, 8, 8.0, 1, 1, 0)

    monkeypatch.setattr(bs, "MemoryCgroup", NoCgroup)
    monkeypatch.setattr(bs, "drop_caches", lambda: None)
    monkeypatch.setattr(bs, "cold_read_bandwidth", lambda *a, **k: (1e9, 0))
    monkeypatch.setattr(bs, "disk_bandwidth", lambda path: log.append("disk") or 2e9)
    monkeypatch.setattr(bs, "_run_in_cgroup", fake_run)
    monkeypatch.setattr(edgert.bench, "find_llama_python", lambda p: "python-with-llama")
    model = str(TINY / "llama")
    res = bs.run_stream_bench(model, [1, 2], 2, repeat=3, llama_python="x")
    body = log[1:-1]  # a whole-file read before the runs and after them
    assert body == [
        *["disk", ("e", 1), ("l", 1), "disk", ("l", 1), ("e", 1), "disk", ("e", 1), ("l", 1)],
        *["disk", ("l", 2), ("e", 2), "disk", ("e", 2), ("l", 2), "disk", ("l", 2), ("e", 2)],
    ]
    assert [r.round for r in res.runs if r.system == "edgert"] == [0, 1, 2, 0, 1, 2]
    assert all((r.disk_bps > 0) == (r.system == "edgert") for r in res.runs)
    log.clear()
    bs.run_stream_bench(model, [1], 2, repeat=2, vs_llama=False)
    assert log[1:-1] == ["disk", ("e", 1), "disk", ("e", 1)]


def test_worker_result_failure_and_timeout():
    from edgert.workers import WorkerError, module_command, run_worker, worker_command

    echo = [
        sys.executable,
        "-c",
        "import json, sys; print('noise'); print(json.dumps(json.loads(sys.argv[-1])[::-1]))",
    ]
    assert run_worker(echo, [1, 2, 3], 30) == [3, 2, 1]  # the last stdout line is the result
    piped = [sys.executable, "-c", "import json, sys; print(json.dumps(json.load(sys.stdin) * 2))"]
    assert run_worker(piped, 21, 30, stdin=True) == 42
    with pytest.raises(WorkerError, match="went wrong"):
        run_worker([sys.executable, "-c", "import sys; sys.exit('it went wrong')"], {}, 30)
    with pytest.raises(WorkerError, match="no result within 1 s"):
        run_worker([sys.executable, "-c", "import time; time.sleep(30)"], {}, 1)
    cmd = worker_command("py", "/x/bench.py")
    assert cmd[:3] == ["py", "-I", "-c"] and "/x/bench.py" in cmd[3]
    assert worker_command("py", module="edgert.bench") == module_command("py", "edgert.bench")
