"""Generate text with the flash engine, streaming like `mlx_lm.generate` (same flag names).

    python -m mlx_flash.generate --prompt "Why is the sky blue?" --max-tokens 100

Without --model it runs the embedded default model (SmolLM2-135M-Instruct, converted into the
cache on first use). Ends with a stats line: prompt and generation speed, bytes read from
flash per token, peak resident memory.
"""

from __future__ import annotations

import argparse
import sys

import mlx.core as mx

from .memory import format_bytes, parse_size, peak_rss_bytes

DEFAULT_PROMPT = "hello"
DEFAULT_MAX_TOKENS = 100


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_flash.generate",
        description="Generate text with a model whose FFN weights are read from flash on "
        "demand (only attention and embeddings stay in memory).")
    p.add_argument("--model", default=None,
                   help="a flash bundle, or a GGUF file / HF or mlx-lm model folder to convert "
                   "into the cache first (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", "-p", default=DEFAULT_PROMPT,
                   help="message to the model ('-' reads it from stdin)")
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"maximum number of tokens to generate (default: {DEFAULT_MAX_TOKENS})")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling top-p")
    p.add_argument("--top-k", type=int, default=0, help="sampling top-k (0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="sampling min-p (0: off)")
    p.add_argument("--seed", type=int, default=None, help="PRNG seed")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the tokenizer's chat template (default: when the "
                   "tokenizer has one)")
    p.add_argument("--system-prompt", default=None, help="system prompt for the chat template")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="dtype for converting a non-bundle --model (default: float16 where Metal "
                   "runs, else bfloat16, the faster on MLX's CPU backend)")
    p.add_argument("--compute-dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="dtype to compute in (default: the bundle's)")
    p.add_argument("--sparsity", default="auto",
                   choices=["auto", "off", "predictor", "gate", "hybrid", "teal"],
                   help="which FFN weights each token reads: a selection mode calibrated in the "
                   "bundle (python -m mlx_flash.calibrate), 'off' for all of them, 'auto' for "
                   "the bundle's default (all of them if none is calibrated)")
    p.add_argument("--memory-budget", type=parse_size, default=None,
                   help="memory for the model (resident weights, selection data, KV cache, "
                   "neuron caches), e.g. 150MB; the neuron caches get what the rest leaves. "
                   "Too small: an error saying the minimum")
    p.add_argument("--window", type=int, default=5,
                   help="tokens whose neurons stay cached (the paper's sliding window; 0: no "
                   "cache)")
    p.add_argument("--max-kv-size", type=int, default=None,
                   help="bound the KV cache to this many tokens (rotating, as mlx_lm does); "
                   "the budget reserves it (default: reserves 2048 tokens, unbounded)")
    p.add_argument("--threads", type=int, default=8,
                   help="parallel flash reads (default 8: what tools/flash_profile.py found best)")
    p.add_argument("--cold", action="store_true",
                   help="bypass the OS page cache, so every read reaches the storage (for "
                   "honest I/O figures)")
    p.add_argument("--verify", action="store_true",
                   help="check every bundle file's sha256 before loading")
    p.add_argument("--verbose", action="store_true",
                   help="also print the per-token time breakdown (flash I/O, cache "
                   "management, compute) and the cache's hit rate")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from . import load
    from .arch import UnsupportedModel
    from .bundle import BundleError
    from .convert import ConversionError
    from .sources import SourceError

    if args.max_tokens < 1:
        print("error: --max-tokens must be at least 1", file=sys.stderr)
        return 2
    if args.seed is not None:
        mx.random.seed(args.seed)
    try:
        model, tokenizer = load(args.model, dtype=args.dtype, compute_dtype=args.compute_dtype,
                                verify=args.verify,
                                sparsity=None if args.sparsity == "auto" else args.sparsity,
                                memory_budget=args.memory_budget, window=args.window,
                                context=args.max_kv_size or 2048, threads=args.threads,
                                cold=args.cold, rotating_kv=args.max_kv_size is not None)
    except (FileNotFoundError, FileExistsError, BundleError, SourceError, UnsupportedModel,
            ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    chat = tokenizer.has_chat_template if args.chat is None else args.chat
    if chat:
        if not tokenizer.has_chat_template:
            print("error: --chat: this tokenizer has no chat template", file=sys.stderr)
            return 2
        messages = [{"role": "user", "content": prompt}]
        if args.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": args.system_prompt})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    sampler = make_sampler(args.temp, args.top_p, args.min_p, top_k=args.top_k)
    engine = model.flash
    response = None
    for response in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens,
                                    sampler=sampler, max_kv_size=args.max_kv_size):
        print(response.text, end="", flush=True)
    print()
    if response is None:
        return 0
    decode, prefill = engine.stats.decode, engine.stats.prefill
    peak, runtime = peak_rss_bytes(), engine.runtime_rss
    budget = "" if args.memory_budget is None else f", budget {format_bytes(args.memory_budget)}"
    print(f"[stats] {engine.mode.name} | prompt {response.prompt_tokens} tokens @ "
          f"{response.prompt_tps:.1f} tok/s"
          f" | generation {response.generation_tokens} tokens @ "
          f"{response.generation_tps:.2f} tok/s"
          f" | flash read {format_bytes(decode.bytes_per_token)}/token"
          f" (prefill {format_bytes(prefill.bytes)})"
          f" | peak RSS {format_bytes(peak)} (runtime {format_bytes(runtime)} + model "
          f"{format_bytes(peak - runtime)}{budget})"
          f" | MLX peak {format_bytes(mx.get_peak_memory())}")
    if args.verbose and decode.tokens:
        n = decode.tokens
        cache = engine.cache_stats()
        print(f"[decode] per token: flash I/O {1e3 * decode.io_seconds / n:.1f} ms "
              f"({decode.bytes / max(decode.io_seconds, 1e-9) / 1e6:.0f} MB/s), cache "
              f"management {1e3 * decode.mem_seconds / n:.1f} ms, FFN compute "
              f"{1e3 * decode.ffn_seconds / n:.1f} ms; cache hit rate {cache.hit_rate:.1%}; "
              f"{engine.read_calls} read calls in all")
        print(f"[memory] {engine.plan.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
