"""Device profiles: the figures the planner predicts from, as TOML in `profiles/`.

A profile holds RAM, cold sequential disk read bandwidth, memory bandwidth, cores and the
weight bytes per second edgert's Q4_K matmul reaches at one token, each with a note on
where it comes from. `measure_profile` measures this machine; `save_profile` writes TOML
that `load_profile` reads back.

    name = "raspberry-pi-5-8gb-nvme"
    ram = "8GiB"
    disk_read_per_s = "430MB"
    memory_per_s = "11.4GB"
    kernel_per_s = "5GB"
    cores = 4
    estimated = ["disk_read_per_s", "kernel_per_s"]
    [sources]
    ram = "..."
"""

from __future__ import annotations

import json
import mmap
import os
import platform
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgert.offload.memory import Memory

from edgert.errors import FormatError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None


def _profiles_dir() -> Path:
    """The shipped profiles: installed as package data of edgert.profiles (profiles/ in the repo)."""
    from importlib.resources import files

    try:
        return Path(str(files("edgert.profiles")))
    except (ModuleNotFoundError, TypeError):
        return Path(__file__).resolve().parent.parent / "profiles"


PROFILES_DIR = _profiles_dir()
_FIGURES = ("ram", "disk_read_per_s", "memory_per_s", "kernel_per_s", "cores")


@dataclass(frozen=True)
class DeviceProfile:
    """What one device can do. Bandwidths are bytes per second."""

    name: str
    ram_bytes: int
    disk_read_bps: float  # sequential, cold (not from the page cache)
    memory_bps: float  # sustained multi-threaded read
    cores: int
    kernel_bps: float  # weight bytes/s of edgert's Q4_K matmul at T=1 on all cores
    description: str = ""
    sources: dict = field(default_factory=dict, compare=False, hash=False)  # figure -> citation
    estimated: tuple[str, ...] = ()  # figures that are estimates, not measured or specified

    def __post_init__(self):
        for k in ("ram_bytes", "disk_read_bps", "memory_bps", "cores", "kernel_bps"):
            if not getattr(self, k) > 0:
                raise ValueError(f"profile {self.name!r}: {k} must be positive, not {getattr(self, k)!r}")


# ---- TOML ---------------------------------------------------------------------------


def load_profile(name_or_path: str | os.PathLike) -> DeviceProfile:
    """A shipped profile by name (`edgert plan --profile raspberry-pi-5-8gb-nvme`) or a TOML path.

    Raises:
        FormatError: no such profile, or a file that is not a valid profile.
    """
    if tomllib is None:
        raise FormatError("reading profiles needs Python 3.11+ (tomllib); install Python 3.11 or newer")
    p = Path(name_or_path).expanduser()
    if not p.is_file():
        p = PROFILES_DIR / f"{name_or_path}.toml"
    if not p.is_file():
        names = ", ".join(shipped_profiles()) or "none"
        raise FormatError(f"no profile {str(name_or_path)!r}: give a .toml path or one of: {names}")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{p}: not valid TOML ({e})") from None
    return profile_from_dict(data, default_name=p.stem, where=str(p))


def profile_from_dict(data: dict, default_name: str = "profile", where: str = "profile") -> DeviceProfile:
    missing = [k for k in _FIGURES if k not in data]
    if missing:
        raise FormatError(f"{where}: missing {', '.join(missing)}")
    try:
        return DeviceProfile(
            name=str(data.get("name", default_name)),
            ram_bytes=Memory.parse(data["ram"]).bytes,
            disk_read_bps=float(Memory.parse(data["disk_read_per_s"]).bytes),
            memory_bps=float(Memory.parse(data["memory_per_s"]).bytes),
            kernel_bps=float(Memory.parse(data["kernel_per_s"]).bytes),
            cores=int(data["cores"]),
            description=str(data.get("description", "")),
            sources={str(k): str(v) for k, v in dict(data.get("sources", {})).items()},
            estimated=tuple(str(x) for x in data.get("estimated", ())),
        )
    except (ValueError, TypeError) as e:
        raise FormatError(f"{where}: {e}") from None


