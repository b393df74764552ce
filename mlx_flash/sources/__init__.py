"""Model sources the converter reads: GGUF files and Hugging Face / mlx-lm folders.

Both present the same face: an HF-style `config` dict, tensors by their Hugging Face names
in HF layout — `get` dequantized, `get_weight` as stored when that is MLX's affine
quantization (GGUF Q4_0/Q4_1/Q8_0, mlx-lm's quantized folders) — and a tokenizer that can be
written into a folder. Tensors are produced one at a time, so converting never holds more
than one of them beyond what is kept.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SourceError
from .gguf import GGUFSource
from .hf import HFSource

__all__ = ["GGUFSource", "HFSource", "open_source"]


def open_source(path: str | Path) -> GGUFSource | HFSource:
    p = Path(path)
    if not p.exists():
        raise SourceError(f"{p} does not exist")
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise SourceError(f"{p} is not a GGUF file (bad magic {magic!r})")
        return GGUFSource(p)
    if (p / "config.json").is_file():
        return HFSource(p)
    raise SourceError(f"{p} is neither a GGUF file nor a model folder with config.json")
