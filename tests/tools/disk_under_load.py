"""Cold O_DIRECT read bandwidth of a file, alone and beside other work, in alternating rounds.

The streamer's disk limit is measured on an idle machine, but its reads run beside the
kernels. This separates what the machine's disk does under CPU load (two busy loops) from
what it does under memory traffic (two processes copying 256 MiB arrays): on a virtual disk
whose host copies into guest memory, the second slows reads where the first does not.

    python tests/tools/disk_under_load.py FILE [ROUNDS]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from edgert.bench_stream import cold_read_bandwidth

LOADS = {
    "idle": None,
    "2 CPU loops": "while True: pass",
    "2 memory copies": (
        "import numpy as np\na = np.ones(32 << 20)\nb = np.empty_like(a)\nwhile True: np.copyto(b, a)"
    ),
}


def main() -> None:
    path = Path(sys.argv[1])
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    got: dict[str, list[float]] = {k: [] for k in LOADS}
    for _ in range(rounds):
        for name, code in LOADS.items():
            procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)] if code else []
            try:
                time.sleep(0.5)  # the load is running before the reads start
                bps, _ = cold_read_bandwidth(path, chunk=36 << 20, inflight=1, limit=3 << 30)
                got[name].append(bps / 1e9)
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
    for name, v in got.items():
        print(f"{name:16s} median {statistics.median(v):.2f} GB/s  ({' '.join(f'{x:.2f}' for x in v)})")


if __name__ == "__main__":
    main()
