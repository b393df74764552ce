"""Benchmark the MoE expert engine against the naive engine and mlx-lm, side by side.

    python tools/bench_moe.py [--quick] [--layers N] [--ram SIZE] [--budget SIZE]
                              [--tokens N] [--rounds N] [--json OUT] [--md OUT] [--png OUT]
    python tools/bench.py --moe ...    # the same

The model: Qwen3-30B-A3B's shape (mlx-lm `qwen3_moe`: hidden 2048, 128 experts, top-8,
moe_intermediate_size 768, 32 heads, 4 KV heads, head_dim 128, norm_topk_prob) with `--layers`
of its 48 layers and a 32000-token vocabulary, random weights, written as mlx-lm's
`convert -q` writes it (4-bit, group 64, bfloat16 scales and biases, the routers 8-bit) and
converted to a bundle by mlx_flash's convert; both cached under ~/.cache/mlx_flash/bench/.
One layer's experts are 340 MB (the 48-layer model: 16.3 GB of experts).

Routing follows a trace: random weights route near uniformly, so every MoE block's router
(`mlp.gate`) is replaced, in every engine, by a module that returns logits with large, distinct
values on the trace's k experts for the current token position (so softmax and top-k pick
exactly them). The trace (seeded) has a popularity skew (Zipf over each layer's experts,
--skew) and reuse between consecutive tokens (each of the previous token's experts kept with a
probability tuned to a mean Jaccard of --jaccard); --routing takes both from a trained model's
measured routing (tools/moe_routing.py --json). Its measured statistics are printed with the
table.

Engines, each in its own process (tools/benchlib.py), the page cache of the model's files
emptied before each:

  naive     memory budget "off": each token reads its k experts per layer anew
  flash     the expert engine in a memory budget (--budget; else --ram minus --headroom; else
            half of each layer's experts): per-layer expert caches, what a token routes to and
            the cache lacks is read, one record per expert from the converted bundle
  flash-src the same engine and budget, the experts read from the mlx-lm folder's own files
            (mlx_flash.expert_index: one read per contiguous piece), MLX_FLASH_HOME emptied
            first so that its first use (the index written) is in its load time
  flash-ahead (only when --engines lists it) flash reading the next layer's likely experts
            ahead (load's lookahead=--lookahead, default k)
  mlx-lm    mlx-lm loading the whole folder (computing in float32, as our engine computes
            quantized models on MLX's CPU backend, so the outputs compare bit for bit)
  llama.cpp only where `import llama_cpp` works (else listed as not installed)

The flash engines' expert cache policy is --expert-policy's. Our engines read with `cold=True`
(the page cache bypassed). --ram SIZE runs each engine in a
memory cgroup of its own limited to SIZE (cgroup v1 `memory.limit_in_bytes`, or v2
`memory.max`): it counts the page cache too, so an engine that maps or caches the model cannot
hide there; one the kernel kills is listed as "out of memory". Without --ram the cgroup is made
without a limit, for its peak usage. Where no cgroup can be made, the run says so and relies on
the memory budget alone.

Reports per engine (the median of --rounds interleaved rounds): ms per decode token, experts
read per token, bytes read per token, hit rate (1 − experts read / experts routed to, decode),
read stall per token (time waiting for reads), peak RSS and the model's part of it (peak minus
the process's memory before loading), the cgroup's peak usage, and whether its greedy tokens
equal mlx-lm's (or, without mlx-lm, each other's). JSON: {"runs": [{"model": "moe", ...,
"rows": [{"engine", "budget_bytes", "ms_per_token", "experts_per_token",
"ffn_bytes_per_token", "hit_rate", "stall_ms_per_token", "model_rss_bytes",
"cgroup_peak_bytes", "exact", "status"}]}]}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import benchlib
import numpy as np
from benchlib import median_row, num

from mlx_flash.eviction import DEFAULT_POLICY

ENGINES = ("naive", "flash", "flash-src", "mlx-lm", "llama.cpp")
OPTIONAL = ("flash-ahead",)  # run only when --engines lists them
OURS = ("naive", "flash", "flash-src", "flash-ahead")  # mlx_flash engines
FLASH = ("flash", "flash-src", "flash-ahead")  # ours within the memory budget
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
GROUP, BITS = 64, 4  # mlx-lm's convert -q; its qwen3_moe quant_predicate: routers 8-bit
PROMPT = [1, 412, 9051, 77, 3051, 18, 27000, 640]
SKEW, JACCARD = 0.6, 0.3  # defaults: the top 25% of experts take ~51% of routings (long run)
HEADROOM = 640 * 2**20  # --ram minus this is flash's budget: the process's runtime (Python,
# MLX, mlx-lm: ~420 MB RSS here) and what its libraries' pages charge to the cgroup


# ----------------------------------------------------------------------------- the model


def scale_config(layers: int, vocab: int) -> dict:
    return dict(QWEN3_30B_A3B, num_hidden_layers=layers, vocab_size=vocab)


def _tensors(config: dict) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict]:
    """mlx-lm's quantized model's tensors (name -> shape, dtype) and config, as its
    `convert -q` writes them; the model is built lazily (nothing allocated)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes, quantize_model

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model, qconfig = quantize_model(model, dict(config), GROUP, BITS)
    out = {}
    for name, a in tree_flatten(model.parameters()):
        out[name] = (tuple(a.shape), "uint32" if a.dtype == mx.uint32 else "bfloat16")
    return out, qconfig


