"""Random-read throughput of this machine's storage vs chunk size and thread count, cold.

    python tools/flash_profile.py [--file PATH] [--size 1GB] [--seconds 2]
                                  [--out docs/flash_profile]

The paper's Figure 2b for your own disk: for each chunk size (4 KiB .. 1 MiB) and number of
threads (1 .. 64), threads issue positional reads of one chunk at random chunk-aligned offsets
of a file, for a fixed time, with the OS page cache bypassed the way the engine's cold mode
does it (Linux: read-ahead off and the pages dropped after each read; macOS: F_NOCACHE). Without
--file it writes a scratch file of --size random bytes (removed afterwards). Prints a table of
MB/s, and writes OUT.json and OUT.png (matplotlib, optional).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_flash.flash_io import FlashReader  # noqa: E402
from mlx_flash.sysmem import parse_size

CHUNKS = [4 << 10, 8 << 10, 16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10,
          1 << 20]
THREADS = [1, 2, 4, 8, 16, 32, 64]


def measure(path: str, chunk: int, threads: int, seconds: float, seed: int) -> float:
    """MB/s of random chunk reads by `threads` threads for about `seconds`."""
    size = os.path.getsize(path)
    chunks = size // chunk
    readers = [FlashReader(path, threads=1, cold=True) for _ in range(threads)]
    done = [0] * threads
    stop = time.perf_counter() + seconds

    def work(i: int) -> None:
        import random

        rng = random.Random(seed * 1000 + i)
        buf = memoryview(bytearray(chunk))
        r = readers[i]
        while time.perf_counter() < stop:
            n, _ = r.read_vectored(rng.randrange(chunks) * chunk, [buf])
            done[i] += n

    start = time.perf_counter()
    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    for r in readers:
        r.close()
    return sum(done) / elapsed / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", default=None, help="file to read (default: a scratch file)")
    p.add_argument("--size", default="1GB", help="scratch file size (default 1GB)")
    p.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    p.add_argument("--chunks", default=None, help="comma-separated sizes (default 4KiB..1MiB)")
    p.add_argument("--threads", default=None, help="comma-separated counts (default 1..64)")
    p.add_argument("--out", default="flash_profile", help="output path without extension")
    args = p.parse_args()
    chunks = [parse_size(c) for c in args.chunks.split(",")] if args.chunks else CHUNKS
    threads = [int(t) for t in args.threads.split(",")] if args.threads else THREADS
    scratch = None
    path = args.file
    if path is None:
        fd, path = tempfile.mkstemp(prefix="flash_profile.", dir=".")
        scratch = path
        with os.fdopen(fd, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(parse_size(args.size) >> 20):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())  # dirty pages cannot be dropped from the page cache
    try:
        table = {c: {t: measure(path, c, t, args.seconds, 0) for t in threads} for c in chunks}
    finally:
        if scratch is not None:
            os.unlink(scratch)
    print(f"cold random reads of {Path(path).name if args.file else 'a scratch file'}, MB/s")
    print("| chunk | " + " | ".join(f"{t} thr" for t in threads) + " |")
    print("|---|" + "---|" * len(threads))
    for c in chunks:
        print(f"| {c >> 10} KiB | " + " | ".join(f"{table[c][t]:.0f}" for t in threads) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"file": args.file, "seconds": args.seconds, "mb_per_s": {
            str(c): {str(t): v for t, v in row.items()} for c, row in table.items()}}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in threads:
        ax.plot([c >> 10 for c in chunks], [table[c][t] for c in chunks], "o-",
                label=f"{t} threads")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("chunk size (KiB)")
    ax.set_ylabel("random read throughput (MB/s), page cache bypassed")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
