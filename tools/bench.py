"""Benchmark the flash engines against dense mlx-lm on the same weights, side by side.

    python tools/bench.py [--model SRC] [--dtype bfloat16] [--tokens 32] [--quick] [--json OUT]

Each engine runs in its own process (so its peak RSS is its own), on the same prompt and token
count, with the page cache of its files emptied first (`posix_fadvise(DONTNEED)`; Linux) so the
first reads come from storage. Engines:

  dense   mlx-lm with every weight in memory (a dense mlx-lm folder of the same weights)
  naive   mlx_flash: attention resident, every FFN record read from flash every token

Reports decode ms/token (median over tokens), FFN bytes read per decode token, peak RSS and the
per-token breakdown (flash I/O, cache management, compute) as a Markdown table, and as JSON with
`--json`. Timings are only comparable within one run: machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ("dense", "naive")
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def drop_page_cache(folder: Path) -> None:
    """Ask the OS to forget the cached pages of every file under `folder` (no root needed)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def worker(engine: str, path: str, tokens: int) -> dict:
    """Run one engine in this process and return its measurements."""
    from mlx_lm import stream_generate

    from mlx_flash.memory import peak_rss_bytes

    if engine == "dense":
        from mlx_lm import load
    else:
        from mlx_flash import load
    model, tokenizer = load(path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                           add_generation_prompt=True)
    stamps = []
    for _ in stream_generate(model, tokenizer, prompt, max_tokens=tokens):
        stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    row = {"engine": engine, "ms_per_token": 1e3 * statistics.median(gaps),
           "decode_tokens": len(gaps), "peak_rss_bytes": peak_rss_bytes(),
           "ffn_bytes_per_token": None, "io_ms": None, "mem_ms": None, "compute_ms": None}
    if engine != "dense":
        decode = model.flash.stats.decode
        row["ffn_bytes_per_token"] = decode.bytes_per_token
        row["io_ms"] = 1e3 * decode.io_seconds / decode.tokens
        row["mem_ms"] = 0.0
        row["compute_ms"] = row["ms_per_token"] - row["io_ms"] - row["mem_ms"]
    return row


def prepare(src: str | None, dtype: str, workdir: Path) -> tuple[Path, Path]:
    """The bundle and the dense mlx-lm folder of the same weights (made once, then reused)."""
    from mlx_flash.convert import export_mlx_lm
    from mlx_flash.paths import default_model_source, resolve_bundle

    source = Path(src) if src else default_model_source()
    bundle = resolve_bundle(source, dtype=dtype)
    dense = workdir / f"{bundle.name}-dense"
    if not dense.exists():
        export_mlx_lm(source, dense, dtype=dtype)
    return bundle, dense


def table(rows: list[dict]) -> str:
    def num(v, fmt):
        return "–" if v is None else format(v, fmt)

    lines = ["| engine | ms/token | FFN MB read/token | peak RSS MB | I/O ms | cache ms | "
             "compute ms |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mb = None if r["ffn_bytes_per_token"] is None else r["ffn_bytes_per_token"] / 1e6
        lines.append(f"| {r['engine']} | {r['ms_per_token']:.1f} | {num(mb, '.1f')} | "
                     f"{r['peak_rss_bytes'] / 1e6:.0f} | {num(r['io_ms'], '.1f')} | "
                     f"{num(r['mem_ms'], '.1f')} | {num(r['compute_ms'], '.1f')} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="source model (default: the embedded one)")
    p.add_argument("--dtype", default=None, help="bundle dtype (default: the platform's)")
    p.add_argument("--tokens", type=int, default=48, help="tokens to generate per engine")
    p.add_argument("--quick", action="store_true", help="16 tokens (for CI)")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the engines this many times, interleaved; report each engine's "
                   "run with the median ms/token")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.path, args.tokens)))
        return 0

    from mlx_flash.loader import default_dtype
    from mlx_flash.paths import home

    dtype = args.dtype or default_dtype()
    tokens = 16 if args.quick else args.tokens
    bundle, dense = prepare(args.model, dtype, home() / "bench")
    engines = args.engines.split(",")
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for _ in range(args.repeat):
        for engine in engines:
            folder = dense if engine == "dense" else bundle
            drop_page_cache(folder)
            r = subprocess.run([sys.executable, __file__, "--worker", engine, "--path",
                                str(folder), "--tokens", str(tokens)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stderr, file=sys.stderr)
                return 1
            runs[engine].append(json.loads(r.stdout.strip().splitlines()[-1]))
    rows = [sorted(runs[e], key=lambda r: r["ms_per_token"])[(args.repeat - 1) // 2]
            for e in engines]
    print(f"model: {bundle.name} ({dtype}), {tokens} tokens, median of {args.repeat} run(s); "
          "page cache emptied before each run\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": [{
            "model": "default" if args.model is None else args.model,
            "budget_bytes": None, "tokens": tokens, "rows": rows}]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
