"""One process against two pipeline ranks, on the MoE benchmark model, at a memory limit half
of what one process needs.

    python tools/bench_pipeline.py [--bundle PATH] [--limit SIZE] [--tokens N] [--rounds N]
                                   [--json OUT] [--md OUT]

The model: tools/bench_moe.py's bundle (Qwen3-30B-A3B's shape, 4 layers, 4-bit, cached under
~/.cache/mlx_flash/bench/), routed by its own random-weight routers (near uniform over each
layer's 128 experts: no trace), greedy.

1. What one process needs: the model whole (no budget: every expert held) in a memory cgroup
   without a limit: the cgroup's peak.
2. The limit: half of that (or --limit); the memory budget: the limit minus --headroom
   (default 384 MiB: what a process holds in its cgroup past its plan, measured here: the
   model whole 210 MB, a rank 259 MB; bench_moe's 640 MiB would leave one process under
   this limit less than its minimum).
3. Interleaved rounds of: `one`, one process in a cgroup with the limit and that budget; `two`,
   two ranks on this machine over the ring backend (127.0.0.1; started with the environment
   mlx.launch gives them, see `run_two`), each in a memory cgroup of its own with the limit
   and that budget, its layers only (mlx_flash's --pipeline).
   Every engine reads cold (page cache bypassed), its model's page cache emptied first.

Per engine and rank: ms per decode token (the median gap between tokens), experts and bytes
read per token, hit rate (1 - experts read / experts routed to, decode), cgroup peak, and the
ring hop: what one token's crossing costs between the ranks, measured after the decode as the
model does it (rank 1 sends the hidden state, rank 0 receives it, then both all_gather rank 0's
output), the median of 200.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

HEADROOM = "384MiB"  # a process's cgroup usage past its plan (see the docstring)
BUNDLE = Path.home() / ".cache/mlx_flash/bench/qwen3-30b-a3b-shaped-4l-v32000-bundle"
PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]
HOPS = 200


def ring_hop_seconds(group, hidden: int) -> float:
    """One token's crossing between two ranks, as a pipelined model makes it (median)."""
    import mlx.core as mx

    x = mx.zeros((1, 1, hidden), mx.float32)
    times = []
    for _ in range(HOPS):
        t0 = time.perf_counter()
        h = mx.distributed.send(x, 0) if group.rank() == 1 else mx.distributed.recv_like(x, 1)
        mx.eval(mx.distributed.all_gather(h)[:1])
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def cpu_seconds() -> float:
    """CPU time this process has used, every thread's."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(spec: dict) -> dict:
    """One process, or one rank (under mlx.launch): load, decode greedily, measure."""
    import mlx.core as mx

    import mlx_flash

    runtime = benchlib.runtime_rss()
    group = mx.distributed.init()
    pipelined = group if group.size() > 1 else None
    t0 = time.perf_counter()
    model, _ = mlx_flash.load(spec["bundle"], memory_budget=spec["budget"], cold=True,
                              pipeline_group=pipelined)
    cpu0 = cpu_seconds()
    row, tokens = benchlib.decode_row(spec["engine"], model, PROMPT, spec["tokens"], runtime,
                                      time.perf_counter() - t0)
    # the process's CPU time per token over the whole decode (prompt included): a rank's
    # includes what it spends waiting on the other's send
    cpu_per_token = (cpu_seconds() - cpu0) / (len(tokens) or 1)
    flash = model.flash
    d = flash.stats.decode
    k = int(flash.bundle.config["num_experts_per_tok"])
    row.update(tokens=tokens, rank=group.rank(), budget=spec["budget"],
               layers=None if flash.stage is None else [flash.stage.start, flash.stage.end],
               experts_per_token=d.records_read / d.tokens,
               ffn_bytes_per_token=d.bytes / d.tokens,
               hit_rate=1 - d.records_read / (d.tokens * k * len(flash.caches)),
               stall_ms_per_token=1e3 * d.io_seconds / d.tokens,
               cpu_ms_per_token=1e3 * cpu_per_token,
               ffn_ms_per_token=1e3 * (d.ffn_seconds + d.mem_seconds) / d.tokens,
               slots_per_layer=flash.plan.experts[0], plan_total=flash.plan.total,
               resident_bytes=flash.plan.resident)
    if pipelined is not None:
        from mlx_lm.generate import generation_stream

        mx.synchronize(generation_stream)
        row["ring_hop_ms"] = 1e3 * ring_hop_seconds(group, flash.bundle.config["hidden_size"])
        Path(spec["out"], f"rank{group.rank()}.json").write_text(json.dumps(row))
        mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))  # leave together
    return row


def free_port() -> int:
    """A port p with p and p+1 free (the ring's two ranks listen there)."""
    while True:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            try:
                b.bind(("127.0.0.1", a.getsockname()[1] + 1))
            except OSError:
                continue
            return a.getsockname()[1]


def run_two(spec: dict, limit: int | None) -> list[dict]:
    """Two ranks over the ring backend on 127.0.0.1, each moved into a memory cgroup of its
    own before it starts. They are started as mlx.launch starts them (MLX_RANK, MLX_HOSTFILE
    naming each rank's address), not by it: mlx.launch's loop forwarding the ranks' output
    spins on their always-writable stdin (0.8 to 0.9 of a core measured here, of 2)."""
    benchlib.drop_page_cache(Path(spec["bundle"]))
    groups = [benchlib.EngineCgroup(f"mlx_flash_bench_{os.getpid()}_rank{r}", limit)
              for r in (0, 1)]
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        hostfile = Path(out, "hosts.json")
        hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
        spec = dict(spec, out=out)
        env = dict(os.environ, MLX_HOSTFILE=str(hostfile), PYTHONPATH=str(benchlib.ROOT))
        procs = [subprocess.Popen(g.command([sys.executable, __file__, "--worker",
                                             json.dumps(spec)]),
                                  env=dict(env, MLX_RANK=str(r)), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
                 for r, g in enumerate(groups)]
        errors = [p.communicate()[1] for p in procs]
        peaks, kills = [g.peak() for g in groups], [g.oom_kills() for g in groups]
        for g in groups:
            g.close()
        rows = []
        for r in (0, 1):
            path = Path(out, f"rank{r}.json")
            base = {"engine": "two", "rank": r, "cgroup_peak_bytes": peaks[r],
                    "cgroup_error": groups[r].error}
            if path.exists() and not kills[r]:
                rows.append(dict(json.loads(path.read_text()), **base, status="ok"))
            else:
                rows.append(dict(base, status="out of memory" if kills[r] else "failed",
                                 error=(errors[r].strip().splitlines() or ["-"])[-1]))
    return rows


def main(argv: list[str] | None = None) -> int:
    from mlx_flash.sysmem import format_bytes, parse_size

    p = benchlib.parser(__doc__)
    p.add_argument("--bundle", default=str(BUNDLE))
    p.add_argument("--limit", default=None, help="the memory limit (default: half of what "
                   "one process holding the model whole peaks at)")
    p.add_argument("--headroom", default=HEADROOM, help="the limit minus this is each "
                   f"process's memory budget (default {HEADROOM})")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    benchlib.add_output_args(p)
    args = p.parse_args(argv)
    if args.worker:
        return benchlib.serve_worker(worker, args.worker)
    base = {"bundle": args.bundle, "tokens": args.tokens}
    script = Path(__file__)
    whole = benchlib.run_worker(script, dict(base, engine="whole", budget=None), [args.bundle],
                                check=True)
    limit = parse_size(args.limit) if args.limit else whole["cgroup_peak_bytes"] // 2
    budget = limit - parse_size(args.headroom)
    print(f"one process, the model whole: cgroup peak {format_bytes(whole['cgroup_peak_bytes'])}"
          f", {whole['ms_per_token']:.1f} ms/token; limit {format_bytes(limit)}, budget "
          f"{format_bytes(budget)}", flush=True)
    spec = dict(base, budget=budget)

    def run(case: str) -> dict:
        if case == "one":
            return benchlib.run_worker(script, dict(spec, engine="one"), [args.bundle], limit)
        ranks = run_two(dict(spec, engine="two"), limit)
        return dict(ranks[0], ranks=ranks, ms_per_token=ranks[0].get("ms_per_token", 0.0))

    def line(case: str, row: dict) -> str:
        rows = row.get("ranks", [row])
        return f"{case}: " + "; ".join(
            f"{r['status']} {r.get('ms_per_token', 0):.1f} ms/token, "
            f"{r.get('ffn_bytes_per_token', 0) / 1e6:.1f} MB/token, hit "
            f"{r.get('hit_rate', 0):.0%}, CPU {r.get('cpu_ms_per_token', 0):.0f} ms/token, "
            f"hop {r.get('ring_hop_ms', 0):.2f} ms" for r in rows)

    rounds = benchlib.interleaved(["one", "two"], args.rounds, run, line)
    result = {"whole": whole, "limit_bytes": limit, "budget_bytes": budget, "tokens": args.tokens,
              "rounds": {case: rows for case, rows in rounds.items()}}
    for case, rows in rounds.items():
        ok = [r for r in rows if r.get("status") == "ok"]
        result[f"{case}_median"] = benchlib.median_row(ok) if ok else None
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    exact = {tuple(r.get("tokens") or ()) for rows in rounds.values() for r in rows
             if r.get("status") == "ok"} | {tuple(whole["tokens"])}
    print(f"greedy tokens identical across every run: {len(exact) == 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