def profile_to_toml(p: DeviceProfile) -> str:
    s = json.dumps  # a JSON string is a valid TOML basic string
    lines = [
        f"name = {s(p.name)}",
        f"description = {s(p.description)}",
        f"ram = {s(_size(p.ram_bytes))}",
        f"disk_read_per_s = {s(_size(p.disk_read_bps))}",
        f"memory_per_s = {s(_size(p.memory_bps))}",
        f"kernel_per_s = {s(_size(p.kernel_bps))}",
        f"cores = {p.cores}",
        f"estimated = [{', '.join(s(x) for x in p.estimated)}]",
        "",
        "[sources]",
        *(f"{k} = {s(v)}" for k, v in p.sources.items()),
    ]
    return "\n".join(lines) + "\n"


def _size(n: float) -> str:
    """Bytes as an exact string in the largest unit that keeps it exact ("8GiB", "2.13GB")."""
    n = int(round(n))
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= k and n % k == 0:
            return f"{n // k}{unit}"
    for unit, k in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= k and round(float(f"{n / k:g}") * k) == n:
            return f"{n / k:g}{unit}"
    return str(n)


def _sig(x: float, digits: int = 3) -> float:
    """A measurement rounded to the digits it can claim."""
    return float(f"{x:.{digits - 1}e}")


def save_profile(profile: DeviceProfile, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile_to_toml(profile))
    return path


DEFAULT_PROFILE = "laptop-8gb"


def host_profile_path() -> Path:
    """Where `edgert profile` writes this host's measured profile."""
    home = Path(os.environ.get("EDGERT_HOME") or Path("~/.cache/edgert").expanduser())
    return home / "profiles" / f"{socket.gethostname()}.toml"


def default_profile(name: str | os.PathLike | None = None) -> tuple[DeviceProfile, str]:
    """The profile a plan predicts from, and a phrase saying which it is: `name` if given,
    else this host's measured profile if `edgert profile` wrote one, else the shipped
    laptop-8gb profile (a middle-of-the-road edge machine)."""
    if name:
        return load_profile(name), ""
    if host_profile_path().is_file():
        return load_profile(host_profile_path()), f"this host's measured profile ({host_profile_path()})"
    return load_profile(DEFAULT_PROFILE), (
        f"the shipped {DEFAULT_PROFILE} profile (run `edgert profile` to measure this machine)"
    )


def shipped_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


# ---- measuring this machine -----------------------------------------------------------


def measure_profile(
    name: str | None = None, disk_dir: str | os.PathLike | None = None, disk_bytes: int = 256 << 20
) -> DeviceProfile:
    """Measure this machine: RAM, cold sequential disk reads in `disk_dir` (default: the
    temp directory), multi-threaded memory read bandwidth, cores, and the Q4_K matmul's
    weight throughput at T=1. Takes a few seconds (plus a kernel compile on first use)."""
    import numba

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ram = _ram_bytes()
    disk_bps, disk_how = measure_disk(disk_dir, disk_bytes)
    mem_bps = measure_memory()
    kern_bps = measure_kernel()
    threads = numba.config.NUMBA_NUM_THREADS
    return DeviceProfile(
        name=name or socket.gethostname(),
        ram_bytes=ram,
        disk_read_bps=_sig(disk_bps),
        memory_bps=_sig(mem_bps),
        cores=cores,
        kernel_bps=_sig(kern_bps),
        description=f"measured by `edgert profile` on {platform.machine()} {platform.system()}, "
        f"{time.strftime('%Y-%m-%d')}",
        sources={
            "ram": "physical memory (psutil), lowered to the cgroup memory limit if one is set",
            "disk_read_per_s": disk_how,
            "memory_per_s": f"best of 5 parallel numba sums over a 512 MiB array, {threads} threads",
            "kernel_per_s": f"edgert Q4_K matmul at T=1 over 256 MiB of weight matrices, {threads} threads",
            "cores": "CPUs this process may run on (sched_getaffinity)",
        },
    )


def _ram_bytes() -> int:
    import psutil

    ram = psutil.virtual_memory().total
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(f).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            ram = min(ram, int(limit))
    return ram


