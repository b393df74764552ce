"""Chat with a model whose FFN stays on flash, and watch what that costs, answer by answer.

    python examples/chat.py [--model BUNDLE_OR_MODEL] [--memory-budget 250MB] [--max-tokens 200]

Type a message and press Enter; an empty line (or Ctrl-D) ends the chat. Under each answer:
the process's resident memory against the budget, MB read from flash per token, the share of
needed neurons the sliding window already held (hit rate), and tokens per second. The
conversation is kept in mlx-lm's prompt cache, so each turn only processes the new message.
"""

import argparse

from mlx_lm import stream_generate
from mlx_lm.models.cache import make_prompt_cache

import mlx_flash
from mlx_flash.memory import format_bytes, parse_size, rss_bytes

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=None, help="bundle, GGUF file or model folder")
parser.add_argument("--memory-budget", type=parse_size, default=None, help="e.g. 250MB")
parser.add_argument("--max-tokens", type=int, default=200)
args = parser.parse_args()

model, tokenizer = mlx_flash.load(args.model, memory_budget=args.memory_budget)
engine = model.flash
history = make_prompt_cache(model)
budget = format_bytes(args.memory_budget) if args.memory_budget else "no budget"
print(f"mode {engine.mode.name}, {budget}; empty line to quit")
while True:
    try:
        message = input("\nyou> ").strip()
    except EOFError:
        break
    if not message:
        break
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                           add_generation_prompt=True)
    engine.stats.reset()
    before = engine.cache_stats()
    print("bot> ", end="", flush=True)
    response = None
    for response in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens,
                                    prompt_cache=history):
        print(response.text, end="", flush=True)
    after = engine.cache_stats()
    needed = sum(getattr(after, k) - getattr(before, k) for k in ("hits", "loads", "spills"))
    hits = (after.hits - before.hits) / needed if needed else 0.0
    decode = engine.stats.decode
    print(f"\n  [memory {format_bytes(rss_bytes())} (model "
          f"{format_bytes(rss_bytes() - engine.runtime_rss)}; {budget}) | flash "
          f"{decode.bytes_per_token / 1e6:.2f} MB/token | window hit rate {hits:.0%} | "
          f"{response.generation_tps if response else 0:.1f} tokens/s]")
