"""The benchmarks' harness (tools/bench.py, tools/bench_moe.py): each engine in a process of its
own, in cgroups of its own, with its model's page cache emptied first; rounds interleaved and
medians over them; Markdown tables, JSON and charts.

The worker protocol: a benchmark script run as `SCRIPT --worker SPEC` (SPEC: a JSON object
naming at least "engine") runs that one engine in its process and prints its row, a JSON
object, as its last line of output; `run_worker` starts it and reads that line back.

Cgroups: the engine's process is moved, before it execs, into a memory cgroup made for it under
this process's own (cgroup v1 `memory`, else v2), limited to `ram` bytes or, without a limit,
there for its peak usage, which counts the page cache too; with `read_bps`, also a blkio cgroup
(v1 `blkio.throttle.read_bps_device`; v2 `io.max` rbps) limiting reads from the block devices
that hold the model's files. Where none can be made (no hierarchy, no permission) the engine
runs without, and its row says why ("cgroup_error").
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's mlx_flash, before any installed one
if str(ROOT / "tools") not in sys.path:
    sys.path.append(str(ROOT / "tools"))  # llama_cpp, for llama_cpp_row

CGROUP_ROOT = Path("/sys/fs/cgroup")
Case = TypeVar("Case", bound=Hashable)
# `--read-mbps default`: the read throttle (MB/s, 10^6 bytes) at which a naive token's read
# stall is the share of it that it is on an M-series Mac (~93.5%: a read:compute ratio of 14.5);
# derived in docs/BENCHMARKS.md, "The read-bound regime: where the default throttle comes from".
DEFAULT_READ_MBPS = 12.0


def read_mbps(value: str | None) -> float | None:
    """A --read-mbps argument: "default" (DEFAULT_READ_MBPS), a positive number of MB/s, or
    None / "" / "0" / "off" / "none" for no throttle."""
    if value is None or value.strip().lower() in ("", "0", "off", "none"):
        return None
    if value.strip().lower() == "default":
        return DEFAULT_READ_MBPS
    try:
        mbps = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--read-mbps takes a number of MB/s or 'default', not {value!r}") from None
    if not mbps > 0 or mbps == float("inf"):
        raise argparse.ArgumentTypeError(f"--read-mbps must be positive and finite: {value!r}")
    return mbps


def read_bps(mbps: float | None) -> int | None:
    """read_mbps's MB/s as the cgroup's bytes per second (None: no throttle)."""
    return None if mbps is None else int(mbps * 1e6)


def drop_page_cache(folder: Path) -> None:
    """Ask the OS to forget the cached pages of `folder`: every file under it, or the file
    itself (no root needed)."""
    if not hasattr(os, "posix_fadvise"):
        return
    folder = Path(folder)
    for path in [folder] if folder.is_file() else folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def work_dir() -> Path:
    """Where the benchmarks keep the models they build: mlx_flash's cache folder's bench/."""
    from mlx_flash.paths import home

    work = home() / "bench"
    work.mkdir(parents=True, exist_ok=True)
    return work


# ----------------------------------------------------------------------------- cgroups


def own_cgroups(text: str) -> dict[str, str]:
    """/proc/self/cgroup's text -> {controller: this process's cgroup path}; the v2 (unified)
    hierarchy's under "", named v1 hierarchies under "name=..."."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                out.setdefault(controller, parts[2])
    return out


def cgroup_base(controller: str, own: dict[str, str], root: Path = CGROUP_ROOT
                ) -> tuple[Path, int]:
    """The folder of this process's own cgroup for `controller` ("memory", "blkio"), and the
    cgroup version: v1's hierarchy of that controller where mounted, else the v2 hierarchy."""
    if controller in own and (root / controller).is_dir():
        return root / controller / own[controller].lstrip("/"), 1
    if "" in own and (root / "cgroup.controllers").exists():
        return root / own[""].lstrip("/"), 2
    raise OSError(f"no {controller} cgroup hierarchy found")


def block_device(path: Path) -> str:
    """"MAJOR:MINOR" of the whole disk holding `path` (a partition's disk), as the blkio and io
    controllers name devices."""
    dev = os.stat(path).st_dev
    sysfs = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not sysfs.exists():
        raise OSError(f"{path} is on no block device ({os.major(dev)}:{os.minor(dev)})")
    if (sysfs / "partition").exists():
        return (sysfs.resolve().parent / "dev").read_text().strip()
    return f"{os.major(dev)}:{os.minor(dev)}"


