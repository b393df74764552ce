"""The memory budget: what stays resident, what the neuron caches may hold, what is left.

    resident weights (embeddings, attention, norms; in the compute dtype)
  + the selection mode's resident data (gate rows, predictors)
  + one layer of records of each family read (prefill streams through it; so do spills)
  + the KV cache for `context` tokens
  = the minimum; what the budget leaves above it goes to the per-layer neuron caches.
"""

from __future__ import annotations

import math
import os
import re
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from .bundle import Bundle
from .neuron_cache import NeuronCache

# As mlx-lm and llama.cpp write sizes: K, M, G, T (with or without B) are powers of 1000,
# KiB, MiB, GiB, TiB powers of 1024; case does not matter.
UNITS = {"": 1, "b": 1,
         **{p + b: 1000 ** (i + 1) for i, p in enumerate("kmgt") for b in ("", "b")},
         **{p + "ib": 1024 ** (i + 1) for i, p in enumerate("kmgt")}}


# Caches smaller than this share of a layer's records are not kept: measured on the default
# model at 75% of its bundle (page cache warm), caches of 0.7% of the records hit 0.4% of the
# neurons, and the FFN took 189 ms per token with them against 154 ms without (admission, and
# joining what they hold with what they spill).
MIN_CACHE_FRACTION = 1 / 16

# Where partial window caches pay (the paper's regime: a ReLU model's window of 5 tokens holds
# ~24% of a layer, 2.4% of it new per token), a layer's caches are made complete only while
# the layers left partial keep this share of a layer each: the window's union must fit first
# (the scale benchmark's trace: 23%), and a complete cache saves only what is new to it.
WINDOW_SHARE = 0.3


class BudgetError(ValueError):
    """The memory budget is below what the model needs at the least."""


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


# Without --memory-budget the model may take this share of the memory available: the rest is
# left to the OS page cache (which serves the bundle's reads) and to other programs.
AUTO_SHARE = 0.75


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


def kv_bytes_per_token(config: dict[str, Any], itemsize: int) -> int:
    """Keys and values of one token over all layers."""
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * int(config["num_hidden_layers"]) * int(heads) * int(head_dim) * itemsize


@dataclass
class MemoryPlan:
    budget: int | None
    resident: int
    selection: int
    staging: int
    kv: int
    context: int
    work: int  # rows gathered for compute, intermediates, buffers MLX keeps for reuse
    # each layer's rows (a list, layer by layer) for each cached (family, parts) the mode reads
    capacity: dict[tuple[str, tuple[str, ...]], list[int]] = field(default_factory=dict)
    cache_bytes: int = 0
    layers: int = 0
    complete_layers: int = 0  # layers whose every cache holds every neuron
    automatic: bool = False  # the budget was chosen from the memory available ("auto")
    whole: bool = False  # every cache complete: the model held whole, nothing read per token

    @property
    def minimum(self) -> int:
        return self.resident + self.selection + self.staging + self.kv + self.work

    @property
    def total(self) -> int:
        return self.minimum + self.cache_bytes

    def budget_text(self) -> str:
        """"budget 250.0 MB", "budget 250.0 MB auto" (chosen from the memory available) or
        "no budget"."""
        if self.budget is None:
            return "no budget"
        return f"budget {format_bytes(self.budget)}{' auto' if self.automatic else ''}"

    def describe(self) -> str:
        return (f"resident weights {format_bytes(self.resident)} + selection data "
                f"{format_bytes(self.selection)} + one layer of records "
                f"{format_bytes(self.staging)} + KV cache for {self.context} tokens "
                f"{format_bytes(self.kv)} + working memory {format_bytes(self.work)} + neuron "
                f"caches {format_bytes(self.cache_bytes)} ({self.complete_layers} of "
                f"{self.layers} layers complete)")


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


def loaded_bytes(path: Path, compute_itemsize: int) -> int:
    """Memory the tensors of a safetensors file take once loaded for compute: float tensors
    in the compute dtype, the rest (quantized weights) as stored. Reads only the header."""
    return sum(a.nbytes * compute_itemsize // a.itemsize
               if mx.issubdtype(a.dtype, mx.floating) else a.nbytes
               for a in mx.load(str(path)).values())


