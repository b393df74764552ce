"""Hugging Face and mlx-lm model folders as a model source: safetensors shards, mlx-lm's
quantized modules kept as stored, the tokenizer files copied."""

from __future__ import annotations

import glob
import math
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..arch import QuantizedTensor, Weight
from ..bundle import check_safetensors, read_json
from ..errors import SourceError
from ..hub import snapshot_name
from .tokenizer import check_tokenizer

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def _mlx_lm_quantization(quant: Any, path: Path) -> dict[str, Any]:
    """An mlx-lm config's "quantization" entry, checked: bits and group size for all, and
    per module either the same or false (not quantized)."""
    def check(entry: Any, what: str) -> None:
        if not isinstance(entry, dict) or type(entry.get("bits")) is not int \
                or entry["bits"] not in (2, 3, 4, 5, 6, 8) \
                or type(entry.get("group_size")) is not int \
                or entry["group_size"] not in (32, 64, 128):
            raise SourceError(f"{path / 'config.json'}: {what} is no mlx-lm quantization "
                              "(bits 2-8, group_size 32, 64 or 128)")

    check(quant, "quantization")
    for key, entry in quant.items():
        if isinstance(entry, dict):
            check(entry, f"quantization of {key}")
    return quant


def _dtype(a: mx.array) -> str:
    return str(a.dtype).rsplit(".", 1)[-1]


class HFSource:
    kind = "hf"

    def __init__(self, path: Path):
        self.path = path
        self.config = read_json(path / "config.json", SourceError)
        if not isinstance(self.config, dict):
            raise SourceError(f"{path / 'config.json'} is not a JSON object")
        gen = path / "generation_config.json"
        if gen.is_file():
            generation = read_json(gen, SourceError)
            if not isinstance(generation, dict):
                raise SourceError(f"{gen} is not a JSON object")
            if generation.get("eos_token_id") is not None:
                self.config["eos_token_id"] = generation["eos_token_id"]
        files = sorted(glob.glob(str(path / "*.safetensors")))
        if not files:
            raise SourceError(f"{path} has no *.safetensors weights")
        self._arrays: dict[str, mx.array] = {}
        for f in files:
            try:
                check_safetensors(Path(f))
                # mx.load is lazy for safetensors: a tensor is read when it is evaluated.
                self._arrays.update(mx.load(f))
            except Exception as e:
                raise SourceError(f"cannot read {f}: {e}") from None
        quant = self.config.pop("quantization", None)
        self.config.pop("quantization_config", None)
        self._quant = quant if quant is None else _mlx_lm_quantization(quant, path)

    def names(self) -> list[str]:
        return [n for n in self._arrays
                if not n.endswith((".scales", ".biases")) or self._quant is None]

    def _quantized(self, name: str) -> bool:
        base = name.removesuffix(".weight")
        return self._quant is not None and name != base and f"{base}.scales" in self._arrays

    def tensor_sizes(self) -> dict[str, tuple[int, int]]:
        """Each tensor's (elements, bytes as stored: a quantized one's words, scales and
        biases), from the headers alone (the arrays are lazy: nothing is read)."""
        out = {}
        for name in self.names():
            w = self.get_weight(name) if self._quantized(name) else self._arrays[name]
            parts = (w.weight, w.scales, w.biases) if isinstance(w, QuantizedTensor) else (w,)
            out[name] = (math.prod(w.shape), sum(a.nbytes for a in parts))
        return out

    def stored_dtype(self, name: str) -> str:
        """The float dtype tensor `name` (a quantized one: its scales) is stored in."""
        base = name.removesuffix(".weight")
        a = self._arrays[f"{base}.scales" if self._quantized(name) else name]
        return _dtype(a)

    def get_weight(self, name: str) -> Weight:
        if not self._quantized(name):
            return self.get(name)
        base = name.removesuffix(".weight")
        own = self._quant.get(base.removeprefix("model."), self._quant.get(base))
        bits = (own if isinstance(own, dict) else self._quant)["bits"]
        w, scales = self._arrays[name], self._arrays[f"{base}.scales"]
        biases = self._arrays.get(f"{base}.biases")
        # packed uint32 words, float scales and biases: anything else would be reinterpreted
        if w.dtype != mx.uint32 or biases is None or not all(
                mx.issubdtype(a.dtype, mx.floating) for a in (scales, biases)):
            raise SourceError(
                f"{self.path.name}: {base} is no mlx-lm quantization (its weight is "
                f"{_dtype(w)}, its scales {_dtype(scales)}, its biases "
                f"{'missing' if biases is None else _dtype(biases)}: uint32 and floats expected)")
        columns = w.shape[-1] * 32 // bits
        # 2-D, or 3-D: experts stacked `[E, out, in]` (mlx-lm's SwitchLinear)
        if w.ndim not in (2, 3) or scales.ndim != w.ndim or scales.shape[-1] < 1 \
                or columns % scales.shape[-1] or biases.shape != scales.shape:
            raise SourceError(f"{self.path.name}: {name} {tuple(w.shape)} and its scales "
                              f"{tuple(scales.shape)} are no {bits}-bit quantization")
        return QuantizedTensor(w, scales, biases, bits, columns // scales.shape[-1])

    def get(self, name: str) -> mx.array:
        """Tensor `name` as float32 (dequantized if quantized). A weight stored as integers
        is refused: cast to float it would compute something else than its model."""
        w = self.get_weight(name).dequantize() if self._quantized(name) else self._arrays[name]
        if not mx.issubdtype(w.dtype, mx.floating):
            raise SourceError(f"{self.path.name}: {name} is stored as {_dtype(w)}, not as a "
                              "float weight: the file is damaged")
        w = w.astype(mx.float32)
        mx.eval(w)
        return w

    def save_tokenizer(self, dest: Path) -> None:
        found = [n for n in TOKENIZER_FILES if (self.path / n).is_file()]
        if "tokenizer.json" not in found and "tokenizer.model" not in found \
                and "vocab.json" not in found:
            raise SourceError(f"{self.path} has no tokenizer files")
        for name in found:
            shutil.copyfile(self.path / name, dest / name)
        check_tokenizer(dest, self.config.get("eos_token_id"), str(self.path))

    def describe(self) -> dict[str, Any]:
        # a model of the Hugging Face cache is named by its repository, not its commit
        return {"kind": self.kind, "name": snapshot_name(self.path) or self.path.name}