class EngineCgroup:
    """One engine's cgroups under this process's own: memory, limited to `limit` bytes (None: no
    limit, for its peak usage), and with `read_bps`, reads from the disks holding `folders`
    limited to that many bytes per second. `error` says why none could be made (then nothing
    is made, and `command` leaves the command as it is)."""

    def __init__(self, name: str, limit: int | None, read_bps: int | None = None,
                 folders: Iterable[Path] = (), root: Path = CGROUP_ROOT,
                 proc: Path = Path("/proc/self/cgroup")):
        self.path: Path | None = None  # the memory cgroup's folder
        self.folders: list[Path] = []  # every folder made (v2: one for both)
        self.version = 0
        self.error = None
        try:
            own = own_cgroups(proc.read_text())
            base, self.version = cgroup_base("memory", own, root)
            self.path = self._make(base / name)
            if limit is not None:
                self._write(self.path, "memory.limit_in_bytes" if self.version == 1
                            else "memory.max", str(limit))
            if self.version == 2:
                self._write(self.path, "memory.swap.max", "0", missing_ok=True)
            if read_bps is not None:
                devices = sorted({block_device(f) for f in folders})
                io_base, io_version = cgroup_base("blkio", own, root)
                io = self.path if io_base == base else self._make(io_base / name)
                for dev in devices:
                    if io_version == 1:
                        self._write(io, "blkio.throttle.read_bps_device", f"{dev} {read_bps}")
                    else:
                        self._write(io, "io.max", f"{dev} rbps={read_bps}")
        except OSError as e:
            self.error = f"{type(e).__name__}: {e}"
            self.close()

    def _make(self, path: Path) -> Path:
        if path.exists():
            path.rmdir()
        path.mkdir()
        self.folders.append(path)
        return path

    @staticmethod
    def _write(folder: Path, name: str, value: str, missing_ok: bool = False) -> None:
        try:
            (folder / name).write_text(value)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def _read(self, name: str) -> str | None:
        try:
            return (self.path / name).read_text()
        except OSError:
            return None

    def command(self, cmd: list[str]) -> list[str]:
        """`cmd`, started inside the cgroups (it moves itself in, then execs)."""
        if not self.folders:
            return cmd
        moves = " && ".join(f"echo $$ > {shlex.quote(str(f / 'cgroup.procs'))}"
                            for f in self.folders)
        return ["/bin/sh", "-c", f'{moves} && exec "$@"', "sh", *cmd]

    def peak(self) -> int | None:
        if self.path is None:
            return None
        v = self._read("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak")
        return int(v) if v and v.strip().isdigit() else None

    def oom_kills(self) -> int:
        if self.path is None:
            return 0
        text = self._read("memory.oom_control" if self.version == 1 else "memory.events") or ""
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def close(self) -> None:
        """Remove the cgroups (their processes gone: retried for up to 5 s each)."""
        for folder in reversed(self.folders):
            for _ in range(50):
                try:
                    folder.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
        self.folders, self.path = [], None


# ----------------------------------------------------------------------------- workers


def run_contained(name: str, cmd: list[str], folders: Iterable[Path], ram: int | None = None,
                  read_bps: int | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """`cmd` with the page cache of `folders` (folders or files) emptied first, in a process
    and cgroups of its own named `name` (memory limited to `ram`, reads from the disks holding
    `folders` to `read_bps`, where given). Returns its completed process (output captured) and
    {"cgroup_peak_bytes", "cgroup_error", "oom_kills"}."""
    folders = [Path(f) for f in folders]
    for f in folders:
        drop_page_cache(f)
    group = EngineCgroup(f"mlx_flash_bench_{os.getpid()}_{name}", ram, read_bps, folders)
    try:
        done = subprocess.run(group.command(cmd), capture_output=True, text=True)
        peak, kills = group.peak(), group.oom_kills()
    finally:
        group.close()
    return done, {"cgroup_peak_bytes": peak, "cgroup_error": group.error, "oom_kills": kills}


def killed(done: subprocess.CompletedProcess, cgroup: dict) -> bool:
    """Whether the kernel killed the process (SIGKILL: the memory cgroup's OOM killer)."""
    return (done.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)
            or bool(cgroup["oom_kills"]))


def last_error(done: subprocess.CompletedProcess) -> str:
    return (done.stderr.strip().splitlines() or ["no output"])[-1]