def measure_disk(directory: str | os.PathLike | None = None, nbytes: int = 256 << 20) -> tuple[float, str]:
    """Cold sequential read bandwidth of a temp file written in `directory`, in 4 MiB reads.

    The page cache is defeated with O_DIRECT where the filesystem allows it (the reads
    bypass the cache); otherwise the file's cached pages are dropped with
    posix_fadvise(DONTNEED) after an fsync. Returns (bytes/s, how it was measured).
    """
    chunk = 4 << 20
    nbytes = max(chunk, nbytes // chunk * chunk)
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT requires
    buf.write(os.urandom(chunk))
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".edgert-profile-") as f:
        fd = f.fileno()
        for _ in range(nbytes // chunk):
            os.write(fd, buf)
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        how = "posix_fadvise(DONTNEED) after fsync"
        rfd = None
        if hasattr(os, "O_DIRECT"):
            try:
                rfd = os.open(f.name, os.O_RDONLY | os.O_DIRECT)
                os.preadv(rfd, [buf], 0)  # tmpfs and some filesystems refuse O_DIRECT reads
                how = "O_DIRECT"
            except OSError:
                if rfd is not None:
                    os.close(rfd)
                rfd = None
        if rfd is None:
            rfd = os.open(f.name, os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            off = 0
            while off < nbytes:
                n = os.preadv(rfd, [buf], off)
                if n <= 0:
                    break
                off += n
            dt = time.perf_counter() - t0
        finally:
            os.close(rfd)
    where = Path(directory or tempfile.gettempdir()).resolve()
    desc = (
        f"cold sequential read of a {nbytes >> 20} MiB file in {where}, 4 MiB reads, cache defeated by {how}"
    )
    return off / dt, desc


def measure_memory(nbytes: int = 512 << 20, repeat: int = 5) -> float:
    import numpy as np

    a = np.ones(nbytes // 8, np.float64)
    _par_sum(a[:1024])  # compile
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        _par_sum(a)
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best


def measure_kernel(
    total_bytes: int = 256 << 20, rows: int = 4096, cols: int = 4096, repeat: int = 3
) -> float:
    """Weight bytes/s of edgert's Q4_K matmul at T=1, cycling through enough matrices that
    the weights come from memory rather than cache (as in decoding). The weights are laid out
    as the runtime holds them (`pack`: the row-interleaved records where the CPU has
    AVX512-VNNI, 2-3x faster than the raw blocks, else the raw rows)."""
    import numpy as np
    from edgert.quant.formats import QType, row_nbytes
    from edgert.quant.kernels import MatmulScratch, matmul, pack

    rb = row_nbytes(QType.Q4_K, cols)
    n_mats = max(1, total_bytes // (rows * rb))
    rng = np.random.default_rng(0)
    mats = []
    for _ in range(n_mats):
        w = rng.integers(0, 256, (rows, rb), dtype=np.uint8)
        blocks = w.reshape(rows, -1, 144)
        blocks[:, :, 0:4] = np.frombuffer(np.array([0.01, 0.001], np.float16).tobytes(), np.uint8)
        mats.append(pack(w, QType.Q4_K))
    x = rng.standard_normal((1, cols)).astype(np.float32)
    out = np.zeros((1, rows), np.float32)
    scratch = MatmulScratch(1, cols)
    matmul(out, x, mats[0], QType.Q4_K, scratch)  # compile or load from cache
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for w in mats:
            matmul(out, x, w, QType.Q4_K, scratch)
        best = min(best, time.perf_counter() - t0)
    return sum(m.data.nbytes for m in mats) / best  # the bytes the kernel reads, as the plan counts them


def _par_sum(a):
    return _par_sum_kernel()(a)


_KERNEL = []


def _par_sum_kernel():
    if not _KERNEL:
        import numba as nb

        @nb.njit(parallel=True, cache=True)
        def par_sum(a):
            s = 0.0
            for i in nb.prange(a.shape[0]):
                s += a[i]
            return s

        _KERNEL.append(par_sum)
    return _KERNEL[0]
