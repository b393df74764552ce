"""Benchmark the flash engine against dense, naive, mmap and hybrid engines, side by side.

    python tools/bench.py [--runs default,scale] [--quick] [--tokens N] [--json OUT]
                          [--md OUT] [--png OUT] [--engines E,...] [--repeat N]
                          [--read-mbps N|default] [--ram SIZE]
    python tools/bench.py --read-mbps default   # the read-bound regime (a Mac's proportions)
    python tools/bench.py --runs scale --engines naive,flash,flash-ahead --repeat 3
                                       # reading ahead on the scale run, side by side
    python tools/bench.py --big        # by hand: an OPT-shaped model 1.3x this machine's RAM
    python tools/bench.py --sweep [--quick] [--json OUT] [--md OUT] [--png OUT]
                                       # the budget curve: flash from its minimum budget to
                                       # 1.2x the model, against dense and naive

Engines, each in its own process and memory cgroup (tools/benchlib.py: so its peak RSS, and
the cgroup's peak usage, page cache included, are its own), all decoding the same prompt for
the same number of tokens; the page cache of the model's files is emptied before each, and
every engine that reads records reads them with the same threads (--threads; the paper, too,
credits its naive baseline with the storage's best throughput):

  dense   every weight in memory (mlx-lm on a dense folder; our OPT for OPT bundles)
  naive   attention resident; every FFN record read from flash every token (page cache bypassed)
  mmap    the same, but records copied out of a memory map: the OS page cache decides
  hybrid  the paper's hybrid: what the budget leaves holds FFN rows for good, the rest is read
          every token (page cache bypassed)
  flash   selection + sliding-window cache + bundled, coalesced, threaded reads in the budget
          (page cache bypassed)
  flash-q4  (default run) the same on a 4-bit bundle of the model: the GGUF's own Q4_1
          blocks, the down projection requantized to 4 bits along d
  flash-ahead  (--engines ...,flash-ahead) flash reading ahead (--lookahead): decoding, the
          next layer's likely records (the scale run's trace: exactly its selection) are read
          into its cache while its attention computes; the table says how much of flash's I/O
          wait it hid
  llama.cpp, llama.cpp --no-mmap  (default run) llama.cpp from the default model's GGUF as it
          is (Q4_1), memory-mapped (its default) and read into memory, one thread, the same
          prompt ids and token count (benchlib.llama_cpp_row, tools/llama_greedy.cpp: built
          by `python tools/llama_cpp.py build`; else a row saying so); its greedy tokens are
          compared with dense's (the same weights, other arithmetic: how many agree). The
          scale run's llama.cpp row says why it cannot run (no GGUF; no OPT in llama.cpp)

--read-mbps N (MB/s) or "default" (benchlib.DEFAULT_READ_MBPS, derived in
docs/BENCHMARKS.md from a Mac's SSD and decode speed) limits each engine's reads from the
model's disk, page faults included, with a blkio cgroup: the read-bound regime. Without it
reads run at this machine's disk speed (the compute-bound regime here). --ram SIZE limits
each engine's memory cgroup (page cache included; default runs: none): an engine killed there
is a row "out of memory" (the run goes on), and "llama.cpp --no-mmap" runs only where its GGUF
fits the limit (else its row says so).

Runs:
  default  the embedded default model (SwiGLU) with its calibrated selection mode, budget 75%
           of its bundle
  scale    an OPT-6.7B-shaped ReLU bundle (d 4096, FFN 16384, float16, 4 layers: ~1.1 GB of
           FFN records; synthetic weights), trace-driven: each token's active neurons follow
           OPT's statistics from the paper (10% active, a 5-token window holding ~24% of the
           FFN, ~2.4% new per token); budget 50% of its bundle
  big      (--big) the scale model with enough layers to be 1.3x this machine's RAM, budget 50%
           of RAM

The sweep (--sweep; runs "default-sweep" and "scale-sweep", --runs picks among default,scale):
flash decodes each model at budgets from the plan's minimum evenly up to 1.2x what the model
needs whole (the plan's total: every neuron cache complete, read once at load, nothing read per
token), that total itself among them, each point in its own process with the model's page
cache emptied; dense and naive (memory budget "off", selection off) are its reference lines.
The default model's bundle is the one `generate --dtype bfloat16` uses (the platform's 16-bit
dtype, as its dense mlx-lm folder; calibrated on first use by calibrate_default). The whole
set runs --repeat times (3), interleaved; each point keeps its median round (its model RSS:
the largest), and a budget the engine fails at is listed as failed. --quick: 6 budgets, 12 /
6 tokens (about 10 minutes on a 2-core machine); else 9 budgets, 48 / 16 tokens. JSON:
{"runs": [{"model": "default-sweep"|"scale-sweep", "rows": [{"engine": "flash"|"dense"|"naive",
"budget_bytes": int|null, "ms_per_token", "ffn_bytes_per_token": float|null,
"model_rss_bytes", ...}], "failed": [...], "checks": {...}}]}.

Reports ms per decode token (median), FFN MB read per token, peak RSS (and the model's part of
it: peak minus the process's memory before loading the model; the JSON also has the cgroup's
peak, "cgroup_peak_bytes"), the per-token breakdown (flash I/O, cache management, the rest =
compute), as a Markdown table, JSON (--json) and a bar chart (--png, needs matplotlib).
Timings compare only within one run on one machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import benchlib
import numpy as np
from benchlib import ROOT, median_row, num

ENGINES = ("dense", "naive", "mmap", "hybrid", "flash", "flash-q4", "llama.cpp",
           "llama.cpp --no-mmap")  # and flash-ahead
LLAMA_ENGINES = ("llama.cpp", "llama.cpp --no-mmap")
# Why the scale run has no llama.cpp row: checked in llama.cpp 11434's src/llama-arch.cpp (no
# OPT among its architectures) and its convert_hf_to_gguf.py (no OPTForCausalLM).
SCALE_LLAMA_STATUS = ("cannot run: the scale model is a synthetic OPT written only as an "
                      "mlx_flash bundle, and llama.cpp has no OPT architecture to load a GGUF "
                      "of it")
SWEEP_TOP = 1.2  # the sweep's largest budget, as a multiple of what the model needs whole
BIG_ENGINES = ("naive", "mmap", "hybrid", "flash")  # dense cannot load a model over RAM
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
SHARED_TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-valid.txt"
TEST_TEXT = ROOT / "tests" / "data" / "wikitext-2-valid-slice.txt"
TRACE = {"active": 0.10, "keep": 0.6, "pool": 0.5, "cold": 0.05}  # tuned: see opt_like_trace


def opt_like_trace(n_layers: int, n: int, tokens: int, seed: int) -> list[list[np.ndarray]]:
    """Per layer, per token, the sorted ids of active neurons: 10% of `n`; 60% of a token's
    set carries over from the previous token, the rest comes from a hot half of the neurons
    (5% from the cold half). These numbers were tuned so that, as the paper reports for OPT,
    a 5-token window holds ~24% of the neurons and ~2.4% of them are new to it per token; the
    realized figures are measured and reported with the run."""
    rng = np.random.default_rng(seed)
    k = int(TRACE["active"] * n)
    out = []
    for _ in range(n_layers):
        order = rng.permutation(n)
        hot, cold = order[: int(TRACE["pool"] * n)], order[int(TRACE["pool"] * n):]
        prev = rng.choice(hot, k, replace=False)
        sets = []
        for _ in range(tokens):
            keep = rng.choice(prev, int(TRACE["keep"] * k), replace=False)
            rest = k - len(keep)
            n_cold = int(TRACE["cold"] * rest)
            fresh = rng.choice(np.setdiff1d(hot, keep), rest - n_cold, replace=False)
            chill = rng.choice(cold, n_cold, replace=False)
            prev = np.unique(np.concatenate([keep, fresh, chill]))
            sets.append(prev)
        out.append(sets)
    return out


def trace_stats(sets: list[list[np.ndarray]], n: int, window: int = 5) -> dict[str, float]:
    union, new = [], []
    for layer in sets:
        for t in range(window, len(layer)):
            before = np.unique(np.concatenate(layer[t - window:t]))
            new.append(len(np.setdiff1d(layer[t], before)) / n)
            union.append(len(np.unique(np.concatenate(layer[t - window + 1:t + 1]))) / n)
    active = np.mean([len(s) / n for layer in sets for s in layer])
    return {"active": float(active), "window_union": float(np.mean(union)),
            "new_per_token": float(np.mean(new))}


def build_synthetic_opt(out: Path, layers: int, d: int = 4096, ffn: int = 16384,
                        heads: int = 32, dtype: str = "float16", seed: int = 0) -> None:
    """An OPT-shaped bundle with random weights (scaled like a trained model's, so the
    activations stay finite), a byte-level tokenizer (the ReLU fixture's)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_flash.arch import get_architecture
    from mlx_flash.bundle import DTYPES, ITEMSIZE
    from mlx_flash.bundle_writer import BundleWriter
    from mlx_flash.loader import build_flash_model

    config = {"model_type": "opt", "vocab_size": 259, "hidden_size": d, "ffn_dim": ffn,
              "num_hidden_layers": layers, "num_attention_heads": heads,
              "max_position_embeddings": 2048, "word_embed_proj_dim": d,
              "do_layer_norm_before": True, "activation_function": "relu",
              "enable_bias": True, "tie_word_embeddings": True, "bos_token_id": 0,
              "eos_token_id": 0}
    arch = get_architecture(config)
    spec = arch.ffn_spec(config)
    mx.random.seed(seed)
    params = dict(tree_flatten(build_flash_model(arch, config, spec, None).parameters()))
    parts, record_bytes = spec.record_layout(dtype)
    with BundleWriter(out, architecture="opt", config=config, dtype=dtype,
                      source={"kind": "synthetic", "name": "OPT-6.7B-shaped, random"}) as w:
        for name, p in params.items():
            if name.endswith(("layer_norm.weight", "norm.weight")):
                value = mx.ones(p.shape)
            elif name.endswith("bias"):
                value = mx.zeros(p.shape)
            else:
                value = mx.random.normal(p.shape) * p.shape[-1] ** -0.5
            w.add_resident(name, value)
        w.add_family("neuron", ffn, parts, record_bytes)
        # a record's padding is zeros, as every writer leaves it (its CRC32 counts them)
        used = np.zeros(record_bytes, dtype=bool)
        for part in parts:
            used[part.offset:part.offset + part.nbytes] = True
        used = mx.array(used)
        for layer in range(layers):
            weights = mx.random.normal((ffn, record_bytes // ITEMSIZE[dtype])) * d ** -0.5
            records = mx.where(used, weights.astype(DTYPES[dtype]).view(mx.uint8), 0)
            mx.eval(records)
            w.write_segment("neuron", layer, records)
        for f in (ROOT / "tests" / "data" / "relu-opt").glob("tokenizer*.json"):
            shutil.copy(f, w.tokenizer_dir / f.name)
        w.commit()


# ----------------------------------------------------------------------------- workers


def worker(spec: dict) -> dict:
    """Run one engine in this process: load, decode, measure."""
    benchlib.decode_imports()  # before the clock starts
    engine_name, path = spec["engine"], spec["path"]
    t0 = time.perf_counter()
    flash = None
    if engine_name == "dense" and spec["dense_mlx_lm"]:
        from mlx_lm import load

        runtime = benchlib.runtime_rss()
        model, _ = load(path)
    elif engine_name == "dense":
        from mlx_flash.loader import load_dense

        runtime = benchlib.runtime_rss()
        model = load_dense(path, spec["compute_dtype"])
    else:
        from mlx_flash.bundle import Bundle
        from mlx_flash.loader import EngineOptions, open_model

        bundle = Bundle.open(path)
        trace = None
        flash_engine = engine_name.startswith("flash")
        if flash_engine and spec.get("trace"):  # stands in for a predictor: made
            # before measuring, as generating it takes transient memory a predictor does not
            fam = bundle.families["neuron"]
            trace = opt_like_trace(fam.layers, fam.count, 64, seed=0)
        runtime = benchlib.runtime_rss()
        options = EngineOptions(  # "off": no caches, every token reads what it selects
            memory_budget=spec["budget"] if engine_name == "hybrid" or flash_engine else "off",
            window=spec["window"] if flash_engine else 10**9,
            context=spec["context"], threads=spec["threads"],
            cold=engine_name != "mmap", use_mmap=engine_name == "mmap")
        # flash: the bundle's calibrated mode (None) unless the run names one
        sparsity = spec["sparsity"] if flash_engine else "off"
        # quantized bundles compute in the loader's choice (float32 on MLX's CPU backend)
        compute = None if engine_name == "flash-q4" else spec["compute_dtype"]
        if spec.get("probe"):  # the sweep's range: the mode's minimum (no budget: nothing
            # switches it), and the least budget that holds the model whole (a budget that
            # does computes the bundle's default mode densely: the dense FFN's records whole)
            plans = [open_model(bundle, compute, sparsity, dataclasses.replace(
                options, memory_budget=budget)).flash.plan for budget in (None, 2**50)]
            return {"minimum": plans[0].minimum, "total": max(p.total for p in plans)}
        options.lookahead = engine_name == "flash-ahead"
        model = open_model(bundle, compute, sparsity, options)
        flash = model.flash
        if options.cold and not flash.plan.whole:  # as mlx_flash.load fits cold reads
            from mlx_flash.disk_probe import tune_reads

            tune_reads(flash, options.threads)
        if trace is not None:
            from mlx_flash.selection import Trace

            flash.mode = Trace(flash.spec, bundle.families, trace)
            # selections in slices of the staging matrix, as the engine sets its own mode's
            # (at the scale model's minimum, without caches, 1638 rows did not fit its 1023)
            flash.mode.rows_per_fetch = flash.dense.rows_per_fetch
    row, tokens = benchlib.decode_row(engine_name, model, spec["prompt_ids"], spec["tokens"],
                                      runtime, time.perf_counter() - t0)
    row.update(ffn_bytes_per_token=None, io_ms=None, mem_ms=None, compute_ms=None,
               tokens=tokens)
    if flash is not None:
        d = flash.stats.decode
        row.update(ffn_bytes_per_token=d.bytes / d.tokens,
                   needed_bytes_per_token=d.needed_bytes / d.tokens,
                   io_ms=1e3 * d.io_seconds / d.tokens,
                   ahead_ms=1e3 * d.ahead_seconds / d.tokens, read_ahead=flash.read_ahead,
                   mem_ms=1e3 * d.mem_seconds / d.tokens, read_calls=flash.read_calls,
                   cache_hit_rate=flash.cache_stats().hit_rate,
                   read_mb_per_s=d.bytes / max(d.io_seconds, 1e-9) / 1e6,
                   mean_read_bytes=d.bytes / max(flash.read_calls, 1),
                   plan_bytes=flash.plan.total, cache_bytes=flash.plan.cache_bytes,
                   caches_complete=bool(flash.caches) and all(
                       c.complete for c in flash.caches.values()))
        row["compute_ms"] = row["ms_per_token"] - row["io_ms"] - row["mem_ms"]
    return row


def run_engine(folder: Path, spec: dict, fail: bool = True, read_bps: int | None = None,
               ram: int | None = None) -> dict:
    """One engine in a process (and memory cgroup) of its own, its model's page cache emptied
    first, its reads limited to `read_bps` and its memory to `ram` where given. When it
    fails: exit, or with `fail` False, its row with "error" or "status"."""
    return benchlib.run_worker(Path(__file__), dict(spec, path=str(folder)), [folder],
                               ram=ram, read_bps=read_bps, check=fail)


def run_engines(folders: dict[str, Path], base: dict, engines: list[str], repeat: int = 1,
                read_bps: int | None = None, ram: int | None = None) -> list[dict]:
    """Each engine in its own process, `repeat` rounds interleaved, each its median round
    (a row that did not run: its last round, saying why; under `ram` an engine that fails
    does not end the run). llama.cpp runs from folders["gguf"] where there is one, else its
    row is base["llama_status"]; --no-mmap only where the file fits `ram`."""
    engines = [e for e in engines if e != "flash-q4" or e in folders]  # a 4-bit bundle or not
    llama = [e for e in engines if e in LLAMA_ENGINES]
    if llama and "gguf" not in folders:
        engines = [e for e in engines if e not in LLAMA_ENGINES]

    def run(engine: str) -> dict:
        if engine == "llama.cpp --no-mmap" and ram is not None and (
                size := folders["gguf"].stat().st_size) > ram:
            return {"engine": engine, "ms_per_token": None, "status": f"does not fit: its "
                    f"model file is {size / 1e6:.0f} MB, the limit {ram / 1e6:.0f} MB"}
        if engine in LLAMA_ENGINES:
            return benchlib.llama_cpp_row(folders["gguf"], base["prompt_ids"], base["tokens"],
                                          ram=ram, read_bps=read_bps,
                                          mmap=engine == "llama.cpp")
        return run_engine(folders.get(engine, folders["bundle"]), dict(base, engine=engine),
                          fail=ram is None, read_bps=read_bps, ram=ram)

    def line(engine: str, row: dict) -> str:
        if row["status"] != "ok":
            return f"{engine}: {row['status']}"
        return f"{engine}: {row['ms_per_token']:.1f} ms/token"

    got = benchlib.interleaved(engines, repeat, run, line)
    rows = [median_row(rounds) if rounds[-1]["status"] == "ok" else rounds[-1]
            for rounds in got.values()]
    if llama and "gguf" not in folders:
        rows += [{"engine": e, "status": base["llama_status"], "ms_per_token": None}
                 for e in llama]
    compare_tokens(rows)
    return rows


def compare_tokens(rows: list[dict]) -> None:
    """Each row's greedy tokens against the reference's (dense, else naive):
    "tokens_agree" (how many of the first tokens are the same before the first difference)
    and "tokens_equal"."""
    ref = next((r for name in ("dense", "naive") for r in rows
                if r["engine"] == name and r.get("tokens")), None)
    for r in rows:
        if ref is not None and r.get("tokens"):
            same = next((i for i, (a, b) in enumerate(zip(r["tokens"], ref["tokens"],
                                                          strict=False)) if a != b),
                        min(len(r["tokens"]), len(ref["tokens"])))
            r.update(tokens_reference=ref["engine"], tokens_agree=same,
                     tokens_equal=r["tokens"] == ref["tokens"])


# ----------------------------------------------------------------------------- runs


def calibrated_copy(src: Path, bundle: Path, tokens: int) -> None:
    """`bundle`: a copy of `src` calibrated with its default mode (made once)."""
    from mlx_flash.calibrate import calibrate

    if bundle.exists():
        return
    tmp = bundle.parent / f".{bundle.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    calibrate(tmp, SHARED_TEXT if SHARED_TEXT.exists() else TEST_TEXT, tokens=tokens)
    tmp.rename(bundle)


def prepare_default(work: Path, quick: bool) -> tuple[Path, Path, Path, int]:
    """The default model's bundle and its 4-bit bundle (the GGUF's own Q4_1 blocks; the down
    projection requantized to 4 bits along d), each calibrated with its default mode, and a
    dense mlx-lm folder of the same weights as the first."""
    from mlx_flash.bundle import Bundle
    from mlx_flash.calibrate import default_bundle
    from mlx_flash.convert import convert
    from mlx_flash.loader import default_dtype
    from mlx_flash.paths import default_model_source

    dtype = default_dtype()
    tokens = 512 if quick else 4096
    bundle = work / f"default-{dtype}-cal{tokens}"
    calibrated_copy(default_bundle(dtype), bundle, tokens)
    q4 = work / f"default-q4-cal{tokens}"
    if not q4.exists():
        shutil.rmtree(work / "default-q4", ignore_errors=True)
        convert(default_model_source(), work / "default-q4", dtype=None,
                keep_quantization=True, down_bits=4)
    calibrated_copy(work / "default-q4", q4, tokens)
    b = Bundle.open(bundle)
    return bundle, q4, dense_folder(work, dtype), b.resident_bytes + b.ffn_bytes


def dense_folder(work: Path, dtype: str) -> Path:
    """An mlx-lm folder of the default model's weights in `dtype` (made once)."""
    from mlx_flash.convert import export_mlx_lm
    from mlx_flash.paths import default_model_source

    dense = work / f"default-{dtype}-dense"
    if not dense.exists():
        export_mlx_lm(default_model_source(), dense, dtype=dtype)
    return dense


def default_base(bundle: Path, tokens: int, budget: int, threads: int, compute: str) -> dict:
    """The default run's worker spec: the chat prompt, the bundle's calibrated mode."""
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(bundle / "tokenizer")
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                  add_generation_prompt=True)
    return {"tokens": tokens, "prompt_ids": ids, "budget": budget, "window": 5,
            "context": len(ids) + tokens + 8, "threads": threads, "sparsity": None,
            "dense_mlx_lm": True, "trace": False, "compute_dtype": compute,
            "llama_status": None}


def scale_base(tokens: int, budget: int, threads: int, compute: str) -> dict:
    """The scale (and big) runs' worker spec: trace-driven, our OPT as dense."""
    return {"tokens": tokens, "prompt_ids": [0, 87, 104, 111], "budget": budget, "window": 5,
            "context": 64, "threads": threads, "sparsity": None, "dense_mlx_lm": False,
            "trace": True, "compute_dtype": compute, "llama_status": SCALE_LLAMA_STATUS}


def prepare_scale(work: Path, layers: int, name: str) -> tuple[Path, int]:
    from mlx_flash.bundle import Bundle

    bundle = work / name
    if not bundle.exists():
        print(f"building {bundle} ({layers} layers)...", flush=True)
        build_synthetic_opt(bundle, layers)
    b = Bundle.open(bundle)
    return bundle, b.resident_bytes + b.ffn_bytes


def table(run: dict) -> str:
    naive = next((r["ms_per_token"] for r in run["rows"]
                  if r["engine"] == "naive" and r.get("status", "ok") == "ok"), None)
    regime = (f"reads limited to {run['read_mbps']:g} MB/s (read-bound)" if run.get("read_mbps")
              else "reads unthrottled") + (f", memory limited to {run['ram_bytes'] / 1e6:.0f} MB"
                                           if run.get("ram_bytes") else "")
    lines = [f"**{run['model']}** — budget {run['budget_bytes'] / 1e6:.0f} MB, "
             f"{run['tokens']} tokens, computed in {run.get('compute_dtype', 'the bundle dtype')}"
             f", {regime}", "", *benchlib.md_table(
                 ["engine", "ms/token", "vs naive", "MB read/token", "read stall ms (share)",
                  "cache ms", "compute ms", "first token s", "peak RSS MB (model)",
                  "cgroup peak MB",
                  "tokens as " + next((r["tokens_reference"] for r in run["rows"]
                                        if r.get("tokens_reference")), "dense"), "status"],
                 map(table_cells, run["rows"], [naive] * len(run["rows"])))]
    if any(r["engine"] in LLAMA_ENGINES and r.get("status") == "ok" for r in run["rows"]):
        lines += ["", "llama.cpp's MB read/token: bytes its process read from storage while "
                  "decoding (/proc/self/io), over its decode steps; its model is Q4_1, ours "
                  f"{run.get('compute_dtype')}: its arithmetic differs, so its tokens agree only "
                  "so far"]
    flash = next((r for r in run["rows"] if r["engine"] == "flash"), None)
    if flash and flash.get("read_calls"):
        lines.append("")
        lines.append(f"flash: cache hit rate {flash['cache_hit_rate']:.1%}; reads averaged "
                     f"{flash['mean_read_bytes'] / 1024:.1f} KiB at "
                     f"{flash['read_mb_per_s']:.0f} MB/s"
                     + (f" (flash_profile, {run['profile']['chunk_kib']} KiB with "
                        f"{run['profile']['threads']} threads: {run['profile']['mb_per_s']:.0f} "
                        "MB/s)" if run.get("profile") else ""))
    q4 = next((r for r in run["rows"] if r["engine"] == "flash-q4"), None)
    if flash and q4:
        need, read = (q4[k] / flash[k] for k in ("needed_bytes_per_token",
                                                   "ffn_bytes_per_token"))
        lines.append(f"flash-q4: {flash['ms_per_token'] / q4['ms_per_token']:.2f}× the speed "
                     f"of flash on the {run.get('compute_dtype', '')} bundle; its selection "
                     f"needs {need:.2f}× the bytes per token, and in the same budget its "
                     f"window holds more of them: it reads {read:.2f}× the bytes")
    ahead = next((r for r in run["rows"] if r["engine"] == "flash-ahead"), None)
    if flash and ahead:
        lines.append(f"flash-ahead: I/O waited {ahead['io_ms']:.1f} ms/token against flash's "
                     f"{flash['io_ms']:.1f} ({1 - ahead['io_ms'] / flash['io_ms']:.0%} of it "
                     f"hidden), {ahead['ahead_ms']:.1f} ms/token read in the background while "
                     f"attention computed; {ahead['ffn_bytes_per_token'] / 1e6:.1f} MB read "
                     f"per token against {flash['ffn_bytes_per_token'] / 1e6:.1f}; "
                     f"{ahead['ms_per_token']:.1f} against {flash['ms_per_token']:.1f} ms/token"
                     + (f", {naive / ahead['ms_per_token']:.2f}× naive against "
                        f"{naive / flash['ms_per_token']:.2f}×" if naive else ""))
    if run.get("trace"):
        t = run["trace"]
        lines.append(f"trace: {t['active']:.1%} of neurons active per token, a 5-token window "
                     f"holds {t['window_union']:.1%}, {t['new_per_token']:.2%} new per token")
    return "\n".join(lines)


def table_cells(r: dict, naive: float | None) -> list[str]:
    """A row of table(): llama.cpp's "MB read" is what its process read from storage while
    decoding; ours, the FFN records read."""
    if r.get("status", "ok") != "ok":
        return [r["engine"], *["–"] * 10, r["status"]]
    read = r["ffn_bytes_per_token"]
    if r["engine"] in LLAMA_ENGINES:
        read = r.get("read_bytes_per_token")
    stall = "–" if r.get("io_ms") is None else (
        f"{r['io_ms']:.1f} ({r['io_ms'] / r['ms_per_token']:.0%})")
    agree = "–" if r.get("tokens_agree") is None else (
        f"{r['tokens_agree']}/{len(r['tokens'])}" + (" (equal)" if r["tokens_equal"] else ""))
    return [r["engine"], f"{r['ms_per_token']:.1f}",
            "–" if not naive else f"{naive / r['ms_per_token']:.2f}×", num(read, 1e-6, ".2f"),
            stall, num(r.get("mem_ms")), num(r.get("compute_ms")),
            num(r.get("first_token_seconds"), 1, ".2f"),
            f"{r['peak_rss_bytes'] / 1e6:.0f} ({r['model_rss_bytes'] / 1e6:.0f})",
            num(r.get("cgroup_peak_bytes"), 1e-6, ".0f"), agree, "ok"]


def profile_figure(mean_read: float, threads: int) -> dict | None:
    """flash_profile's MB/s for the chunk size nearest the engine's mean read."""
    path = ROOT / "docs" / "flash_profile.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())["mb_per_s"]
    chunk = min(data, key=lambda c: abs(np.log2(int(c)) - np.log2(max(mean_read, 1))))
    t = min(data[chunk], key=lambda k: abs(int(k) - threads))
    return {"chunk_kib": int(chunk) >> 10, "threads": int(t), "mb_per_s": data[chunk][t]}


chart = benchlib.engine_chart


# ----------------------------------------------------------------------------- the sweep


def sweep_budgets(minimum: int, total: int, points: int) -> list[int]:
    """`points` budgets evenly from `minimum` to SWEEP_TOP x `total`, and `total` itself (the
    smallest budget that holds the model whole)."""
    even = np.linspace(minimum, SWEEP_TOP * total, max(points, 2)).astype(np.int64)
    return sorted({int(b) for b in even} | {int(total)})


def sweep_run(model: str, folders: dict[str, Path], base: dict, points: int,
              repeat: int) -> dict:
    """dense, naive and flash at each budget, `repeat` rounds interleaved, each point in its
    own process; a point's row is that of its median round, its model RSS the largest. A
    budget the engine cannot run at is left out of the rows, its error kept in "failed"."""
    bundle = folders["bundle"]
    plan = run_engine(bundle, dict(base, engine="flash", probe=True))
    budgets = sweep_budgets(plan["minimum"], plan["total"], points)
    print(f"{model}: {bundle.name}, minimum {plan['minimum'] / 1e6:.1f} MB, whole "
          f"{plan['total'] / 1e6:.1f} MB; budgets (MB) "
          f"{', '.join(f'{b / 1e6:.1f}' for b in budgets)}; {base['tokens']} tokens, "
          f"{repeat} round(s)", flush=True)
    cases = [("dense", None), ("naive", None)] + [("flash", b) for b in budgets]

    def line(case: tuple[str, int | None], row: dict) -> str:
        engine, budget = case
        if row["status"] != "ok":
            return f"{engine} @ {budget / 1e6:.1f} MB fails: {row.get('error', row['status'])}"
        return (engine + (f" @ {budget / 1e6:.1f} MB" if budget else "")
                + f": {row['ms_per_token']:.1f} ms/token, model RSS "
                f"{row['model_rss_bytes'] / 1e6:.1f} MB")

    got = benchlib.interleaved(cases, repeat, lambda case: run_engine(
        folders.get(case[0], bundle), dict(base, engine=case[0], budget=case[1]),
        fail=case[1] is None), line)
    failed = {budget: rounds[-1].get("error", rounds[-1]["status"])
              for (_, budget), rounds in got.items() if rounds[-1]["status"] != "ok"}
    rows = []
    for (engine, budget), rounds in got.items():
        if budget in failed:
            continue
        row = median_row(rounds)
        row.update(engine=engine, budget_bytes=budget)
        if budget is not None:
            row["rss_within_budget"] = row["model_rss_bytes"] <= budget
        rows.append(row)
    run = {"model": model, "bundle": bundle.name, "minimum_bytes": plan["minimum"],
           "whole_bytes": plan["total"], "tokens": base["tokens"],
           "compute_dtype": base["compute_dtype"], "repeat": repeat, "rows": rows,
           "failed": [{"engine": "flash", "budget_bytes": b, "error": e}
                      for b, e in failed.items()]}
    run["checks"] = sweep_checks(run)
    return run


def sweep_checks(run: dict) -> dict:
    """The issue's conditions, read off the medians: flash at the largest budget against dense,
    each flash point against the next smaller budget, model RSS against each budget."""
    flash = sorted((r for r in run["rows"] if r["engine"] == "flash"),
                   key=lambda r: r["budget_bytes"])
    ms = {r["engine"]: r["ms_per_token"] for r in run["rows"] if r["engine"] != "flash"}
    steps = [b["ms_per_token"] / a["ms_per_token"] for a, b in zip(flash, flash[1:], strict=False)]
    return {"largest_vs_dense": flash[-1]["ms_per_token"] / ms["dense"],
            "largest_vs_naive": flash[-1]["ms_per_token"] / ms["naive"],
            "worst_step": max(steps), "worst_step_budget_bytes":
                flash[1 + steps.index(max(steps))]["budget_bytes"],
            "rss_within_budget": all(r["rss_within_budget"] for r in flash)}


def sweep_table(run: dict) -> str:
    dense = next(r["ms_per_token"] for r in run["rows"] if r["engine"] == "dense")
    flash = sorted([r for r in run["rows"] if r["engine"] == "flash"] + run["failed"],
                   key=lambda r: r["budget_bytes"])
    cells, prev = [], None
    for r in [r for r in run["rows"] if r["engine"] != "flash"] + flash:
        b = r["budget_bytes"]
        head = [r["engine"], num(b, 1e-6), num(b, 1 / run["whole_bytes"], ".2f")]
        if "error" in r:
            cells.append([*head, f"fails: {r['error']}"] + [""] * 9)
            continue
        step = "–"
        if r["engine"] == "flash":
            step = "–" if prev is None else f"{r['ms_per_token'] / prev:.2f}×"
            prev = r["ms_per_token"]
        within = "–" if b is None else "yes" if r["rss_within_budget"] else "**no**"
        cells.append([*head, f"{r['ms_per_token']:.1f}", f"{r['ms_per_token'] / dense:.2f}×",
                      step, num(r["ffn_bytes_per_token"], 1e-6),
                      f"{r['model_rss_bytes'] / 1e6:.1f}", within,
                      num(r.get("cache_hit_rate"), 1, ".0%"), num(r["io_ms"]),
                      num(r["mem_ms"]), num(r["compute_ms"])])
    lines = [f"**{run['model']}** — {run['bundle']}, minimum {run['minimum_bytes'] / 1e6:.1f} "
             f"MB, whole {run['whole_bytes'] / 1e6:.1f} MB, {run['tokens']} tokens, "
             f"{run['repeat']} round(s), computed in {run['compute_dtype']}", "",
             *benchlib.md_table(["engine", "budget MB", "budget / whole", "ms/token", "vs dense",
                                 "vs next smaller budget", "FFN MB read/token", "model RSS MB",
                                 "RSS within budget", "cache hit rate", "I/O ms", "cache ms",
                                 "compute ms"], cells)]
    c = run["checks"]
    lines += ["", f"flash at the largest budget: {c['largest_vs_dense']:.2f}× dense's ms/token "
              f"({c['largest_vs_naive']:.2f}× naive's); slowest step up in budget: "
              f"{c['worst_step']:.2f}× (to {c['worst_step_budget_bytes'] / 1e6:.1f} MB); model "
              f"RSS within every budget: {'yes' if c['rss_within_budget'] else 'no'}"
              f" ({len(flash) - len(run['failed'])} flash points"
              + (f", {len(run['failed'])} failed" if run["failed"] else "") + ")"]
    return "\n".join(lines)


def sweep_chart(runs: list[dict], path: Path) -> None:
    plt = benchlib.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.2), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        flash = [r for r in run["rows"] if r["engine"] == "flash"]
        x = [r["budget_bytes"] / 1e6 for r in flash]
        ax.plot(x, [r["ms_per_token"] for r in flash], "o-", color="#4a7ab5", label="flash")
        for r in run["rows"]:
            if r["engine"] != "flash":
                ax.axhline(r["ms_per_token"], ls="--", label=r["engine"],
                           color="#444444" if r["engine"] == "dense" else "#c0504d")
        if run["failed"]:
            ax.plot([f["budget_bytes"] / 1e6 for f in run["failed"]], [0] * len(run["failed"]),
                    "x", color="#c0504d", ms=9, clip_on=False, label="flash fails")
        ax.axvline(run["whole_bytes"] / 1e6, ls=":", color="#888888",
                   label="model whole (every cache complete)")
        ax.set_xlabel("memory budget (MB)")
        ax.set_ylabel("ms per decode token")
        ax.set_ylim(bottom=0)
        ax.set_title(run["model"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def sweep_main(args: argparse.Namespace, work: Path, compute: str) -> int:
    from mlx_flash.calibrate import default_bundle

    points = args.points or (6 if args.quick else 9)
    repeat = args.repeat or 3
    runs = []
    for name in args.runs.split(","):
        if name == "default":  # generate --dtype bfloat16's bundle, calibrated on first use
            bundle = default_bundle(compute)
            base = default_base(bundle, args.tokens or (12 if args.quick else 48), 0,
                                args.threads, compute)
            folders = {"bundle": bundle, "dense": dense_folder(work, compute)}
        elif name == "scale":
            bundle, _ = prepare_scale(work, 4, "opt-shaped-4l")
            base = scale_base(args.tokens or (6 if args.quick else 16), 0, args.threads,
                              compute)
            folders = {"bundle": bundle}
        else:
            raise SystemExit(f"--sweep runs default and scale, not {name!r}")
        runs.append(sweep_run(f"{name}-sweep", folders, base, points, repeat))
        print(sweep_table(runs[-1]) + "\n", flush=True)
    return benchlib.write_outputs(args, runs, sweep_table, sweep_chart)


def main() -> int:
    p = benchlib.parser(__doc__)
    p.add_argument("--runs", default="default,scale", help="default, scale (comma-separated)")
    p.add_argument("--quick", action="store_true", help="few tokens, short calibration (CI)")
    p.add_argument("--big", action="store_true", help="the 1.3x-RAM run (by hand, slow)")
    p.add_argument("--sweep", action="store_true",
                   help="the budget curve: flash from its minimum budget to 1.2x the model")
    p.add_argument("--points", type=int, default=None,
                   help="--sweep: budgets evenly spaced (default 6, or 9; the model's own "
                        "size is added)")
    p.add_argument("--repeat", type=int, default=None,
                   help="rounds, interleaved; each point keeps its median (default: --sweep 3, "
                        "else 1)")
    p.add_argument("--tokens", type=int, default=None, help="decode tokens per engine")
    p.add_argument("--engines", default=None,
                   help=f"comma-separated (default {','.join(ENGINES)}; --big: "
                        f"{','.join(BIG_ENGINES)})")
    p.add_argument("--threads", type=int, default=8, help="read threads, every engine")
    p.add_argument("--read-mbps", type=benchlib.read_mbps, default=None, metavar="N|default",
                   help="limit each engine's reads from the model's disk to N MB/s (blkio "
                        "cgroup); 'default': the read-bound regime, "
                        f"{benchlib.DEFAULT_READ_MBPS:g} MB/s (docs/BENCHMARKS.md)")
    from mlx_flash.argtypes import size as size_arg  # light: no MLX

    p.add_argument("--ram", type=size_arg, default=None, metavar="SIZE",
                   help="each engine's memory cgroup limit, e.g. 600MB (default: none)")
    benchlib.add_output_args(p)
    p.add_argument("--moe", action="store_true",
                   help="the Mixture-of-Experts benchmark, tools/bench_moe.py (its options: "
                        "python tools/bench_moe.py --help)")
    if "--moe" in sys.argv[1:]:  # its own options (--layers, --ram, --budget, ...)
        return subprocess.call([sys.executable, str(Path(__file__).with_name("bench_moe.py")),
                                *(a for a in sys.argv[1:] if a != "--moe")])
    args = p.parse_args()
    if args.worker:
        return benchlib.serve_worker(worker, args.worker)
    work = benchlib.work_dir()
    engines = args.engines.split(",") if args.engines else list(
        BIG_ENGINES if args.big else ENGINES)
    # Every engine computes in the platform's fastest 16-bit type (float16 on Metal; bfloat16
    # on MLX's CPU backend, where float16 products are 2x slower), whatever the bundle stores.
    from mlx_flash.loader import default_dtype

    compute = default_dtype()
    runs = []
    names = ["big"] if args.big else args.runs.split(",")
    if args.sweep:
        return sweep_main(args, work, compute)
    for name in names:
        if name == "default":
            bundle, q4, dense, size = prepare_default(work, args.quick)
            tokens = args.tokens or (12 if args.quick else 48)
            budget = int(0.75 * size)
            base = default_base(bundle, tokens, budget, args.threads, compute)
            folders = {"bundle": bundle, "dense": dense, "flash-q4": q4}
            from mlx_flash.paths import default_model_source

            folders["gguf"] = default_model_source()  # llama.cpp's: the GGUF as it ships
        else:
            if name == "big":
                ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                per_layer = 16384 * (2 * 4096 + 8) * 2 + 4 * 4096 * 4096 * 2
                layers = int(1.3 * ram / per_layer) + 1
                free = shutil.disk_usage(work).free
                built = (work / f"opt-shaped-{layers}l").exists()
                if not built and free < 1.2 * layers * per_layer:
                    raise SystemExit(f"the big run needs {layers * per_layer / 1e9:.0f} GB of "
                                     f"disk; {free / 1e9:.0f} GB free")
                bundle, size = prepare_scale(work, layers, f"opt-shaped-{layers}l")
                budget = int(0.5 * ram)
            else:
                bundle, size = prepare_scale(work, 4, "opt-shaped-4l")
                budget = int(0.5 * size)
            tokens = args.tokens or (6 if args.quick or name == "big" else 16)
            base = scale_base(tokens, budget, args.threads, compute)
            folders = {"bundle": bundle}
        print(f"{name}: {bundle.name}, budget {budget / 1e6:.0f} MB, {tokens} tokens"
              + (f", reads limited to {args.read_mbps:g} MB/s" if args.read_mbps else "")
              + (f", memory limited to {args.ram / 1e6:.0f} MB" if args.ram else ""))
        run = {"model": name, "budget_bytes": budget, "bundle_bytes": size, "tokens": tokens,
               "compute_dtype": compute, "read_mbps": args.read_mbps, "ram_bytes": args.ram,
               "rows": run_engines(folders, base, engines, args.repeat or 1,
                                   benchlib.read_bps(args.read_mbps), args.ram)}
        flash = next((r for r in run["rows"] if r["engine"] == "flash"), None)
        if flash and flash.get("mean_read_bytes"):
            run["profile"] = profile_figure(flash["mean_read_bytes"], args.threads)
        if base["trace"]:
            from mlx_flash.bundle import Bundle

            b = Bundle.open(bundle)
            n = b.families["neuron"].count
            run["trace"] = trace_stats(opt_like_trace(len(b.families["neuron"].segments),
                                                      n, 64, 0), n)
        runs.append(run)
        print(table(run) + "\n", flush=True)
    return benchlib.write_outputs(args, runs, table, chart)


if __name__ == "__main__":
    sys.exit(main())
