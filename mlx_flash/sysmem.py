"""What the operating system says about memory: this process's resident set, the memory it
may still take (its cgroups' limits included), sizes as people write them, and asking the C
allocator to return freed memory. Nothing here knows about models."""

from __future__ import annotations

import math
import os
import re
import resource
import sys
from pathlib import Path

# As mlx-lm and llama.cpp write sizes: K, M, G, T (with or without B) are powers of 1000,
# KiB, MiB, GiB, TiB powers of 1024; case does not matter.
UNITS = {"": 1, "b": 1,
         **{p + b: 1000 ** (i + 1) for i, p in enumerate("kmgt") for b in ("", "b")},
         **{p + "ib": 1024 ** (i + 1) for i, p in enumerate("kmgt")}}


def parse_size(text: str | int) -> int:
    """Bytes from "250MB", "8G", "1.5GiB", "2e8" or an int (units: `UNITS`)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    try:
        value = float(m.group(1)) * UNITS[m.group(2).lower()] if m else math.nan
    except (ValueError, KeyError):
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"not a size: {text!r} (try 250MB, 8G or 1.5GiB)")
    return int(value)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    raise AssertionError


def _status_kib(key: str, path: str = "/proc/self/status") -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux: VmHWM, which starts afresh at exec;
    ru_maxrss would carry over a forking parent's peak)."""
    peak = _status_kib("VmHWM:")
    if peak is not None:
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS: bytes, Linux: KiB


def rss_bytes() -> int:
    """This process's resident set size now (where the OS tells; else the peak so far)."""
    now = _status_kib("VmRSS:")
    return now if now is not None else peak_rss_bytes()


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None


def _stat(path: Path, key: str) -> int:
    """A value of a cgroup's memory.stat (0 when absent)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def cgroup_room() -> int | None:
    """Memory this process's cgroups — its own and every one above it — may still take: the
    least, over those with a limit, of the limit minus the usage, the usage without the
    inactive page cache the kernel drops first. cgroup v2: memory.max, memory.current,
    inactive_file; v1: memory.limit_in_bytes, memory.usage_in_bytes, total_inactive_file. A
    container that sees only its own cgroup finds it at the hierarchy's root."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":
            root, files = Path("/sys/fs/cgroup"), ("memory.max", "memory.current",
                                                   "inactive_file")
        elif "memory" in controllers.split(","):
            root, files = Path("/sys/fs/cgroup/memory"), (
                "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        folder = root / rel.lstrip("/")
        if not folder.is_dir():
            folder = root
        for d in (folder, *folder.parents):
            limit, usage = _read_int(d / files[0]), _read_int(d / files[1])
            if limit is not None and usage is not None and limit < 2**60:
                rooms.append(max(0, limit - usage + _stat(d / "memory.stat", files[2])))
            if d == root:
                break
    return min(rooms) if rooms else None


def available_memory() -> int:
    """Memory this process can take without pushing others out: Linux's MemAvailable (free
    memory plus the page cache it can drop), within the process's cgroup limit; elsewhere
    (macOS has no such figure) half the physical memory."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = _status_kib("MemAvailable:", "/proc/meminfo")
    if available is None:
        return total // 2
    room = cgroup_room()
    return available if room is None else min(available, room)


def return_freed_memory() -> None:
    """Make the C allocator hand large freed blocks back to the OS. glibc raises its mmap
    threshold (up to 32 MiB) each time a large block is freed, after which blocks of that size
    come from the heap and stay in the process when freed: measured on the scale benchmark,
    RSS crept 60 MB past what MLX held. A fixed 1 MiB threshold keeps RSS with MLX's own
    accounting. No-op where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
