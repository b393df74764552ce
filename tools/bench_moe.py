"""Benchmark the MoE expert engine against the naive engine, mlx-lm and llama.cpp, side by side.

    python tools/bench_moe.py [--quick] [--layers N] [--ram SIZE] [--read-mbps N|default]
                              [--budget SIZE] [--tokens N] [--naive-tokens N] [--rounds N]
                              [--gguf-only] [--json OUT] [--md OUT] [--png OUT]
    python tools/bench.py --moe ...    # the same

The model (tools/moe_model.py): Qwen3-30B-A3B's shape (mlx-lm `qwen3_moe`: hidden 2048, 128
experts, top-8, moe_intermediate_size 768, 32 heads, 4 KV heads, head_dim 128, norm_topk_prob)
with `--layers` of its 48 layers and a 32000-token vocabulary, 4-bit (group 64, bfloat16 scales
and biases, the routers 8-bit), whose weights are designed so that it routes by its own routers
(no substituted router: llama.cpp runs the same model) with the asked statistics: each layer's
top 25% of experts take --share of its routings in the long run (default 51%: what a Zipf
popularity of skew 0.6 gives) and consecutive tokens' expert sets a mean Jaccard of --jaccard
(0.3); --routing takes both from a trained model's measured routing (tools/moe_routing.py
--json). Greedy decoding walks a fixed cycle of the vocabulary with a wide margin. Written as
mlx-lm's `convert -q` writes it (a folder), converted to a bundle by mlx_flash's convert, and
as llama.cpp's converter lays a qwen3moe out in GGUF (Q4_1: the same dequantized weights), all
cached under ~/.cache/mlx_flash/bench/. --gguf-only writes only the GGUF (the 48-layer model
is 16.5 GB a copy) and our engines stream the experts from it. The routing is recorded on the
run (every decode token's experts in every layer) and printed with each run: top-25% share,
Jaccard, and Belady's hit rate at flash's slots per layer (the most any cache policy gets).

Engines, each in its own process (tools/benchlib.py), the page cache of the model's files
emptied before each:

  naive     memory budget "off": each token reads its k experts per layer anew
  flash     the expert engine in a memory budget (--budget; else --ram minus --headroom; else
            half of each layer's experts): per-layer expert caches, what a token routes to and
            the cache lacks is read, one record per expert from the converted bundle
  flash-src the same engine and budget, the experts read from the GGUF file (llama.cpp's, as
            it is: mlx_flash.gguf_index), MLX_FLASH_HOME emptied first so that its first use
            (the index written) is in its load time
  flash-ahead (only when --engines lists it) flash reading the next layer's likely experts
            ahead (load's lookahead=--lookahead, default k)
  mlx-lm    mlx-lm loading the whole folder (computing in float32, as our engine computes
            quantized models on MLX's CPU backend, so the outputs compare bit for bit)
  llama.cpp the GGUF with llama.cpp (benchlib.llama_cpp_row: memory-mapped, its default), fed
            the same token ids, greedy; "llama.cpp --no-mmap" (read into memory) where the
            GGUF fits --ram
With --gguf-only, naive and flash read the GGUF (flash-src is then flash) and mlx-lm is not run.

The flash engines' expert cache policy is --expert-policy's. Our engines read with `cold=True`
(the page cache bypassed). --ram SIZE runs each engine in a memory cgroup of its own limited to
SIZE (cgroup v1 `memory.limit_in_bytes`, or v2 `memory.max`): it counts the page cache too, so
an engine that maps or caches the model cannot hide there; one the kernel kills is listed as
"out of memory". Without --ram the cgroup is made without a limit, for its peak usage. Where
no cgroup can be made, the run says so and relies on the memory budget alone. --read-mbps N
(or "default": benchlib.DEFAULT_READ_MBPS) limits each engine's reads from the model's disk.

Reports per engine (the median of --rounds interleaved rounds): ms per decode token, experts
read per token, MB read per token (ours: expert bytes; llama.cpp: its process's storage reads),
hit rate (1 - experts read / experts routed to, decode), read stall per token, peak RSS and the
model's part of it, the cgroup's peak usage, and whether its greedy tokens equal mlx-lm's (else
naive's), over the tokens both decoded (llama.cpp: how many of N are equal), and how many follow
the design's cycle (the tokens its weights decode, over all decoded). naive and mlx-lm
decode --naive-tokens (their ms/token does not depend on the length), the others --tokens
(long enough for a cache to warm). JSON: {"runs": [{"model": "moe", "read_mbps", "routing",
..., "rows": [{"engine", "source", "budget_bytes", "decode_tokens", "ms_per_token",
"experts_per_token", "ffn_bytes_per_token", "hit_rate", "belady_hit_rate",
"stall_ms_per_token", "model_rss_bytes", "cgroup_peak_bytes", "exact", "status"}]}]}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import benchlib
import moe_model
import numpy as np
from benchlib import median_row, num

from mlx_flash.eviction import DEFAULT_POLICY, belady_hit_rate

LLAMA, LLAMA_NO_MMAP = "llama.cpp", "llama.cpp --no-mmap"
ENGINES = ("naive", "flash", "flash-src", "mlx-lm", LLAMA, LLAMA_NO_MMAP)
OPTIONAL = ("flash-ahead",)  # run only when --engines lists them
OURS = ("naive", "flash", "flash-src", "flash-ahead")  # mlx_flash engines
FLASH = ("flash", "flash-src", "flash-ahead")  # ours within the memory budget
SHORT = ("naive", "mlx-lm")  # decode --naive-tokens
# Qwen3-30B-A3B (config.json of Qwen/Qwen3-30B-A3B), the vocabulary cut to save time
QWEN3_30B_A3B = {
    "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
    "moe_intermediate_size": 768, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "max_position_embeddings": 40960, "tie_word_embeddings": False, "vocab_size": 32000,
    "bos_token_id": 1, "eos_token_id": 2,
}
PROMPT = [1, 412, 9051, 77, 3051, 18, 27000, 640]
# defaults: the top 25% of experts take 51% of routings in the long run (what Zipf popularity
# of skew 0.6 gave the trace this model replaces), consecutive tokens' Jaccard 0.3
SHARE, JACCARD = 0.51, 0.3
HEADROOM = 640 * 2**20  # --ram minus this is flash's budget: the process's runtime (Python,
# MLX, mlx-lm: ~420 MB RSS here) and what its libraries' pages charge to the cgroup


# ----------------------------------------------------------------------------- the model


def scale_config(layers: int, vocab: int) -> dict:
    return dict(QWEN3_30B_A3B, num_hidden_layers=layers, vocab_size=vocab)


def design(config: dict, share: float, jaccard: float, seed: int) -> moe_model.Design:
    return moe_model.tune(config["hidden_size"], config["num_experts"],
                          config["num_experts_per_tok"], config["vocab_size"], share, jaccard,
                          seed)


def prepare(work: Path, config: dict, chosen: moe_model.Design, gguf_only: bool
            ) -> dict[str, Path]:
    """The model's files, made once: {"gguf"} and, unless `gguf_only`, {"folder", "bundle"}."""
    from mlx_flash.convert import convert

    tag = (f"qwen3-30b-a3b-routed-{config['num_hidden_layers']}l-v{config['vocab_size']}-"
           f"b{chosen.beta:.4f}-r{chosen.rho:.4f}-s{chosen.seed}")
    paths = {"gguf": work / f"{tag}.gguf"}
    if not gguf_only:
        paths.update(folder=work / tag, bundle=work / f"{tag}-bundle")
    if not paths["gguf"].exists():
        print(f"writing {paths['gguf']} ...", flush=True)
        moe_model.write_gguf(paths["gguf"], config, chosen)
    if gguf_only:
        return paths
    if not paths["folder"].exists():
        print(f"writing {paths['folder']} ...", flush=True)
        moe_model.write_folder(paths["folder"], config, chosen)
    if not paths["bundle"].exists():
        print(f"converting to {paths['bundle']} ...", flush=True)
        tmp = paths["bundle"].with_name(f".{paths['bundle'].name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        convert(paths["folder"], tmp, dtype=None, progress=False)
        tmp.rename(paths["bundle"])
    return paths


def routing_targets(path: Path) -> tuple[float, float]:
    """tools/moe_routing.py --json's measurement: the mean over layers of the top-25% experts'
    share and of consecutive tokens' Jaccard."""
    data = json.loads(Path(path).read_text())
    return (float(np.mean([p["top25_share"] for p in data["popularity"]])),
            float(np.mean([r["jaccard_consecutive"] for r in data["reuse"]])))


def record_routing(model) -> list:
    """Wrap every MoE block's experts (mlx-lm's SwitchGLU or our ExpertSwitch) so that the
    indices its router chose are kept, one array per call, per layer (not evaluated here:
    kept by reference, read after decoding)."""
    import mlx.nn as nn

    class Recorder(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner, self.calls = inner, []

        def __call__(self, x, indices):
            self.calls.append(indices)
            return self.inner(x, indices)

    out = []
    for layer in model.layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and hasattr(mlp, "switch_mlp"):
            mlp.switch_mlp = Recorder(mlp.switch_mlp)
            out.append(mlp.switch_mlp)
    return out


def recorded_routing(recorders: list) -> tuple[np.ndarray, int]:
    """`[layers, positions, k]`: the experts of every position, the prompt's then each decoded
    token's; and where decoding starts (the first single-token call)."""
    calls = recorders[0].calls
    start = sum(c.size // c.shape[-1] for c in calls[:next(
        i for i, c in enumerate(calls) if c.size == c.shape[-1])])
    return np.stack([np.concatenate([np.array(c).reshape(-1, c.shape[-1]) for c in r.calls])
                     for r in recorders]), start


