"""What the disk under a model reads per second, measured once per disk, and what a token costs.

Where reads are the token (a Mac decoding a model larger than its memory), the disk's random
read speed at the record size, not its sequential figure, sets the pace: the first run on a
disk reads a few dozen random records of the model itself, cold (`F_NOCACHE` on macOS, pages
dropped on Linux: mlx_flash.flash_io), with the engine's own threads, for about a third of a
second, after a few single-page reads for the disk's latency, and keeps both in
`home()/disks.json` under the disk's device id (and the I/O cgroup the process reads in: a
throttle lives there), so that later runs reuse them. With them a user sees, before the first
token, what a token must read when nothing is cached and how long that takes (the ceiling the
cache's hit rate divides), and the engine merges two reads into one only across gaps the disk
reads faster than it starts a read (`DiskSpeed.gap_bytes`, never under the page cache's
fixed figure, flash_io.DEFAULT_MAX_GAP).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .flash_io import DEFAULT_MAX_GAP, DEFAULT_MAX_READ, PAGE, FlashReader
from .paths import home

PROBE_SECONDS = 0.3  # long enough for a few dozen random reads on a slow disk, short at start
PROBE_MAX_BYTES = 256 * 2**20  # a fast disk stops here, not at the clock
PROBE_MIN_READS = 8
PROBE_MAX_READ = 1 << 20
LATENCY_READS = 16  # single-page reads, one at a time: the median is the disk's latency
MAX_GAP = 1 << 20  # reads are cut at 256 KiB anyway (flash_io.DEFAULT_MAX_READ)


@dataclass
class DiskSpeed:
    """Random cold reads of one size from one file, spread over `threads` threads."""

    read_bytes: int  # the size of one read
    reads: int
    seconds: float
    threads: int
    latency_seconds: float  # the median of single-page reads made one at a time

    @property
    def bytes_per_second(self) -> float:
        return self.reads * self.read_bytes / self.seconds if self.seconds > 0 else 0.0

    @property
    def gap_bytes(self) -> int:
        """The unwanted bytes worth reading to save a read: what the disk moves in the time
        one more read waits (a Mac's SSD: hundreds of KB), and never under the page cache's
        figure (flash_io.DEFAULT_MAX_GAP): the kernel reads whole pages, so two reads of
        ranges a few KB apart read most of the gap anyway, and pay a request more. Measured
        (2026-12-04, the default model at a 12 MB/s throttle, where latency x bandwidth is 2
        KB): a 2 KB gap read 21% fewer bytes than 16 KiB but took 29% longer per token."""
        return int(min(MAX_GAP, max(DEFAULT_MAX_GAP,
                                    self.latency_seconds * self.bytes_per_second)))


def measure(path: str | os.PathLike, read_bytes: int, threads: int = 8,
            seconds: float = PROBE_SECONDS, seed: int = 0) -> DiskSpeed:
    """Read `read_bytes` at random page-aligned offsets of `path`, cold, in rounds of
    `threads` reads at once, until `seconds` or PROBE_MAX_BYTES have passed (at least
    PROBE_MIN_READS reads)."""
    size = os.path.getsize(path)
    read_bytes = max(PAGE, min(read_bytes, size))
    rng = np.random.default_rng(seed)
    reader = FlashReader(path, threads=threads, cold=True)  # drops the file's cached pages
    buffers = [memoryview(bytearray(read_bytes)) for _ in range(max(threads, 1))]
    try:
        page = memoryview(bytearray(PAGE))
        latencies = []
        for offset in rng.integers(0, max(size - PAGE, 0) // PAGE + 1, LATENCY_READS) * PAGE:
            t = time.perf_counter()
            reader.read_vectored(int(offset), [page])
            latencies.append(time.perf_counter() - t)
        latency = float(np.median(latencies))
        reads, t0 = 0, time.perf_counter()
        while True:
            starts = rng.integers(0, max(size - read_bytes, 0) // PAGE + 1, len(buffers)) * PAGE
            batch = list(zip(starts.tolist(), buffers, strict=True))
            reader.pool.run(_read_all(reader), batch, len(batch), time.perf_counter())
            reads += len(batch)
            elapsed = time.perf_counter() - t0
            if reads >= PROBE_MIN_READS and (elapsed >= seconds
                                             or reads * read_bytes >= PROBE_MAX_BYTES):
                return DiskSpeed(read_bytes, reads, elapsed, max(threads, 1), latency)
    finally:
        reader.close()


def _read_all(reader: FlashReader):
    def read_all(batch: list[tuple[int, memoryview]]) -> tuple[int, int]:
        got = [reader.read_vectored(offset, [buffer]) for offset, buffer in batch]
        return sum(b for b, _ in got), sum(c for _, c in got)

    return read_all


@dataclass
class TokenReads:
    """What one decoded token reads when none of it is cached (the naive engine's token)."""

    records: int
    record_bytes: int
    what: str  # e.g. "8 experts x 48 layers"

    @property
    def bytes(self) -> int:
        return self.records * self.record_bytes


def token_reads(engine: Any) -> TokenReads:
    """The records a decoded token reads with nothing cached: an expert engine's k experts per
    MoE layer; a dense engine's every neuron of every layer (its selection reads a share)."""
    if engine.unit == "experts":
        fam = engine.family
        k = int(engine.bundle.config["num_experts_per_tok"])
        layers = sum(1 for _, size in fam.segments if size)
        return TokenReads(k * layers, fam.record_bytes, f"{k} experts x {layers} layers")
    fam = engine.families["neuron"]
    return TokenReads(fam.count * fam.layers, fam.record_bytes,
                      f"{fam.count} neurons x {fam.layers} layers, before selection")


def record_file(engine: Any) -> Path:
    """The file the engine reads its records from (a source model's first file)."""
    reader = next(iter(engine.readers.values()))
    files = getattr(reader, "files", None)  # a source model's PieceReader: one per file
    return Path((files[0] if files else reader).path)


def report(speed: DiskSpeed, reads: TokenReads, measured: bool) -> str:
    """One line: the disk's speed, and the reads of a token with nothing cached."""
    rate = speed.bytes_per_second
    ms = 1e3 * reads.bytes / rate if rate else float("inf")
    how = (f"measured now ({speed.reads} random {speed.read_bytes / 1e6:.2f} MB reads, cold, "
           f"{speed.threads} threads)" if measured else "measured on the first run")
    return (f"disk: {rate / 1e9:.2f} GB/s, {1e3 * speed.latency_seconds:.2f} ms a read, "
            f"{how}; a token with nothing cached reads "
            f"{reads.bytes / 1e6:.0f} MB ({reads.what}): {ms:.0f} ms of reads; each cached "
            f"record saves {1e3 * reads.record_bytes / rate:.2f} ms" if rate else
            f"disk: not measurable ({how})")


def io_group(proc: Path = Path("/proc/self/cgroup")) -> str:
    """The I/O cgroup this process reads in ("" where there is none): a read throttle lives
    there, so one disk measures differently in two of them (the benchmarks' throttles)."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" or "blkio" in controllers.split(","):
            return path
    return ""


def disk_speed(path: Path, read_bytes: int, threads: int, store: Path | None = None
               ) -> tuple[DiskSpeed, bool]:
    """The speed of the disk holding `path` at reads of about `read_bytes`: recorded in
    `store` (default home()/disks.json) by device id and read size, else measured now and
    recorded. Returns (speed, measured now)."""
    store = store or home() / "disks.json"
    key = f"{os.stat(path).st_dev}:{io_group()}:{read_bytes}:{threads}"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), dict):
        try:
            return DiskSpeed(**known[key]), False
        except TypeError:
            pass  # a record of another version: measure again
    speed = measure(path, read_bytes, threads)
    known = known if isinstance(known, dict) else {}
    known[key] = asdict(speed)
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f".{store.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(store)  # whole or not at all: another process may read it
    except OSError:
        pass  # a read-only home: measured again next time
    return speed, True


def tune_reads(engine: Any, threads: int) -> tuple[str, bool]:
    """Fit the engine's reads to the disk under its records (measured once per disk): reads
    merge across gaps of up to the disk's `gap_bytes`. Returns the line to show the user
    (`report`, with that gap) and whether the disk was measured now."""
    reads = token_reads(engine)
    # reads of a record, or of the largest merged read (a dense engine's records are small):
    # the disk's bandwidth, not its latency again; at most 1 MiB, as its buffers (one a
    # thread) are memory the plan does not hold
    size = min(max(reads.record_bytes, DEFAULT_MAX_READ), PROBE_MAX_READ)
    speed, measured = disk_speed(record_file(engine), size, threads)
    for reader in engine.readers.values():
        reader.set_max_gap(speed.gap_bytes)
    return (f"{report(speed, reads, measured)}; reads merged across gaps up to "
            f"{speed.gap_bytes / 1024:.0f} KiB", measured)