def plan_memory(bundle: Bundle, compute_itemsize: int, selection_bytes: int,
                cache_keys: list[tuple[str, tuple[str, ...]]], budget: int | None,
                context: int, default_full: bool, caches: bool = True,
                windows: bool = True) -> MemoryPlan:
    """Size each layer's neuron caches. Without a budget every layer's caches hold every
    neuron (`default_full`: complete caches, read once at load) or nothing. With one, what it
    leaves above the minimum goes where it saves the most reads per byte: complete caches for
    whole layers, in layer order (a complete cache saves all of its layer's reads and never
    joins what it holds with what it spills); then, where partial window caches pay
    (`windows`), the rest in equal shares to the other layers, and before that a layer is
    made complete only while those keep `WINDOW_SHARE` of a layer each (a window that holds a
    token's selection saves more per byte than a complete cache). Without `windows` (modes
    whose selections churn: a partial cache spills every token, and joining costs more
    compute than its hits save reads) the rest is left unused. `caches` False (a window of 0
    tokens): no cache at all, whatever the budget leaves."""
    config = bundle.config
    n_layers = int(config["num_hidden_layers"])
    resident = loaded_bytes(bundle.resident_path, compute_itemsize)
    from .ffn import staging_rows

    families = {family for family, _ in cache_keys} | {"neuron"}
    staging = sum(staging_rows(bundle.families[f]) * bundle.families[f].record_bytes
                  for f in families)
    kv = context * kv_bytes_per_token(config, compute_itemsize)
    # a token's rows gathered out of the caches (and, when a cache cannot hold a token's
    # neurons, joined with those read past it), what computing on them takes (weighted sums
    # convert rows to float32; a compute dtype other than the stored one copies them), buffers
    # MLX keeps for reuse (the loader caps them at a quarter of this) and the engine's
    # Python-side bookkeeping: four staging slices plus 16 MiB (measured: docs/BENCHMARKS.md)
    work = 4 * staging + 16 * 2**20
    plan = MemoryPlan(budget, resident, selection_bytes, staging, kv, context, work=work,
                      layers=n_layers)
    # a cache's rows, and its index arrays: a fixed part per neuron, a part per row
    count = {key: bundle.families[key[0]].count for key in cache_keys}
    row_bytes = {key: bundle.families[key[0]].tensor_bytes(key[1]) + NeuronCache.index_bytes(0, 1)
                 for key in cache_keys}
    fixed = sum(NeuronCache.index_bytes(count[key], 0) for key in cache_keys)  # per layer
    rows_whole = sum(count[key] * row_bytes[key] for key in cache_keys)
    layer_whole = fixed + rows_whole  # one layer's caches, complete
    if budget is not None and budget < plan.minimum:
        raise BudgetError(f"memory budget {format_bytes(budget)} is below the minimum "
                          f"{format_bytes(plan.minimum)} for this model: "
                          + plan.describe().rsplit(" + neuron caches", 1)[0])
    room = 0 if budget is None else budget - plan.minimum
    if not caches or not cache_keys:
        complete, fraction = 0, 0.0
    elif budget is None:
        complete, fraction = (n_layers if default_full else 0), 0.0
    else:
        complete = min(n_layers, room // layer_whole)
        while windows and complete and (room - complete * layer_whole
                                        < WINDOW_SHARE * (n_layers - complete) * layer_whole):
            complete -= 1
        share = (room - complete * layer_whole) / max(1, n_layers - complete)
        fraction = min(1.0, max(0, share - fixed) / rows_whole) if windows else 0.0
    for key in cache_keys:
        rows = int(fraction * count[key])
        if rows < MIN_CACHE_FRACTION * count[key]:
            rows = 0
        plan.capacity[key] = [count[key]] * complete + [rows] * (n_layers - complete)
        plan.cache_bytes += sum(n * row_bytes[key] + NeuronCache.index_bytes(count[key], 0)
                                for n in plan.capacity[key] if n)
    plan.complete_layers = sum(all(plan.capacity[key][i] == count[key] for key in cache_keys)
                               for i in range(n_layers)) if cache_keys else 0
    plan.whole = bool(cache_keys) and plan.complete_layers == n_layers
    return plan