def belady_after(trace: np.ndarray, start: int, capacity: int) -> float:
    """Belady's MIN on one layer's `trace` (`[positions, k]`, the cache empty before position
    0) at `capacity` slots: its hit rate over positions `start` on. The prompt's positions
    warm the cache, one at a time, as the engines' prefill warms theirs (eviction.belady_hits
    counts every position)."""
    never = len(trace)
    following = np.full((len(trace) + 1, int(trace.max()) + 1), never)
    for t in range(len(trace) - 1, -1, -1):  # following[t][e]: e's first use after t
        following[t] = following[t + 1]
        following[t, trace[t]] = t
    following = following[1:]
    resident: set[int] = set()
    hits = 0
    for t, ids in enumerate(trace):
        need = set(ids.tolist())
        if t >= start:
            hits += len(need & resident)
        over = len(resident | need) - capacity
        if over > 0:
            spare = sorted(resident - need, key=lambda e: -following[t, e])
            resident -= set(spare[:over])
        resident |= need
    return hits / (len(trace[start:]) * trace.shape[1])


# ----------------------------------------------------------------------------- workers


def worker(spec: dict) -> dict:
    """One engine in this process: load, decode greedily recording the routing, measure."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    import mlx_flash

    engine = spec["engine"]
    runtime = benchlib.runtime_rss()  # every import done: what follows is the model's
    t0 = time.perf_counter()
    flash = None
    if engine == "mlx-lm":
        model, _ = load_model(Path(spec["folder"]))
        model.set_dtype(mx.float32)  # as our engine computes quantized models on the CPU
        mx.eval(model.parameters())
    else:
        # flash-src: the experts read from the GGUF, an empty MLX_FLASH_HOME, so that its
        # first use (the index written) is in the load time
        if engine == "flash-src":
            shutil.rmtree(spec["home"], ignore_errors=True)
            os.environ["MLX_FLASH_HOME"] = spec["home"]
        # flash-ahead: flash reading the next layer's likely experts ahead (--lookahead);
        # the others keep load's default
        ahead = {"lookahead": spec["lookahead"]} if engine == "flash-ahead" else {}
        model, _ = mlx_flash.load(spec["source"], memory_budget=spec["budget"], cold=True,
                                  threads=spec["threads"], context=spec["context"],
                                  expert_policy=spec["policy"], **ahead)
        flash = model.flash
    load_s = time.perf_counter() - t0
    recorders = record_routing(model)
    row, tokens = benchlib.decode_row(engine, model, spec["prompt"], spec["tokens"], runtime,
                                      load_s)
    routing, start = recorded_routing(recorders)
    row.update(tokens=tokens, routing=routing.tolist(), decode_from=start, experts_per_token=None,
               ffn_bytes_per_token=None, hit_rate=None, stall_ms_per_token=None,
               reads_per_expert=None, written_bytes=None)
    if flash is not None:
        d = flash.stats.decode
        records = sum(r.counters.records for r in flash.readers.values())
        row.update(experts_per_token=d.records_read / d.tokens,
                   ffn_bytes_per_token=d.bytes / d.tokens,
                   hit_rate=1 - d.records_read / (d.tokens * spec["k"] * len(recorders)),
                   reads_per_expert=flash.read_calls / max(records, 1),
                   written_bytes=sum(f.stat().st_size for f in Path(spec["home"]).rglob("*")
                                     if f.is_file()) if engine == "flash-src"
                   else benchlib.folder_bytes(Path(spec["source"])) if spec["converted"]
                   else None,
                   stall_ms_per_token=1e3 * d.io_seconds / d.tokens,
                   mem_ms_per_token=1e3 * d.mem_seconds / d.tokens,
                   ffn_ms_per_token=1e3 * d.ffn_seconds / d.tokens,
                   decode_tokens=d.tokens, read_mb_per_s=d.bytes / max(d.io_seconds, 1e-9) / 1e6,
                   whole_run_hit_rate=flash.cache_stats().hit_rate,
                   plan_budget=flash.plan.budget, plan_total=flash.plan.total,
                   slots_per_layer=max(flash.plan.capacity.get(next(iter(flash.plan.capacity)),
                                                               [0])))
    return row


def run_engine(spec: dict, folders: list[Path], ram: int | None,
               read_bps: int | None = None) -> dict:
    """One engine in a process (and memory cgroup) of its own, its files' page cache emptied
    first; with `read_bps`, its reads from the model's disk limited to that many bytes/s."""
    if spec["engine"] in (LLAMA, LLAMA_NO_MMAP):
        if spec["engine"] == LLAMA_NO_MMAP and ram and spec["gguf_bytes"] > ram:
            return {"engine": spec["engine"], "cgroup_peak_bytes": None, "cgroup_error": None,
                    "status": f"not run: the GGUF ({spec['gguf_bytes'] / 1e9:.2f} GB) is over "
                              f"--ram ({ram / 1e9:.2f} GB)"}
        return benchlib.llama_cpp_row(Path(spec["gguf"]), spec["prompt"], spec["tokens"], ram,
                                      read_bps, threads=spec["llama_threads"],
                                      mmap=spec["engine"] == LLAMA)
    return benchlib.run_worker(Path(__file__), spec, folders, ram, read_bps)


