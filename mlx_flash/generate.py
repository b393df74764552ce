"""Generate text with the flash engine, streaming like `mlx_lm.generate` (same flag names).

    python -m mlx_flash generate --prompt "Why is the sky blue?" --max-tokens 100

Without --model it runs the embedded default model (SmolLM2-135M-Instruct, converted into the
cache on first use). The text goes to stdout, then a stats line to stderr: prompt and
generation speed, bytes read from flash per token, peak resident memory.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import mlx.core as mx

from .argtypes import Parser, interruptible
from .cli import (
    add_engine_arguments,
    add_eos_tokens,
    add_model_argument,
    add_sampling_arguments,
    load_model,
    make_sampler,
    print_stream,
    vocab_size,
)
from .sysmem import format_bytes, peak_rss_bytes

DEFAULT_PROMPT = "hello"
DEFAULT_MAX_TOKENS = 100


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m mlx_flash generate",
        description="Generate text with a model whose FFN weights are read from flash on "
        "demand (only attention and embeddings stay in memory). The text goes to stdout, "
        "the stats line to stderr.")
    add_model_argument(p)
    p.add_argument("--prompt", "-p", default=DEFAULT_PROMPT,
                   help="message to the model ('-' reads it from stdin)")
    add_sampling_arguments(p, DEFAULT_MAX_TOKENS)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the tokenizer's chat template (default: when the "
                   "tokenizer has one)")
    p.add_argument("--ignore-chat-template", dest="chat", action="store_const", const=False,
                   default=None, help="use the raw prompt (mlx_lm's name for --no-chat)")
    p.add_argument("--system-prompt", default=None, help="system prompt for the chat template")
    p.add_argument("--extra-eos-token", nargs="+", default=(), metavar="TOKEN",
                   help="more tokens (or token ids) that end generation, as mlx_lm takes them")
    add_engine_arguments(p)
    p.add_argument("--quiet", "-q", action="store_true",
                   help="print only the generated text: no stats line")
    p.add_argument("--verbose", action="store_true",
                   help="also print the per-token time breakdown (flash I/O, cache "
                   "management, compute), the cache's hit rate and the memory plan")
    return p


def print_stats(engine: Any, response: Any, verbose: bool) -> None:
    """The stats line (and with `verbose` the per-token breakdown and the memory plan), on
    stderr: stdout holds only the generated text."""
    decode, prefill = engine.stats.decode, engine.stats.prefill
    peak, runtime = peak_rss_bytes(), engine.runtime_rss
    budget_text = "" if engine.plan.budget is None else f", {engine.plan.budget_text()}"
    per_token = decode.records_read / max(decode.tokens, 1)
    lines = [f"[stats] {engine.selection} | prompt {response.prompt_tokens} tokens @ "
             f"{response.prompt_tps:.1f} tok/s"
             f" | generation {response.generation_tokens} tokens @ "
             f"{response.generation_tps:.2f} tok/s"
             f" | flash read {format_bytes(decode.bytes_per_token)}/token"
             f", {per_token:.{1 if per_token < 100 else 0}f} {engine.unit}/token"
             f" (prefill {format_bytes(prefill.bytes)}; FFN "
             f"{format_bytes(engine.bundle.ffn_bytes)}, cache hit rate "
             f"{engine.cache_stats().hit_rate:.0%})"
             f" | peak RSS {format_bytes(peak)} (runtime {format_bytes(runtime)} + model "
             f"{format_bytes(peak - runtime)}{budget_text})"
             f" | MLX peak {format_bytes(mx.get_peak_memory())}"]
    if verbose and decode.tokens:
        n = decode.tokens
        lines.append(f"[decode] per token: flash I/O {1e3 * decode.io_seconds / n:.1f} ms "
                     f"({decode.bytes / max(decode.io_seconds, 1e-9) / 1e6:.0f} MB/s), cache "
                     f"management {1e3 * decode.mem_seconds / n:.1f} ms, FFN compute "
                     f"{1e3 * decode.ffn_seconds / n:.1f} ms, reading ahead in the background "
                     f"{1e3 * decode.ahead_seconds / n:.1f} ms; {engine.read_calls} read calls "
                     "in all")
        lines.append(f"[memory] {engine.plan.describe()}")
    print("\n".join(lines), file=sys.stderr)


@interruptible
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mlx_lm import stream_generate

    loaded = load_model(args)
    if loaded is None:
        return 1
    model, tokenizer = loaded
    try:
        add_eos_tokens(tokenizer, args.extra_eos_token, vocab_size(model))
    except ValueError as e:
        print(f"error: --extra-eos-token: {e}", file=sys.stderr)
        return 2
    # as mlx_lm.generate: "\n" and "\t" written in the prompt are a newline and a tab
    prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    prompt = sys.stdin.read() if prompt == "-" else prompt
    chat = tokenizer.has_chat_template if args.chat is None else args.chat
    if chat:
        if not tokenizer.has_chat_template:
            print("error: --chat: this tokenizer has no chat template", file=sys.stderr)
            return 2
        messages = [{"role": "user", "content": prompt}]
        if args.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": args.system_prompt})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    response, ok = print_stream(stream_generate(
        model, tokenizer, prompt, max_tokens=args.max_tokens, sampler=make_sampler(args),
        max_kv_size=args.max_kv_size, prefill_step_size=args.prefill_step_size))
    if not ok:
        return 1
    if response is not None and not args.quiet:
        print_stats(model.flash, response, args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