def _bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even)."""
    u = a.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _draw(name: str, shape: tuple[int, ...], dtype: str, rng: np.random.Generator,
          fan_in: dict[str, int]) -> np.ndarray:
    """Random data for one tensor: packed words uniform; scale s and bias -7.5 s per group
    (s jittered ±25%) so a weight has mean 0 and std ~1/sqrt(fan in) (embeddings: std 1);
    norms 1."""
    if dtype == "uint32":
        return rng.integers(0, 2**32, size=shape, dtype=np.uint32)
    if len(shape) == 1:  # norms
        return _bf16(np.ones(shape, np.float32))
    base = name.rsplit(".", 1)[0]
    s = (1.0 if "embed_tokens" in name else fan_in[base] ** -0.5) / 4.6
    scales = s * rng.uniform(0.75, 1.25, size=shape).astype(np.float32)
    bits = 8 if fan_in.get(f"{base}.bits") == 8 else BITS
    mid = (2**bits - 1) / 2
    if name.endswith(".biases"):
        # the same draw as the scales (same seed per tensor): bias = -mid * scale
        return _bf16(-mid * scales)
    return _bf16(scales)


def _write_safetensors(path: Path, tensors: dict[str, tuple[tuple[int, ...], str]],
                       make) -> None:
    """A safetensors file written tensor by tensor (`make(name)` -> its array)."""
    codes = {"uint32": ("U32", 4), "bfloat16": ("BF16", 2)}
    header, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        n = int(np.prod(shape)) * codes[dtype][1]
        header[name] = {"dtype": codes[dtype][0], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "mlx"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, (shape, _) in tensors.items():
            a = make(name)
            assert a.shape == shape, (name, a.shape, shape)
            f.write(np.ascontiguousarray(a).tobytes())
    tmp.rename(path)


def build_folder(folder: Path, layers: int, vocab: int, seed: int = 0) -> dict:
    """The scale model as an mlx-lm folder (one shard per layer, the rest in one more)."""
    from fixtures import save_byte_tokenizer
    from mlx_lm.utils import save_config

    config = scale_config(layers, vocab)
    tensors, qconfig = _tensors(config)
    fan_in = {}
    for name, (shape, _) in tensors.items():
        if name.endswith(".scales"):
            base = name.rsplit(".", 1)[0]
            fan_in[base] = shape[-1] * GROUP
            packed = tensors[f"{base}.weight"][0][-1]
            fan_in[f"{base}.bits"] = packed * 32 // fan_in[base]
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: dict[str, dict] = {}
    for name, spec in tensors.items():
        i = name.split(".layers.")[1].split(".")[0] if ".layers." in name else "rest"
        shards.setdefault(i, {})[name] = spec
    files = {i: f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
             for n, i in enumerate(shards)}
    weight_map = {}
    for i, group in shards.items():
        t0 = time.perf_counter()
        # one generator per tensor, seeded by its name, so scales and biases match
        def make(name: str) -> np.ndarray:
            base = name.rsplit(".", 1)[0] if not name.endswith(".weight") else name
            rng = np.random.default_rng([seed, *base.encode()])
            shape, dtype = tensors[name]
            return _draw(name, shape, dtype, rng, fan_in)

        _write_safetensors(tmp / files[i], group, make)
        weight_map.update({n: files[i] for n in group})
        print(f"  wrote {files[i]} ({time.perf_counter() - t0:.1f} s)", flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}, indent=1))
    save_config(qconfig, tmp / "config.json")
    save_byte_tokenizer(tmp)
    tmp.rename(folder)
    return qconfig


def prepare(work: Path, layers: int, vocab: int) -> tuple[Path, Path]:
    """The mlx-lm folder and its bundle (made once)."""
    from mlx_flash.convert import convert

    folder = work / f"qwen3-30b-a3b-shaped-{layers}l-v{vocab}"
    bundle = work / f"{folder.name}-bundle"
    if not folder.exists():
        print(f"building {folder} ...", flush=True)
        build_folder(folder, layers, vocab)
    if not bundle.exists():
        print(f"converting to {bundle} ...", flush=True)
        tmp = bundle.with_name(f".{bundle.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        convert(folder, tmp, dtype=None, progress=False)
        tmp.rename(bundle)
    return folder, bundle


# ----------------------------------------------------------------------------- the trace


def _trace_layer(n: int, k: int, tokens: int, skew: float, keep: float,
                 rng: np.random.Generator) -> np.ndarray:
    """`[tokens, k]` expert ids: Zipf(`skew`) popularity over a random order of the `n`
    experts; each of the previous token's experts kept with probability `keep`, the rest
    drawn by popularity without replacement."""
    p = 1.0 / np.arange(1, n + 1) ** skew
    order = rng.permutation(n)
    pop = np.empty(n)
    pop[order] = p / p.sum()
    out = np.empty((tokens, k), np.int64)
    prev = np.array([], np.int64)
    for t in range(tokens):
        kept = prev[rng.random(len(prev)) < keep]
        w = pop.copy()
        w[kept] = 0
        fresh = rng.choice(n, k - len(kept), replace=False, p=w / w.sum())
        prev = np.concatenate([kept, fresh])
        out[t] = prev
    return out


def trace_stats(trace: np.ndarray, n: int) -> dict[str, float]:
    """The share of routings to each layer's most routed 25% of experts, and the mean
    Jaccard similarity of consecutive tokens' expert sets."""
    share, jac = [], []
    for layer in trace:
        counts = np.sort(np.bincount(layer.reshape(-1), minlength=n))[::-1]
        share.append(counts[: n // 4].sum() / counts.sum())
        for a, b in zip(layer, layer[1:], strict=False):
            inter = len(np.intersect1d(a, b))
            jac.append(inter / (2 * len(a) - inter))
    return {"top25_share": float(np.mean(share)), "jaccard": float(np.mean(jac))}


def make_trace(layers: int, n: int, k: int, tokens: int, skew: float, jaccard: float,
               seed: int) -> tuple[np.ndarray, float]:
    """`[layers, tokens, k]`, the keep probability tuned (on a seeded probe) so that the
    mean consecutive Jaccard is `jaccard`."""
    lo, hi = 0.0, 1.0
    for _ in range(12):  # bisection: the Jaccard grows with the keep probability
        keep = (lo + hi) / 2
        probe = np.stack([_trace_layer(n, k, 400, skew, keep, np.random.default_rng(
            [seed, 99, i])) for i in range(2)])
        if trace_stats(probe, n)["jaccard"] < jaccard:
            lo = keep
        else:
            hi = keep
    keep = (lo + hi) / 2
    rng = np.random.default_rng(seed)
    return np.stack([_trace_layer(n, k, tokens, skew, keep, rng) for _ in range(layers)]), keep


def _long_share(n: int, k: int, skew: float, keep: float, seed: int) -> float:
    """The top-25% share of a long (2000-token) trace at this skew: its popularity, without
    a short trace's sampling noise."""
    probe = _trace_layer(n, k, 2000, skew, keep, np.random.default_rng([seed, 7]))
    return trace_stats(probe[None], n)["top25_share"]


def routing_targets(path: Path, n: int, k: int, seed: int) -> tuple[float, float]:
    """The Zipf skew and Jaccard that reproduce tools/moe_routing.py's measurement (its
    --json): the mean over layers of the top-25% experts' share (matched on a long trace) and
    of consecutive tokens' Jaccard."""
    data = json.loads(Path(path).read_text())
    share = float(np.mean([p["top25_share"] for p in data["popularity"]]))
    jaccard = float(np.mean([r["jaccard_consecutive"] for r in data["reuse"]]))
    _, keep = make_trace(1, n, k, 8, SKEW, jaccard, seed)
    lo, hi = 0.0, 3.0
    for _ in range(10):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _long_share(n, k, mid, keep, seed) < share else (lo, mid)
    return (lo + hi) / 2, jaccard


def install_trace(model, trace: np.ndarray, n: int) -> int:
    """Replace every MoE block's router by one following `trace` (`[layers, T, k]`)."""
    import mlx.core as mx
    import mlx.nn as nn

    class TraceRouter(nn.Module):
        def __init__(self, ids: np.ndarray):
            super().__init__()
            self.ids, self.pos = ids, 0
            k = ids.shape[1]
            self.values = (16.0 - 0.5 * np.arange(k)).astype(np.float32)

        def __call__(self, x: mx.array) -> mx.array:
            length = x.shape[1]
            rows = np.arange(self.pos, self.pos + length) % len(self.ids)
            self.pos += length
            logits = np.zeros((length, n), np.float32)
            logits[np.arange(length)[:, None], self.ids[rows]] = self.values
            a = mx.array(logits).astype(x.dtype)
            return mx.broadcast_to(a[None], (*x.shape[:-1], n))

    count = 0
    for layer in model.layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and hasattr(mlp, "switch_mlp"):
            mlp.gate = TraceRouter(trace[count])
            count += 1
    return count


# ----------------------------------------------------------------------------- workers


def worker(spec: dict) -> dict:
    """One engine in this process: load, install the trace, decode greedily, measure."""
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
        # flash-src: the experts read from the mlx-lm folder's own files, an empty
        # MLX_FLASH_HOME, so that its first use (the index written) is in the load time
        if engine == "flash-src":
            shutil.rmtree(spec["home"], ignore_errors=True)
            os.environ["MLX_FLASH_HOME"] = spec["home"]
        # flash-ahead: flash reading the next layer's likely experts ahead (--lookahead);
        # the others keep load's default
        ahead = {"lookahead": spec["lookahead"]} if engine == "flash-ahead" else {}
        model, _ = mlx_flash.load(spec["folder" if engine == "flash-src" else "bundle"],
                                  memory_budget=spec["budget"], cold=True,
                                  threads=spec["threads"], context=spec["context"],
                                  expert_policy=spec["policy"], **ahead)
        flash = model.flash
    load_s = time.perf_counter() - t0
    trace = np.load(spec["trace"])
    moe_layers = install_trace(model, trace, spec["experts"])
    row, tokens = benchlib.decode_row(engine, model, spec["prompt"], spec["tokens"], runtime,
                                      load_s)
    row.update(tokens=tokens, experts_per_token=None, ffn_bytes_per_token=None, hit_rate=None,
               stall_ms_per_token=None, reads_per_expert=None, written_bytes=None)
    if flash is not None:
        d = flash.stats.decode
        routed = d.tokens * spec["k"] * moe_layers
        records = sum(r.counters.records for r in flash.readers.values())
        row.update(experts_per_token=d.records_read / d.tokens,
                   ffn_bytes_per_token=d.bytes / d.tokens,
                   hit_rate=1 - d.records_read / routed,
                   reads_per_expert=flash.read_calls / max(records, 1),
                   written_bytes=sum(f.stat().st_size for f in Path(spec["home"]).rglob("*")
                                     if f.is_file()) if engine == "flash-src"
                   else benchlib.folder_bytes(Path(spec["bundle"])),
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
    return benchlib.run_worker(Path(__file__), spec, folders, ram, read_bps)


def llama_cpp_installed() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- the run


FIELDS = ("engine", "budget_bytes", "ms_per_token", "experts_per_token", "ffn_bytes_per_token",
          "hit_rate", "stall_ms_per_token", "model_rss_bytes", "cgroup_peak_bytes", "exact",
          "status")


def combine(engine: str, rounds: list[dict], budget: int | None) -> dict:
    """An engine's row: its median round (by ms/token), the largest model RSS and cgroup peak
    of its rounds; "out of memory" or "failed" if any round was."""
    bad = [r for r in rounds if r["status"] != "ok"]
    if bad:
        row = dict.fromkeys(FIELDS)
        row.update(bad[0], engine=engine, budget_bytes=budget, exact=None)
        row.pop("tokens", None)
        return row
    row = median_row(rounds)
    row.update(budget_bytes=budget, all_tokens=[r["tokens"] for r in rounds])
    return row


def moe_run(args: argparse.Namespace, work: Path) -> dict:
    from mlx_flash.bundle import EXPERTS, Bundle
    from mlx_flash.memory import expert_budget, expert_plan
    from mlx_flash.sysmem import format_bytes, parse_size

    layers = args.layers or (4 if args.quick else 8)
    tokens = args.tokens or (16 if args.quick else 32)
    rounds = args.rounds or (1 if args.quick else 3)
    folder, bundle_path = prepare(work, layers, args.vocab)
    bundle = Bundle.open(bundle_path)
    config = bundle.config
    n, k = config["num_experts"], config["num_experts_per_tok"]
    fam = bundle.families[EXPERTS]
    context = len(PROMPT) + tokens + 8
    whole = expert_plan(bundle, 4, None, context).total  # computed in float32 (CPU)
    ram = parse_size(args.ram) if args.ram else None
    read_bps = int(args.read_mbps * 1e6) if args.read_mbps else None
    if args.budget:
        budget = parse_size(args.budget)
    elif ram is not None:
        budget = ram - parse_size(args.headroom)
    else:
        budget = expert_budget(bundle, 4, context, n // 2)
    slots = expert_plan(bundle, 4, budget, context).capacity[(EXPERTS, fam.tensors)]
    if args.routing:
        skew, jaccard = routing_targets(args.routing, n, k, args.seed)
        source = f"matching {Path(args.routing).name}"
    else:
        skew, jaccard = args.skew, args.jaccard
        source = "--skew/--jaccard" if (skew, jaccard) != (SKEW, JACCARD) else "defaults"
    trace, keep = make_trace(layers, n, k, len(PROMPT) + tokens + 8, skew, jaccard, args.seed)
    uniform, _ = make_trace(layers, n, k, len(PROMPT) + tokens + 8, 0.0, jaccard, args.seed)
    trace_path = work / f"moe-trace-{layers}l-{tokens}.npy"
    np.save(trace_path, trace.astype(np.int64))
    expert_bytes = fam.record_bytes * fam.count * layers
    print(f"moe: {folder.name}: {expert_bytes / 1e9:.2f} GB of experts "
          f"({fam.record_bytes / 1e6:.2f} MB each), the model whole {format_bytes(whole)} "
          f"(float32 compute); flash budget {format_bytes(budget)} ({max(slots)} of {n} "
          f"experts per layer); --ram {format_bytes(ram) if ram else 'none'}; {tokens} tokens, "
          f"{rounds} round(s)", flush=True)
    base = {"bundle": str(bundle_path), "folder": str(folder), "trace": str(trace_path),
            "home": str(work / "flash-src-home"),
            "prompt": PROMPT, "tokens": tokens, "context": context, "threads": args.threads,
            "experts": n, "k": k, "lookahead": args.lookahead or k,
            "policy": args.expert_policy}
    engines = args.engines.split(",") if args.engines else list(ENGINES)
    unknown = set(engines) - set(ENGINES) - set(OPTIONAL)
    if unknown:
        raise SystemExit(f"unknown engines {sorted(unknown)}: {ENGINES + OPTIONAL}")
    budgets = {"naive": "off", "mlx-lm": None, **dict.fromkeys(FLASH, budget)}

    def line(engine: str, r: dict) -> str:
        what = (f"{r['ms_per_token']:.1f} ms/token, model RSS "
                f"{r['model_rss_bytes'] / 1e6:.0f} MB" if r["status"] == "ok"
                else r["status"] + (f" ({r['error']})" if r.get("error") else ""))
        peak = r.get("cgroup_peak_bytes")
        return f"{engine}: {what}" + (f", cgroup peak {peak / 1e6:.0f} MB" if peak else "")

    got = benchlib.interleaved(
        [e for e in engines if e != "llama.cpp"], rounds,
        lambda e: run_engine(dict(base, engine=e, budget=budgets[e]), [folder, bundle_path], ram,
                             read_bps),
        line)
    cgroup_error = next((r["cgroup_error"] for rs in got.values() for r in rs
                         if r["cgroup_error"]), None)
    rows = []
    for engine in engines:
        if engine == "llama.cpp":
            row = dict.fromkeys(FIELDS)
            row.update(engine=engine, status="installed, not run (no GGUF writer here)"
                       if llama_cpp_installed() else "not installed")
            rows.append(row)
            continue
        b = budget if engine in FLASH else None
        rows.append(combine(engine, got[engine], b))
    reference = next((r for r in rows if r["engine"] == "mlx-lm" and r["status"] == "ok"),
                     None)
    ours = [r for r in rows if r["engine"] in OURS and r["status"] == "ok"]
    for r in rows:
        if r["status"] != "ok" or r["engine"] not in (*OURS, "mlx-lm"):
            continue
        ref = reference or (ours[0] if ours else None)
        if r is ref and reference is None and len(ours) < 2:
            r["exact"] = None
            continue
        # every round's tokens equal the reference's (mlx-lm's, else the other engine's)
        others = [o for o in (reference,) if o] if reference else [o for o in ours if o is not r]
        r["exact"] = all(t == o["tokens"] for t in r["all_tokens"] for o in others) \
            and all(t == r["tokens"] for t in r["all_tokens"])
    run = {"model": "moe", "folder": folder.name, "layers": layers, "experts": n, "k": k,
           "expert_bytes": expert_bytes, "record_bytes": fam.record_bytes,
           "whole_bytes": whole, "budget_bytes": budget, "ram_bytes": ram,
           "read_mbps": args.read_mbps,
           "slots_per_layer": max(slots), "tokens": tokens, "rounds": rounds,
           "threads": args.threads, "cgroup": cgroup_error or ("limited" if ram else "peak only"),
           "trace": dict(trace_stats(trace, n), skew=skew, jaccard_target=jaccard,
                         keep=keep, source=source, seed=args.seed, tokens=trace.shape[1],
                         long_top25_share=_long_share(n, k, skew, keep, args.seed),
                         uniform_top25_share=trace_stats(uniform, n)["top25_share"]),
           "rows": rows}
    run["checks"] = checks(run)
    return run


def checks(run: dict) -> dict:
    """The issue's: flash >= 2x naive per token, flash's model RSS within its budget, output
    exact."""
    by = {r["engine"]: r for r in run["rows"] if r["status"] == "ok"}
    out = {}
    if "flash" in by and "naive" in by:
        out["flash_speedup_vs_naive"] = by["naive"]["ms_per_token"] / by["flash"]["ms_per_token"]
    if "flash" in by:
        out["flash_rss_within_budget"] = by["flash"]["model_rss_bytes"] <= run["budget_bytes"]
    out["exact"] = all(r["exact"] for r in by.values() if r.get("exact") is not None)
    return out


def table(run: dict) -> str:
    t = run["trace"]
    ram = f"--ram {run['ram_bytes'] / 1e9:.2f} GB" if run["ram_bytes"] else "no --ram"
    if run.get("read_mbps"):
        ram += f", reads limited to {run['read_mbps']:g} MB/s"
    naive = next((r["ms_per_token"] for r in run["rows"]
                  if r["engine"] == "naive" and r["status"] == "ok"), None)
    cells = []
    for r in run["rows"]:
        ok = r["status"] == "ok"
        cells.append([
            r["engine"], num(r["ms_per_token"]),
            f"{naive / r['ms_per_token']:.2f}×" if ok and naive else "–",
            num(r["experts_per_token"]), num(r["ffn_bytes_per_token"], 1e-6),
            num(r["hit_rate"], 1, ".0%"), num(r["stall_ms_per_token"]),
            f"{r['peak_rss_bytes'] / 1e6:.0f} ({r['model_rss_bytes'] / 1e6:.0f})" if ok else "–",
            num(r["cgroup_peak_bytes"], 1e-6, ".0f"), num(r.get("reads_per_expert")),
            num(r.get("first_token_seconds")), num(r.get("written_bytes"), 1e-6, ".1f"),
            "–" if r.get("exact") is None else "yes" if r["exact"] else "**no**", r["status"]])
    lines = [f"**moe** — {run['folder']}: {run['layers']} layers, {run['experts']} experts "
             f"(top-{run['k']}, {run['record_bytes'] / 1e6:.2f} MB each), "
             f"{run['expert_bytes'] / 1e9:.2f} GB of experts; flash budget "
             f"{run['budget_bytes'] / 1e6:.0f} MB ({run['slots_per_layer']} experts per layer); "
             f"{ram} (cgroup: {run['cgroup']}); {run['tokens']} tokens, {run['rounds']} "
             "round(s), medians", "",
             *benchlib.md_table(["engine", "ms/token", "vs naive", "experts read/token",
                                 "MB read/token", "hit rate", "read stall ms/token",
                                 "peak RSS MB (model)", "cgroup peak MB", "reads/expert",
                                "first token s", "MB written on first use", "exact",
                                "status"],
                                cells)]
    lines += ["", f"trace ({t['source']}; seed {t['seed']}; {t['tokens']} positions): Zipf "
              f"skew {t['skew']:.2f}: {t['top25_share']:.1%} of routings go to each layer's "
              f"top 25% of experts ({t['long_top25_share']:.1%} over 2000 tokens; uniform "
              f"routing over {t['tokens']} gives {t['uniform_top25_share']:.1%}); mean Jaccard "
              f"of consecutive tokens' experts {t['jaccard']:.2f} (target "
              f"{t['jaccard_target']:.2f}; each expert of the token before kept with "
              f"probability {t['keep']:.2f})"]
    c = run["checks"]
    if "flash_speedup_vs_naive" in c:
        lines.append(f"checks: flash {c['flash_speedup_vs_naive']:.2f}× naive per token "
                     f"(target ≥ 2×); flash's model RSS within its budget: "
                     f"{'yes' if c.get('flash_rss_within_budget') else '**no**'}; output "
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
    p.add_argument("--quick", action="store_true", help="4 layers, 16 tokens, 1 round")
    p.add_argument("--layers", type=int, default=None, help="of Qwen3-30B-A3B's 48 (8)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tokens", type=int, default=None, help="decode tokens (32)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3)")
    p.add_argument("--ram", default=None, help="each engine's memory cgroup limit, e.g. 2GB")
    p.add_argument("--read-mbps", type=float, default=None,
                   help="limit each engine's reads from the model's disk to this many MB/s "
                   "(a blkio cgroup: buffered, direct and page-fault reads alike), for the "
                   "regime where reads are most of a token")
    p.add_argument("--budget", default=None,
                   help="flash's memory budget (default: --ram minus --headroom, else half "
                        "of each layer's experts)")
    p.add_argument("--headroom", default=str(HEADROOM),
                   help="--ram minus this is flash's budget (default 640 MiB)")
    p.add_argument("--engines", default=None, help=f"comma-separated ({','.join(ENGINES)})")
    p.add_argument("--threads", type=int, default=8, help="read threads")
    p.add_argument("--lookahead", type=int, default=None,
                   help="the flash-ahead engine's lookahead: the next layer's likely experts "
                        "read ahead (default: k)")
    p.add_argument("--expert-policy", default=DEFAULT_POLICY,
                   help=f"the flash engines' expert cache policy ({DEFAULT_POLICY})")
    p.add_argument("--skew", type=float, default=SKEW,
                   help=f"the trace's Zipf exponent over each layer's experts ({SKEW})")
    p.add_argument("--jaccard", type=float, default=JACCARD,
                   help=f"the trace's mean consecutive-token Jaccard ({JACCARD})")
    p.add_argument("--routing", default=None,
                   help="tools/moe_routing.py --json's output: the skew and Jaccard that "
                        "reproduce its measured top-25%% share and Jaccard (over --skew, "
                        "--jaccard)")
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