# ----------------------------------------------------------------------------- the run


FIELDS = ("engine", "source", "budget_bytes", "decode_tokens", "ms_per_token",
          "experts_per_token", "ffn_bytes_per_token", "hit_rate", "belady_hit_rate",
          "stall_ms_per_token", "model_rss_bytes", "cgroup_peak_bytes", "exact", "status")


def combine(engine: str, rounds: list[dict], budget: int | None) -> dict:
    """An engine's row: its median round (by ms/token), the largest model RSS and cgroup peak
    of its rounds; the first round's status where one was not "ok"."""
    bad = [r for r in rounds if r["status"] != "ok"]
    if bad:
        row = dict.fromkeys(FIELDS)
        row.update(bad[0], engine=engine, budget_bytes=budget, exact=None)
        row.pop("tokens", None)
        row.pop("routing", None)
        return row
    row = median_row(rounds)
    row.update(budget_bytes=budget, all_tokens=[r["tokens"] for r in rounds])
    return row


def agreement(tokens: list[list[int]], reference: list[int]) -> tuple[int, int]:
    """Tokens equal to the reference's over the positions both decoded, of how many (the
    worst round)."""
    pairs = [(sum(a == b for a, b in zip(t, reference, strict=False)),
              min(len(t), len(reference))) for t in tokens]
    return min(pairs, key=lambda p: p[0] - p[1])