def run_worker(script: Path, spec: dict, folders: Iterable[Path], ram: int | None = None,
               read_bps: int | None = None, check: bool = False) -> dict:
    """One engine: the page cache of `folders` emptied, then `script --worker SPEC` in a process
    and cgroups of its own (memory limited to `ram`, reads to `read_bps`, where given). Its row
    (the worker's last line) with "status": "ok"; else "status": "out of memory" (the kernel
    killed it) or "failed", with "error": its last line of errors; with `check`, a failure
    exits with its errors instead. Every row has "cgroup_peak_bytes" and "cgroup_error"."""
    r, cgroup = run_contained(spec["engine"], [sys.executable, str(script), "--worker",
                                               json.dumps(spec)], folders, ram, read_bps)
    kills = cgroup.pop("oom_kills")
    base = {"engine": spec["engine"], **cgroup}
    if r.returncode == 0 and not kills:
        return dict(json.loads(r.stdout.strip().splitlines()[-1]), **base, status="ok")
    if check:
        raise SystemExit(f"{spec['engine']} failed:\n{r.stderr[-3000:]}")
    if killed(r, dict(cgroup, oom_kills=kills)):
        return dict(base, status="out of memory", returncode=r.returncode, oom_kills=kills)
    return dict(base, status="failed", returncode=r.returncode, error=last_error(r))


def llama_cpp_row(gguf: Path, prompt: list[int], tokens: int, ram: int | None = None,
                  read_bps: int | None = None, threads: int = 1, mmap: bool = True,
                  repack: bool = True) -> dict:
    """llama.cpp decoding `tokens` greedily after the token ids `prompt` from the GGUF file
    `gguf` as it is (tools/llama_greedy.cpp), its page cache emptied first, in the same memory
    and blkio cgroups as our engines (run_contained): engine "llama.cpp" (memory-mapped, its
    default) or "llama.cpp --no-mmap" (read into memory). A row always comes back; its
    "status": "ok", "out of memory", "not built (python tools/llama_cpp.py build)" or
    "failed: <its last line of errors>". An ok row has "ms_per_token" (the median decode step;
    the first token, from the prompt's prefill, left out), "tokens" (all `tokens` ids),
    "load_seconds", "first_token_seconds" (load + prefill), "peak_rss_bytes",
    "model_rss_bytes" (peak RSS above the runner's RSS before loading), "read_bytes_per_token"
    (storage bytes read while decoding, /proc/self/io, over the decode steps), "load_read_bytes";
    "ffn_bytes_per_token" is None (llama.cpp counts no FFN reads of its own).
    `repack` False: llama.cpp's --no-repack (use_extra_bufts off). By default, as for a user,
    it repacks Q4_0, Q4_K, IQ4_NL and Q8_0 weights into memory of its own at load (faster
    CPU kernels), so those tensors are no longer pages of the mapped file even with mmap;
    Q4_1 (the default model) and F16/F32 are not repacked."""
    import llama_cpp

    engine = "llama.cpp" if mmap else "llama.cpp --no-mmap"
    row: dict[str, Any] = {"engine": engine, "ms_per_token": None, "ffn_bytes_per_token": None,
                           "io_ms": None, "mem_ms": None, "compute_ms": None}
    binary = llama_cpp.greedy_binary()
    if binary is None:
        return dict(row, status="not built (python tools/llama_cpp.py build)")
    cmd = [str(binary), str(gguf), ",".join(map(str, prompt)), str(tokens), str(threads),
           *([] if mmap else ["--no-mmap"]), *([] if repack else ["--no-repack"])]
    done, cgroup = run_contained("llama_cpp" if mmap else "llama_cpp_no_mmap", cmd, [gguf],
                                 ram, read_bps)
    row.update(cgroup_peak_bytes=cgroup["cgroup_peak_bytes"], cgroup_error=cgroup["cgroup_error"])
    if killed(done, cgroup):
        return dict(row, status="out of memory", returncode=done.returncode,
                    oom_kills=cgroup["oom_kills"])
    if done.returncode != 0:
        return dict(row, status=f"failed: {last_error(done)}", returncode=done.returncode)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    steps = out["decode_seconds"]
    return dict(row, status="ok", tokens=out["tokens"], decode_tokens=len(steps),
                ms_per_token=1e3 * statistics.median(steps) if steps else None,
                load_seconds=out["load_seconds"], prefill_seconds=out["prefill_seconds"],
                first_token_seconds=out["load_seconds"] + out["prefill_seconds"],
                peak_rss_bytes=out["peak_rss_bytes"],
                runtime_rss_bytes=out["rss_before_load_bytes"],
                model_rss_bytes=out["peak_rss_bytes"] - out["rss_before_load_bytes"],
                read_bytes_per_token=(out["read_bytes_decode"] / len(steps)
                                      if steps and out["read_bytes_decode"] >= 0 else None),
                load_read_bytes=out["read_bytes_load"], threads=threads, mmap=mmap,
                repack=out["repack"])


def serve_worker(worker: Callable[[dict], dict], spec: str) -> int:
    """The worker's side: run `worker` on the JSON `spec`, print its row as the last line."""
    print(json.dumps(worker(json.loads(spec))))
    return 0


def decode_imports() -> None:
    """Import what decode_row uses (MLX, mlx-lm's decoding loop, the RSS probes), so that
    neither a worker's load time nor its model's RSS counts them."""
    import mlx.core  # noqa: F401
    import mlx_lm.generate  # noqa: F401

    import mlx_flash.sysmem  # noqa: F401


