"""Model sources the converter reads: GGUF files and Hugging Face / mlx-lm folders.

Both present the same face: an HF-style `config` dict, tensors by their Hugging Face names
in HF layout — `get` dequantized, `get_weight` as stored when that is MLX's affine
quantization (GGUF Q4_0/Q4_1/Q8_0, mlx-lm's quantized folders) — and a tokenizer that can be
written into a folder. Tensors are produced one at a time, so converting never holds more
than one of them beyond what is kept.
"""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .arch import QuantizedTensor, Weight


class SourceError(Exception):
    """A model source is missing, unreadable, or of a kind we do not convert."""


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


# ----------------------------------------------------------------------------- GGUF

# GGUF tensor names (llama.cpp) -> Hugging Face names, per block and global.
_GGUF_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# GGUF architectures we read, and the mlx-lm model_type they become. llama.cpp permutes the
# Q/K rows of "llama" models for its interleaved RoPE; we undo that to get HF's layout.
_GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` of Q/K rows (convert_hf_to_gguf.py)."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _gguf_blocks(data: np.ndarray, type_name: str, rows: int) -> QuantizedTensor:
    """GGUF Q4_0/Q4_1/Q8_0 blocks (32 weights each) as MLX's affine quantization, losslessly:
    Q4_1 is w = d·q + m, Q4_0 w = d·(q - 8), Q8_0 w = d·q with q signed, i.e. unsigned q + 128
    with bias -128·d (exact in float16: a power-of-two multiple)."""
    head = {"Q4_0": 2, "Q4_1": 4, "Q8_0": 2}[type_name]
    block = head + (32 if type_name == "Q8_0" else 16)
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows, -1, block)
    d = raw[..., :2].copy().view(np.float16)[..., 0]
    qs = raw[..., head:]
    if type_name == "Q8_0":
        packed = (qs.view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        bits, bias = 8, -128 * d
    else:
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # GGUF: low nibbles first, then high
        packed = q[..., 0::2] | (q[..., 1::2] << 4)  # MLX: element 2i low nibble of byte i
        bits = 4
        bias = raw[..., 2:4].copy().view(np.float16)[..., 0] if type_name == "Q4_1" else -8 * d
    words = np.ascontiguousarray(packed.reshape(rows, -1)).view(np.uint32)
    return QuantizedTensor(mx.array(words), mx.array(d), mx.array(bias.astype(np.float16)),
                           bits, 32)


class GGUFSource:
    kind = "gguf"

    def __init__(self, path: Path):
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as e:  # the reader raises assorted errors on damaged files
            raise SourceError(f"cannot read GGUF file {path}: {e}") from None
        self.fields = {k: f for k, f in self.reader.fields.items()}
        arch = self.meta("general.architecture")
        if arch not in _GGUF_ARCHITECTURES:
            raise SourceError(f"unsupported GGUF architecture {arch!r} in {path.name} "
                              f"(supported: {', '.join(sorted(_GGUF_ARCHITECTURES))})")
        self.arch = arch
        self.tensors = {}
        for t in self.reader.tensors:
            self.tensors[self._hf_name(t.name)] = t
        self.config = self._config()

    def meta(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        return default if f is None else f.contents()

    def _hf_name(self, name: str) -> str:
        if name in _GGUF_GLOBAL_NAMES:
            return _GGUF_GLOBAL_NAMES[name]
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_BLOCK_NAMES:
            return f"model.layers.{parts[1]}.{_GGUF_BLOCK_NAMES[parts[2]]}"
        raise SourceError(f"unsupported tensor {name!r} in {self.path.name}")

    def _config(self) -> dict[str, Any]:
        a = self.arch
        heads = int(self.meta(f"{a}.attention.head_count"))
        hidden = int(self.meta(f"{a}.embedding_length"))
        tokens = self.meta("tokenizer.ggml.tokens")
        vocab = self.meta(f"{a}.vocab_size") or (len(tokens) if tokens else None)
        if vocab is None:
            vocab = int(self.tensors["model.embed_tokens.weight"].shape[-1])
        if self.meta(f"{a}.rope.scaling.type", "none") not in ("none", None):
            raise SourceError(f"{self.path.name}: RoPE scaling is not supported yet")
        config = {
            "model_type": _GGUF_ARCHITECTURES[a],
            "hidden_size": hidden,
            "intermediate_size": int(self.meta(f"{a}.feed_forward_length")),
            "num_hidden_layers": int(self.meta(f"{a}.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self.meta(f"{a}.attention.head_count_kv", heads)),
            "head_dim": int(self.meta(f"{a}.attention.key_length", hidden // heads)),
            "rms_norm_eps": float(self.meta(f"{a}.attention.layer_norm_rms_epsilon")),
            "rope_theta": float(self.meta(f"{a}.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self.meta(f"{a}.context_length", 2048)),
            "vocab_size": int(vocab),
            "hidden_act": "silu",
            "tie_word_embeddings": "lm_head.weight" not in self.tensors,
        }
        for key in ("bos_token_id", "eos_token_id"):
            value = self.meta(f"tokenizer.ggml.{key}")
            if value is not None:
                config[key] = int(value)
        return config

    def names(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> mx.array:
        import gguf

        t = self.tensors[name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise SourceError(f"{self.path.name}: tensor type {t.tensor_type.name} of {name} "
                              "cannot be dequantized") from None
        w = np.asarray(w, dtype=np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))
        return mx.array(self._hf_rows(name, w))

    def _hf_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """`rows` of tensor `name` in HF's order: llama.cpp permutes llama's Q/K rows."""
        if self.arch != "llama" or not name.endswith(("q_proj.weight", "k_proj.weight")):
            return rows
        c = self.config
        heads = c["num_attention_heads"] if "q_proj" in name else c["num_key_value_heads"]
        return _unpermute_qk(rows, heads)

    def get_weight(self, name: str) -> Weight:
        t = self.tensors[name]
        if t.tensor_type.name not in ("Q4_0", "Q4_1", "Q8_0"):
            return self.get(name)
        rows = int(t.shape[-1]) if len(t.shape) > 1 else 1
        q = _gguf_blocks(t.data, t.tensor_type.name, rows)
        return QuantizedTensor(*(mx.array(self._hf_rows(name, np.array(a)))
                                 for a in (q.weight, q.scales, q.biases)), q.bits, q.group_size)

    def save_tokenizer(self, dest: Path) -> None:
        """Rebuild the tokenizer (chat template included) from the GGUF metadata, offline."""
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            _SPECIAL_TOKENS,
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )

        groups = {
            group: {name: self.meta(f"tokenizer.{key}") for key, name in keys.items()
                    if f"tokenizer.{key}" in self.fields}
            for group, keys in GGUF_TOKENIZER_MAPPING.items()
        }
        tokenizer, config = groups["tokenizer"], groups["tokenizer_config"]
        if "tokens" not in tokenizer:
            raise SourceError(f"{self.path.name} carries no tokenizer")
        if tokenizer.get("tokenizer_type") == "llama":
            config.setdefault("add_bos_token", True)
        for name, key in _SPECIAL_TOKENS.items():
            token_id = self.meta(f"tokenizer.ggml.{key}")
            config[name] = tokenizer["tokens"][int(token_id)] if token_id is not None else None
        try:
            backend, _ = convert_gguf_tokenizer(self.arch, tokenizer)
        except Exception as e:
            raise SourceError(f"cannot rebuild the tokenizer of {self.path.name}: {e}") from None
        PreTrainedTokenizerFast(tokenizer_object=backend, **config).save_pretrained(str(dest))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.path.name, "bytes": self.path.stat().st_size,
                "file_type": self.meta("general.file_type")}


# ----------------------------------------------------------------------------- HF / mlx-lm

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


class HFSource:
    kind = "hf"

    def __init__(self, path: Path):
        self.path = path
        try:
            self.config = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SourceError(f"cannot read {path / 'config.json'}: {e}") from None
        gen = path / "generation_config.json"
        if gen.is_file():
            try:
                eos = json.loads(gen.read_text()).get("eos_token_id")
            except json.JSONDecodeError:
                eos = None
            if eos is not None:
                self.config["eos_token_id"] = eos
        files = sorted(glob.glob(str(path / "*.safetensors")))
        if not files:
            raise SourceError(f"{path} has no *.safetensors weights")
        self._arrays: dict[str, mx.array] = {}
        for f in files:
            try:
                # mx.load is lazy for safetensors: a tensor is read when it is evaluated.
                self._arrays.update(mx.load(f))
            except Exception as e:
                raise SourceError(f"cannot read {f}: {e}") from None
        quant = self.config.pop("quantization", None)
        self.config.pop("quantization_config", None)
        self._quant = quant  # mlx-lm quantized folders

    def names(self) -> list[str]:
        return [n for n in self._arrays
                if not n.endswith((".scales", ".biases")) or self._quant is None]

    def _quantized(self, name: str) -> bool:
        base = name.removesuffix(".weight")
        return self._quant is not None and name != base and f"{base}.scales" in self._arrays

    def get_weight(self, name: str) -> Weight:
        if not self._quantized(name):
            return self.get(name)
        base = name.removesuffix(".weight")
        own = self._quant.get(base.removeprefix("model."), self._quant.get(base))
        bits = int((own if isinstance(own, dict) else self._quant)["bits"])
        w, scales = self._arrays[name], self._arrays[f"{base}.scales"]
        return QuantizedTensor(w, scales, self._arrays[f"{base}.biases"], bits,
                               w.shape[-1] * 32 // bits // scales.shape[-1])

    def get(self, name: str) -> mx.array:
        w = self.get_weight(name).dequantize() if self._quantized(name) else self._arrays[name]
        if mx.issubdtype(w.dtype, mx.floating):
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

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.path.name}
