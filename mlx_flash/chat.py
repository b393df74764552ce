"""Chat with a model in the terminal, as `mlx_lm.chat` does, its FFN weights read from flash.

    python -m mlx_flash chat [--model BUNDLE_OR_MODEL] [--memory-budget 250MB] [--max-tokens 256]

Type a message and press Enter: `q` quits (so does Ctrl-D, or Ctrl-C at the prompt), `r`
starts a new conversation, `h` shows this help. Ctrl-C during an answer stops that answer and
returns to the prompt (a second one, before the answer stops, quits). The conversation stays
in mlx-lm's prompt cache, so each turn processes only the new message. Under each answer, on
stderr: the process's memory against the budget, MB read from flash per token, the share of
the neurons a token needed that the sliding window already held (hit rate), and tokens per
second: the paper's method at work.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator
from typing import Any

from .argtypes import Parser, interruptible
from .cli import (
    add_engine_arguments,
    add_kv_arguments,
    add_model_argument,
    add_sampling_arguments,
    context_text,
    finish_ranks,
    is_printing_rank,
    kv_options,
    load_model,
    make_sampler,
    print_stream,
)
from .sysmem import format_bytes, rss_bytes

DEFAULT_MAX_TOKENS = 256  # mlx_lm.chat's
HELP = ("commands: q quits (so does Ctrl-D), r starts a new conversation, h shows this help; "
        "Ctrl-C stops an answer")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m mlx_flash chat",
               description="Chat with a model whose FFN weights are read from flash.")
    add_model_argument(p)
    add_sampling_arguments(p, DEFAULT_MAX_TOKENS)
    p.add_argument("--system-prompt", default=None,
                   help="system prompt, at the start of each conversation")
    add_engine_arguments(p)
    add_kv_arguments(p)
    return p


class AnswerInterrupt:
    """Ctrl-C during an answer: `requested` turns true, and the answer stops after the token
    being computed (stopping mid-token would leave the KV cache and the engine's caches half
    updated); a second Ctrl-C before then raises KeyboardInterrupt, which ends the chat."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def watching(self) -> Iterator[AnswerInterrupt]:
        self.requested = False
        try:
            previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C stays as it is
            yield self
            return
        if previous == signal.SIG_IGN:  # started ignoring Ctrl-C (a background job): keep it
            signal.signal(signal.SIGINT, previous)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def turn_summary(engine: Any, before: Any, response: Any) -> str:
    """One answer's cost: memory against the budget, flash bytes per token, the window's hit
    rate over this answer (`before`: the engine's cache stats when it started), speed."""
    after = engine.cache_stats()
    needed = sum(getattr(after, k) - getattr(before, k) for k in ("hits", "loads", "spills"))
    hits = (after.hits - before.hits) / needed if needed else 0.0
    rss = rss_bytes()
    stage = f"{engine.stage.text()} | " if getattr(engine, "stage", None) else ""
    return (f"[{stage}memory {format_bytes(rss)} (model {format_bytes(rss - engine.runtime_rss)}; "
            f"{engine.plan.budget_text()}) | flash "
            f"{engine.stats.decode.bytes_per_token / 1e6:.2f} MB/token | "
            f"window hit rate {hits:.0%} | "
            f"{response.generation_tps if response else 0:.1f} tokens/s]")


@interruptible
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mlx_lm import stream_generate
    from mlx_lm.models.cache import make_prompt_cache

    loaded = load_model(args)
    if loaded is None:
        return 1
    model, tokenizer = loaded
    if not tokenizer.has_chat_template:
        print("error: this model's tokenizer has no chat template (python -m mlx_flash "
              "generate --no-chat takes raw text)", file=sys.stderr)
        return 1
    engine = model.flash
    # a pipeline's ranks all read the same lines (mlx.launch hands stdin to each), rank 0
    # alone shows the prompt and the answers
    echo = is_printing_rank(args)
    context = context_text(engine.plan, args.max_kv_size is not None)
    if echo:
        print(f"[mlx_flash] selection {engine.selection}; {context + '; ' if context else ''}"
              f"{HELP}", file=sys.stderr)
    interrupt = AnswerInterrupt()
    history = make_prompt_cache(model, args.max_kv_size)
    new_conversation = True
    while True:
        try:
            message = input(">> " if echo else "")
        except EOFError:
            print(end="\n" if echo else "")
            finish_ranks(args)
            return 0
        if message == "q":
            finish_ranks(args)
            return 0
        if message == "r":
            history = make_prompt_cache(model, args.max_kv_size)
            new_conversation = True
            continue
        if message == "h":
            print(HELP, file=sys.stderr)
            continue
        if not message.strip():
            continue
        messages = [{"role": "user", "content": message}]
        if new_conversation and args.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": args.system_prompt})
        new_conversation = False
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        engine.stats.reset()
        before = engine.cache_stats()
        with interrupt.watching():
            response, ok = print_stream(stream_generate(
                model, tokenizer, prompt, max_tokens=args.max_tokens,
                sampler=make_sampler(args), prompt_cache=history,
                prefill_step_size=args.prefill_step_size, **kv_options(args)),
                stop=lambda: interrupt.requested, echo=echo)
        if not ok:
            return 1
        if interrupt.requested:
            print("[answer stopped: Ctrl-C]", file=sys.stderr)
        print(turn_summary(engine, before, response), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