def add_routing(row: dict, slots: int, chosen: moe_model.Design) -> None:
    """The routing measured on the run into the row: over the decoded tokens, the top-25%
    share and Jaccard (and the design's, simulated over as many tokens), Belady's hit rate at
    `slots` per layer (mean over layers; the cache warmed by the prompt), and the same from a
    cold cache (eviction.belady_hit_rate over the decoded tokens alone)."""
    trace, start = np.asarray(row.pop("routing")), row.pop("decode_from")
    decoded = trace[:, start:]
    row["routing"] = dict(moe_model.routing_stats(decoded, chosen.experts),
                          tokens=decoded.shape[1], slots=slots,
                          designed=moe_model.routing_stats(moe_model.simulate(
                              chosen, decoded.shape[1], len(trace)), chosen.experts),
                          belady_cold=float(np.mean([belady_hit_rate(list(layer), slots)
                                                     for layer in decoded])))
    row["belady_hit_rate"] = float(np.mean([belady_after(layer, start, slots)
                                            for layer in trace]))


def moe_run(args: argparse.Namespace, work: Path) -> dict:
    from mlx_flash.bundle import EXPERTS
    from mlx_flash.memory import expert_budget, expert_plan
    from mlx_flash.paths import resolve_model
    from mlx_flash.sysmem import format_bytes, parse_size

    layers = args.layers or (4 if args.quick else 8)
    tokens = args.tokens or (64 if args.quick else 128)
    short = min(tokens, args.naive_tokens or 16)
    llama_tokens = args.llama_tokens or tokens
    rounds = args.rounds or (1 if args.quick else 3)
    config = scale_config(layers, args.vocab)
    share, jaccard = routing_targets(args.routing) if args.routing else (args.share,
                                                                          args.jaccard)
    t0 = time.perf_counter()
    chosen = design(config, share, jaccard, args.seed)
    long_run = moe_model.routing_stats(moe_model.simulate(chosen, 2000, 4), config["num_experts"])
    print(f"routing design: beta {chosen.beta:.4f}, rho {chosen.rho:.4f} (tuned in "
          f"{time.perf_counter() - t0:.0f} s): simulated over 2000 tokens, top-25% share "
          f"{long_run['top25_share']:.1%} (target {share:.1%}), Jaccard "
          f"{long_run['jaccard']:.3f} (target {jaccard:.3f})", flush=True)
    paths = prepare(work, config, chosen, args.gguf_only)
    primary = paths["gguf" if args.gguf_only else "bundle"]
    source = resolve_model(primary)  # a GGUF's expert index is written here, once
    n, k = config["num_experts"], config["num_experts_per_tok"]
    fam = source.families[EXPERTS]
    prompt = PROMPT[-args.prompt_tokens:]
    context = len(prompt) + tokens + 8
    whole = expert_plan(source, 4, None, context).total  # computed in float32 (CPU)
    ram = parse_size(args.ram) if args.ram else None
    read_bps = int(args.read_mbps * 1e6) if args.read_mbps else None
    if args.budget:
        budget = parse_size(args.budget)
    elif ram is not None:
        budget = ram - parse_size(args.headroom)
    else:
        budget = expert_budget(source, 4, context, n // 2)
    slots = max(expert_plan(source, 4, budget, context).capacity[(EXPERTS, fam.tensors)])
    expert_bytes = fam.record_bytes * fam.count * layers
    gguf_bytes = paths["gguf"].stat().st_size
    print(f"moe: {primary.name}: {expert_bytes / 1e9:.2f} GB of experts "
          f"({fam.record_bytes / 1e6:.2f} MB each), the model whole {format_bytes(whole)} "
          f"(float32 compute); GGUF {gguf_bytes / 1e9:.2f} GB; flash budget "
          f"{format_bytes(budget)} ({slots} of {n} experts per layer); --ram "
          f"{format_bytes(ram) if ram else 'none'}; reads "
          f"{f'{args.read_mbps:g} MB/s' if read_bps else 'unlimited'}; {tokens} tokens "
          f"(naive, mlx-lm {short}), {rounds} round(s)", flush=True)
    engines = args.engines.split(",") if args.engines else list(ENGINES)
    engines = [LLAMA_NO_MMAP if e == "llama.cpp-no-mmap" else e for e in engines]
    unknown = set(engines) - set(ENGINES) - set(OPTIONAL)
    if unknown:
        raise SystemExit(f"unknown engines {sorted(unknown)}: {ENGINES + OPTIONAL}")
    skipped = {}
    if args.gguf_only:
        skipped = {"mlx-lm": "not run: --gguf-only (no mlx-lm folder written)",
                   "flash-src": "not run: --gguf-only (flash itself reads the GGUF)"}
    sources = {e: str(primary) for e in ("naive", "flash", "flash-ahead")}
    sources["flash-src"] = str(paths["gguf"])
    base = {"folder": str(paths.get("folder")), "gguf": str(paths["gguf"]),
            "gguf_bytes": gguf_bytes, "home": str(work / "flash-src-home"),
            "prompt": prompt, "context": context, "threads": args.threads,
            "llama_threads": args.llama_threads, "experts": n, "k": k,
            "lookahead": args.lookahead or k, "policy": args.expert_policy,
            "converted": not args.gguf_only}
    budgets = {"naive": "off", "mlx-lm": None, **dict.fromkeys(FLASH, budget)}
    files = list(paths.values())

    def line(engine: str, r: dict) -> str:
        what = (f"{r['ms_per_token']:.1f} ms/token, model RSS "
                f"{r['model_rss_bytes'] / 1e6:.0f} MB" if r["status"] == "ok"
                else r["status"] + (f" ({r['error']})" if r.get("error") else ""))
        peak = r.get("cgroup_peak_bytes")
        return f"{engine}: {what}" + (f", cgroup peak {peak / 1e6:.0f} MB" if peak else "")

    got = benchlib.interleaved(
        [e for e in engines if e not in skipped], rounds,
        lambda e: run_engine(dict(base, engine=e, budget=budgets.get(e),
                                  source=sources.get(e, str(paths.get("folder"))),
                                  tokens=short if e in SHORT else llama_tokens
                                  if e in (LLAMA, LLAMA_NO_MMAP) else tokens),
                         files, ram, read_bps),
        line)
    cgroup_error = next((r["cgroup_error"] for rs in got.values() for r in rs
                         if r.get("cgroup_error")), None)
    rows = []
    for engine in engines:
        if engine in skipped:
            rows.append(dict(dict.fromkeys(FIELDS), engine=engine, status=skipped[engine]))
            continue
        row = {**dict.fromkeys(FIELDS),
               **combine(engine, got[engine], budget if engine in FLASH else None)}
        row["source"] = ("llama.cpp's GGUF" if engine in (LLAMA, LLAMA_NO_MMAP, "flash-src")
                         or (engine in OURS and args.gguf_only) else
                         "bundle" if engine in OURS else "mlx-lm folder")
        if row["status"] == "ok" and engine in (LLAMA, LLAMA_NO_MMAP):
            row["ffn_bytes_per_token"] = row.get("read_bytes_per_token")
        if row["status"] == "ok" and "routing" in row:
            add_routing(row, row["slots_per_layer"] if engine in FLASH else slots, chosen)
        rows.append(row)
    by = {r["engine"]: r for r in rows if r["status"] == "ok"}
    reference = by.get("mlx-lm") or by.get("naive")
    for r in rows:
        if r["status"] != "ok" or reference is None or r is reference and "mlx-lm" not in by:
            continue
        equal, of = agreement(r["all_tokens"], reference["tokens"])
        r.update(exact=equal == of, tokens_equal=equal, tokens_compared=of,
                 exact_against=reference["engine"])
    walk = [chosen.successor(prompt[-1])]  # the tokens the design decodes: the cycle
    while len(walk) < tokens:
        walk.append(chosen.successor(walk[-1]))
    for r in by.values():
        r["on_cycle"], r["decoded"] = agreement(r["all_tokens"], walk)
    measured = by.get("flash", {}).get("routing") or next(
        (r["routing"] for r in by.values() if r.get("routing")), None)
    run = {"model": "moe", "gguf": paths["gguf"].name, "layers": layers, "experts": n, "k": k,
           "expert_bytes": expert_bytes, "record_bytes": fam.record_bytes,
           "gguf_bytes": gguf_bytes, "gguf_only": args.gguf_only,
           "whole_bytes": whole, "budget_bytes": budget, "ram_bytes": ram,
           "read_mbps": args.read_mbps, "slots_per_layer": slots, "tokens": tokens,
           "naive_tokens": short, "llama_tokens": llama_tokens, "prompt": prompt,
           "rounds": rounds, "threads": args.threads,
           "llama_threads": args.llama_threads, "expert_policy": args.expert_policy,
           "cgroup": cgroup_error or ("limited" if ram else "peak only"),
           "routing": {"share_target": share, "jaccard_target": jaccard,
                       "source": f"matching {Path(args.routing).name}" if args.routing
                       else "--share/--jaccard" if (share, jaccard) != (SHARE, JACCARD)
                       else "defaults", "beta": chosen.beta, "rho": chosen.rho,
                       "seed": args.seed, "design_2000_tokens": long_run,
                       "measured": measured},
           "rows": rows}
    for r in rows:
        r.pop("all_tokens", None)
    run["checks"] = checks(run)
    return run


def checks(run: dict) -> dict:
    """The issue's: flash's speed-up over naive and llama.cpp per token, flash's model RSS
    within its budget, output exact."""
    by = {r["engine"]: r for r in run["rows"] if r["status"] == "ok"}
    out = {}
    if "flash" in by:
        for other in ("naive", LLAMA):
            if other in by:
                out[f"flash_speedup_vs_{other}"] = (by[other]["ms_per_token"]
                                                    / by["flash"]["ms_per_token"])
        out["flash_rss_within_budget"] = by["flash"]["model_rss_bytes"] <= run["budget_bytes"]
    out["exact"] = all(r["exact"] for e, r in by.items()
                       if r.get("exact") is not None and e in OURS + ("mlx-lm",))
    return out


def table(run: dict) -> str:
    ram = f"--ram {run['ram_bytes'] / 1e9:.2f} GB" if run["ram_bytes"] else "no --ram"
    ram += (f", reads limited to {run['read_mbps']:g} MB/s" if run.get("read_mbps")
            else ", reads unlimited")
    naive = next((r["ms_per_token"] for r in run["rows"]
                  if r["engine"] == "naive" and r["status"] == "ok"), None)
    cells = []
    for r in run["rows"]:
        ok = r["status"] == "ok"
        exact = ("–" if r.get("exact") is None else
                 f"{r['tokens_equal']}/{r['tokens_compared']}" if r["engine"].startswith(LLAMA)
                 else "yes" if r["exact"] else f"**no** ({r['tokens_equal']}/"
                 f"{r['tokens_compared']})")
        cells.append([
            r["engine"], r.get("source") or "–", num(r.get("decode_tokens"), 1, ".0f"),
            num(r["ms_per_token"]),
            f"{naive / r['ms_per_token']:.2f}×" if ok and naive else "–",
            num(r["ffn_bytes_per_token"], 1e-6), num(r["hit_rate"], 1, ".0%"),
            num(r.get("belady_hit_rate"), 1, ".0%"), num(r["stall_ms_per_token"]),
            f"{r['peak_rss_bytes'] / 1e6:.0f} ({r['model_rss_bytes'] / 1e6:.0f})" if ok else "–",
            num(r["cgroup_peak_bytes"], 1e-6, ".0f"), num(r.get("first_token_seconds")),
            exact, f"{r['on_cycle']}/{r['decoded']}" if ok else "–", r["status"]])
    rt = run["routing"]
    m, d = rt.get("measured"), rt["design_2000_tokens"]
    lines = [f"**moe** — {run['gguf']}: {run['layers']} layers, {run['experts']} experts "
             f"(top-{run['k']}, {run['record_bytes'] / 1e6:.2f} MB each), "
             f"{run['expert_bytes'] / 1e9:.2f} GB of experts (GGUF "
             f"{run['gguf_bytes'] / 1e9:.2f} GB); flash budget "
             f"{run['budget_bytes'] / 1e6:.0f} MB ({run['slots_per_layer']} experts per layer, "
             f"policy {run['expert_policy']}); {ram} (cgroup: {run['cgroup']}); "
             f"{run['rounds']} round(s), medians", "",
             *benchlib.md_table(["engine", "experts from", "decode tokens", "ms/token",
                                 "vs naive", "MB read/token", "hit rate", "Belady",
                                 "read stall ms/token", "peak RSS MB (model)", "cgroup peak MB",
                                 "first token s", "tokens equal", "on the cycle", "status"],
                                cells),
             "", f"routing ({rt['source']}; beta {rt['beta']:.3f}, rho {rt['rho']:.3f}, seed "
             f"{rt['seed']}): designed (simulated, 2000 tokens) top-25% share "
             f"{d['top25_share']:.1%} (target {rt['share_target']:.1%}), Jaccard "
             f"{d['jaccard']:.2f} (target {rt['jaccard_target']:.2f})"
             + (f"; measured on flash's run ({m['tokens']} decode tokens) top-25% share "
                f"{m['top25_share']:.1%}, Jaccard {m['jaccard']:.2f} (the design simulated over "
                f"as many: {m['designed']['top25_share']:.1%}, {m['designed']['jaccard']:.2f}); "
                f"Belady: the hit rate of Belady's MIN at {m['slots']} slots per layer on the "
                f"routing measured, the cache warmed by the prompt (the most any policy gets; "
                f"from a cold cache {m['belady_cold']:.0%})" if m else "")]
    c = run["checks"]
    if "flash_speedup_vs_naive" in c:
        lines.append(f"checks: flash {c['flash_speedup_vs_naive']:.2f}× naive per token"
                     + (f", {c['flash_speedup_vs_llama.cpp']:.2f}× llama.cpp"
                        if "flash_speedup_vs_llama.cpp" in c else "")
                     + f"; flash's model RSS within its budget: "
                     f"{'yes' if c.get('flash_rss_within_budget') else '**no**'}; our output "
                     f"exact: {'yes' if c['exact'] else '**no**'}")
    return "\n".join(lines)


def chart(runs: list[dict], path: Path) -> None:
    """The engine chart (benchlib's), of the engines that ran, each run titled with its
    layers."""
    benchlib.engine_chart([{**run, "model": f"{run['model']} ({run['layers']} layers)",
                            "rows": [r for r in run["rows"] if r["status"] == "ok"]}
                           for run in runs], path)


def main(argv: list[str] | None = None) -> int:
    p = benchlib.parser(__doc__)
    p.add_argument("--quick", action="store_true", help="4 layers, 64 tokens, 1 round")
    p.add_argument("--layers", type=int, default=None, help="of Qwen3-30B-A3B's 48 (8)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tokens", type=int, default=None,
                   help="decode tokens of flash and llama.cpp (128; --quick 64)")
    p.add_argument("--naive-tokens", type=int, default=None,
                   help="decode tokens of naive and mlx-lm (16)")
    p.add_argument("--llama-tokens", type=int, default=None,
                   help="decode tokens of llama.cpp (default --tokens)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3)")
    p.add_argument("--prompt-tokens", type=int, default=len(PROMPT), choices=range(1, 9),
                   metavar="N", help="the prompt's last N tokens (8): at 48 layers and a slow "
                   "read limit a shorter prompt's prefill reads fewer experts")
    p.add_argument("--ram", default=None, help="each engine's memory cgroup limit, e.g. 2GB")
    p.add_argument("--read-mbps", type=benchlib.read_mbps, default=None,
                   help="limit each engine's reads from the model's disk to this many MB/s "
                   "(a blkio cgroup: buffered, direct and page-fault reads alike), or "
                   f"'default' ({benchlib.DEFAULT_READ_MBPS:g}): the regime where reads are "
                   "most of a token")
    p.add_argument("--budget", default=None,
                   help="flash's memory budget (default: --ram minus --headroom, else half "
                        "of each layer's experts)")
    p.add_argument("--headroom", default=str(HEADROOM),
                   help="--ram minus this is flash's budget (default 640 MiB)")
    p.add_argument("--engines", default=None,
                   help=f"comma-separated ({','.join(ENGINES + OPTIONAL)}; "
                        "llama.cpp-no-mmap for llama.cpp --no-mmap)")
    p.add_argument("--gguf-only", action="store_true",
                   help="write only the GGUF; our engines read the experts from it")
    p.add_argument("--threads", type=int, default=8, help="read threads")
    p.add_argument("--llama-threads", type=int, default=1, help="llama.cpp's threads")
    p.add_argument("--lookahead", type=int, default=None,
                   help="the flash-ahead engine's lookahead: the next layer's likely experts "
                        "read ahead (default: k)")
    p.add_argument("--expert-policy", default=DEFAULT_POLICY,
                   help=f"the flash engines' expert cache policy ({DEFAULT_POLICY})")
    p.add_argument("--share", type=float, default=SHARE,
                   help=f"the long-run share of routings to each layer's top 25%% of experts "
                        f"({SHARE})")
    p.add_argument("--jaccard", type=float, default=JACCARD,
                   help=f"the mean consecutive-token Jaccard of expert sets ({JACCARD})")
    p.add_argument("--routing", default=None,
                   help="tools/moe_routing.py --json's output: its measured top-25%% share and "
                        "Jaccard (over --share, --jaccard)")
    p.add_argument("--seed", type=int, default=0)
    benchlib.add_output_args(p)
    args = p.parse_args(argv)
    if args.worker:
        return benchlib.serve_worker(worker, args.worker)
    run = moe_run(args, benchlib.work_dir())
    print(table(run) + "\n", flush=True)
    return benchlib.write_outputs(args, [run], table, chart)


if __name__ == "__main__":
    sys.exit(main())
