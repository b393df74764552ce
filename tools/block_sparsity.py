"""How much of the down projection a token would read if records held blocks of neurons.

    python tools/block_sparsity.py BUNDLE --data TEXT [--tokens N] [--block 32]

Quantized sources group the down projection's weights 32 neurons at a time, so keeping
their quantization exactly would make a record of 32 neurons' down columns: a token then
reads every block holding at least one neuron it needs. This runs the bundle's selection
mode over the last N tokens of TEXT, one token at a time as decoding does, and reports per
token the fraction of down columns needed and the fraction of blocks they fall in
(docs/FORMAT.md, "The down projection").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--data", required=True)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--block", type=int, default=32)
    args = p.parse_args()

    import mlx_flash
    from mlx_flash.calibrate import text_tokens

    model, tokenizer = mlx_flash.load(args.bundle)
    engine = model.flash
    engine.dense_prefill = False  # every token through the mode, as in decoding
    columns, blocks = [], []

    def observe(layer, x, reads):
        used = np.array(reads.neurons)  # [T, n]: the down columns each token used
        n = used.shape[1]
        columns.append(used.mean(axis=1))
        blocks.append(used.reshape(len(used), n // args.block, args.block).any(-1).mean(1))

    engine.observer = observe
    ids = text_tokens(tokenizer, args.data)[-args.tokens:]
    mx.eval(model(mx.array([ids])))
    c, b = np.concatenate(columns), np.concatenate(blocks)
    print(f"{engine.mode.name}: per token and layer, {c.mean():.1%} of down columns needed; "
          f"in blocks of {args.block} neurons, {b.mean():.1%} of the blocks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