def runtime_rss() -> int:
    """The worker's RSS before it loads its model (decode_row's imports done): the rest of its
    peak is the model's."""
    decode_imports()
    from mlx_flash.sysmem import rss_bytes

    return rss_bytes()


def decode_row(engine: str, model: Any, prompt: list[int], tokens: int, runtime: int,
               load_seconds: float) -> tuple[dict, list[int]]:
    """Decode `tokens` greedily after `prompt` and measure: ms per decode token (the median gap
    between consecutive tokens: the prompt's prefill left out), peak RSS and the model's part
    of it (above `runtime`: runtime_rss before loading), MLX's peak; and the tokens."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from mlx_flash.sysmem import peak_rss_bytes

    stamps, out = [], []
    t0 = time.perf_counter()
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=tokens):
        stamps.append(time.perf_counter())
        out.append(int(token))
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    peak = peak_rss_bytes()
    return {"engine": engine, "ms_per_token": 1e3 * statistics.median(gaps),
            "decode_tokens": len(gaps), "load_seconds": load_seconds, "peak_rss_bytes": peak,
            # from loading to the first token: load, the prompt's prefill, one step
            "first_token_seconds": load_seconds + stamps[0] - t0,
            "runtime_rss_bytes": runtime, "model_rss_bytes": peak - runtime,
            "mlx_peak_bytes": mx.get_peak_memory()}, out


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (what writing it wrote)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------- rounds


def interleaved(cases: list[Case], repeat: int, run: Callable[[Case], dict],
                line: Callable[[Case, dict], str]) -> dict[Case, list[dict]]:
    """Each case's rows over `repeat` rounds, interleaved (every case once, then every case
    again: the machine's drift spread over all), each printed as `  [round/repeat] LINE`. A
    case whose run fails (a row whose "status" is not "ok") is not run again."""
    got: dict[Case, list[dict]] = {case: [] for case in cases}
    for i in range(repeat):
        for case in cases:
            if any(r.get("status", "ok") != "ok" for r in got[case]):
                continue
            got[case].append(run(case))
            print(f"  [{i + 1}/{repeat}] {line(case, got[case][-1])}", flush=True)
    return got


def median_row(rounds: list[dict]) -> dict:
    """A case's row over its rounds: its median round's (by ms/token, the lower median), with
    every round's ms/token and the largest model RSS and cgroup peak of them."""
    ms = [r["ms_per_token"] for r in rounds]
    row = dict(next(r for r in rounds if r["ms_per_token"] == statistics.median_low(ms)))
    peaks = [r["cgroup_peak_bytes"] for r in rounds if r.get("cgroup_peak_bytes") is not None]
    row.update(ms_per_token_rounds=ms, model_rss_bytes=max(r["model_rss_bytes"] for r in rounds),
               cgroup_peak_bytes=max(peaks) if peaks else None)
    return row


# ----------------------------------------------------------------------------- output


def num(v: float | None, scale: float = 1.0, fmt: str = ".1f") -> str:
    """`v` times `scale` in `fmt`, or "–" for None."""
    return "–" if v is None else format(v * scale, fmt)


def md_table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    """A Markdown table's lines: the header, its rule, a line a row."""
    def line(cells: list[str]) -> str:
        return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"

    return [line(header), "|---" * len(header) + "|", *map(line, rows)]


def pyplot():
    """matplotlib.pyplot (headless), or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return None
    return plt


def engine_chart(runs: list[dict], path: Path) -> None:
    """A bar chart a run: each row's ms per decode token, by engine."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        rows = [r for r in run["rows"] if r.get("ms_per_token") is not None]  # those that ran
        ax.bar([r["engine"] for r in rows], [r["ms_per_token"] for r in rows], color="#4a7ab5")
        ax.set_title(f"{run['model']}: ms per decode token")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring's first line, the rest as the epilog."""
    return argparse.ArgumentParser(description=doc.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=doc.split("\n", 2)[2])


def add_output_args(p: argparse.ArgumentParser) -> None:
    """--json, --md, --png (see write_outputs) and the worker's hidden --worker."""
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--png", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def write_outputs(args: argparse.Namespace, runs: list[dict],
                  to_markdown: Callable[[dict], str],
                  to_chart: Callable[[list[dict], Path], None]) -> int:
    """The runs as --json ({"runs": [...]}), --md (one table a run) and --png, as asked."""
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs}, indent=2))
    if args.md:
        Path(args.md).write_text("\n\n".join(to_markdown(r) for r in runs) + "\n")
    if args.png:
        to_chart(runs, Path(args.png))
    return 0
