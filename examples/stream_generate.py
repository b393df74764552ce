"""Load a flash bundle and stream a completion with mlx-lm's own `stream_generate`.

    python examples/stream_generate.py [BUNDLE_OR_MODEL] [--prompt TEXT]

Without a model it uses the embedded default (SmolLM2-135M-Instruct, converted on first use).
"""

import argparse

from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler

import mlx_flash

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model", nargs="?", default=None, help="bundle, GGUF file or model folder")
parser.add_argument("--prompt", default="Give me three tips for staying focused.")
parser.add_argument("--max-tokens", type=int, default=80)
args = parser.parse_args()

model, tokenizer = mlx_flash.load(args.model)
messages = [{"role": "user", "content": args.prompt}]
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)

for response in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens,
                                sampler=make_sampler(temp=0.7, top_p=0.9)):
    print(response.text, end="", flush=True)
print()

stats = model.flash.stats.decode  # what the flash engine did while decoding
print(f"{response.generation_tps:.1f} tokens/s, "
      f"{stats.bytes_per_token / 1e6:.1f} MB read from flash per token")
