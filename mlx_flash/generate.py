"""Generate text with the flash engine, streaming like `mlx_lm.generate` (same flag names).

    python -m mlx_flash generate --prompt "Why is the sky blue?" --max-tokens 100

Without --model it runs the embedded default model (SmolLM2-135M-Instruct, converted into the
cache on first use). The text goes to stdout, then a stats line to stderr: prompt and
generation speed, bytes read from flash per token, peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx

from .argtypes import Parser, boolean, interruptible
from .cli import (
    add_engine_arguments,
    add_eos_tokens,
    add_kv_arguments,
    add_model_argument,
    add_sampling_arguments,
    finish_ranks,
    is_printing_rank,
    kv_options,
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
    p.add_argument("--prompt-cache-file", default=None,
                   help="a file of saved KV caches (mlx_lm.cache_prompt's, or "
                   "mlx_lm.models.cache.save_prompt_cache's) to continue from, as mlx_lm "
                   "takes it: the prompt is what follows the cached one; --model defaults to "
                   "the model it names")
    add_engine_arguments(p)
    add_kv_arguments(p)
    p.add_argument("--quiet", "-q", action="store_true",
                   help="print only the generated text: no stats line")
    p.add_argument("--verbose", type=boolean, nargs="?", const=True, default=None,
                   metavar="BOOL",
                   help="also print the per-token time breakdown (flash I/O, cache "
                   "management, compute), the cache's hit rate and the memory plan (with how "
                   "many tokens the KV cache holds); --verbose False, as mlx_lm takes it: "
                   "only the text, as --quiet")
    return p


def read_prompt_cache(args: argparse.Namespace) -> tuple[list[Any], dict[str, Any]]:
    """mlx_lm.generate's --prompt-cache-file: the saved caches and the tokenizer config saved
    with them (ValueError: one line saying why not). As mlx_lm, --model defaults to the
    cache's model and another one is refused, and --kv-bits / --kv-group-size must match a
    quantized cache."""
    from mlx_lm.models.cache import QuantizedKVCache, load_prompt_cache

    path = Path(args.prompt_cache_file)
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        cache, metadata = load_prompt_cache(str(path), return_metadata=True)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{path} is no prompt cache mlx-lm saved ({e})") from None
    if not cache:
        raise ValueError(f"{path} holds no cache")
    if isinstance(cache[0], QuantizedKVCache):
        if args.kv_bits is not None and args.kv_bits != cache[0].bits:
            raise ValueError(f"--kv-bits {args.kv_bits} does not match the {cache[0].bits}-bit "
                             "KV cache it holds")
        if args.kv_group_size != cache[0].group_size:
            raise ValueError(f"--kv-group-size {args.kv_group_size} does not match its KV "
                             f"cache's group size {cache[0].group_size}")
    named = metadata.get("model")
    if args.model is None:
        args.model = named
    elif named is not None and args.model != named:
        raise ValueError(f"it was made with the model {named}, not --model {args.model}")
    try:
        tokenizer_config = json.loads(metadata.get("tokenizer_config") or "{}")
    except ValueError:
        raise ValueError(f"{path}: its tokenizer_config is not JSON") from None
    if not isinstance(tokenizer_config, dict):
        raise ValueError(f"{path}: its tokenizer_config is not a JSON object")
    tokenizer_config.pop("trust_remote_code", None)  # a file does not decide what code runs
    return cache, tokenizer_config


def planned_cache(model: Any, saved: list[Any]) -> list[Any]:
    """The saved caches, checked against the model, in the KV caches the memory plan reserves
    when it reserves them (`make_cache`): mlx-lm's loaded ones grow in 256-token steps, by
    concatenation, past any plan."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    fresh = make_prompt_cache(model)
    if len(fresh) != len(saved):
        raise ValueError(f"it holds {len(saved)} layers of KV cache, this model has "
                         f"{len(fresh)}")
    config = model.flash.bundle.config
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    for c in saved:
        if type(c) is KVCache and not c.empty() and heads and c.keys.shape[1] != heads:
            raise ValueError(f"its keys have {c.keys.shape[1]} heads, this model's {heads}")
    if not hasattr(model, "make_cache"):
        return saved
    for new, old in zip(fresh, saved, strict=True):
        if type(old) is not KVCache or old.empty() or not hasattr(new, "update_and_fetch"):
            return saved  # as saved: a quantized or rotating cache is kept as it is
    for new, old in zip(fresh, saved, strict=True):
        new.update_and_fetch(old.keys[..., :old.offset, :], old.values[..., :old.offset, :])
    mx.eval([c.state for c in fresh])
    return fresh


def print_stats(engine: Any, response: Any, verbose: bool) -> None:
    """The stats line (and with `verbose` the per-token breakdown and the memory plan), on
    stderr: stdout holds only the generated text."""
    decode, prefill = engine.stats.decode, engine.stats.prefill
    peak, runtime = peak_rss_bytes(), engine.runtime_rss
    budget_text = "" if engine.plan.budget is None else f", {engine.plan.budget_text()}"
    per_token = decode.records_read / max(decode.tokens, 1)
    stage = f" {engine.stage.text()}" if getattr(engine, "stage", None) else ""
    lines = [f"[stats{stage}] {engine.selection} | prompt {response.prompt_tokens} tokens @ "
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

    quiet, verbose = args.quiet or args.verbose is False, bool(args.verbose)
    saved, tokenizer_config = None, None
    if args.prompt_cache_file is not None:
        try:
            saved, tokenizer_config = read_prompt_cache(args)
        except ValueError as e:
            print(f"error: --prompt-cache-file: {e}", file=sys.stderr)
            return 1
    loaded = load_model(args, tokenizer_config)
    if loaded is None:
        return 1
    model, tokenizer = loaded
    if saved is not None:
        try:
            saved = planned_cache(model, saved)
        except ValueError as e:
            print(f"error: --prompt-cache-file: {e}", file=sys.stderr)
            return 1
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
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=False)
        if saved is not None:
            # as mlx_lm: the cache holds the template's start; the prompt is what follows
            messages[-1]["content"] = "<query>"
            query = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)
            prompt = prompt[query.index("<query>"):]
    # as stream_generate encodes a raw prompt; what follows a saved cache takes no
    # start-of-text token (mlx_lm would add one)
    bos = tokenizer.bos_token
    ids = tokenizer.encode(prompt, add_special_tokens=not chat and saved is None
                           and (bos is None or not prompt.startswith(bos)))
    if not ids:
        print("error: the prompt is empty", file=sys.stderr)
        return 2
    response, ok = print_stream(stream_generate(
        model, tokenizer, ids, max_tokens=args.max_tokens, sampler=make_sampler(args),
        max_kv_size=args.max_kv_size, prefill_step_size=args.prefill_step_size,
        prompt_cache=saved, **kv_options(args)), echo=is_printing_rank(args))
    if not ok:
        return 1
    if response is not None and not quiet:
        print_stats(model.flash, response, verbose)
    finish_ranks(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
