"""GGUF files as a model source: the header read with every count checked, tensors
dequantized or kept as MLX affine quantization, the tokenizer rebuilt from metadata."""

from __future__ import annotations

import contextlib
import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..arch import QuantizedTensor, Weight
from ..bundle import whole
from ..errors import SourceError
from .tokenizer import check_tokenizer

# A GGUF header is read here, not by gguf-py's GGUFReader, which takes counts at their word
# (an array count of 2^32 grew it to 5.8 GB; one case aborted in std::bad_alloc) and makes a
# NumPy array per metadata element. Every count and length is checked against the bytes left
# in the file before anything is allocated for it, so a file of N bytes costs O(N) memory;
# these bounds cap that for large files (real headers: at most ~1.5M array elements, for
# 256k-token vocabularies with scores, types and merges; names under 64 bytes, GGML_MAX_NAME).
GGUF_MAX_ELEMENTS = 1 << 23  # metadata array elements, all arrays together
GGUF_MAX_STRING = 1 << 24  # bytes of one metadata string (chat templates run to ~10 KB)
GGUF_MAX_NAME = 1 << 10
GGUF_MAX_DEPTH = 4  # arrays of arrays of ...
GGUF_MAX_DIMS = 4  # GGML_MAX_DIMS
GGUF_MAX_ALIGNMENT = 1 << 20
_GGUF_STRING, _GGUF_ARRAY, _GGUF_BOOL, _GGUF_UINT32 = 8, 9, 7, 4
# scalar value types: their struct codes (little-endian), which NumPy's dtypes take too
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q",
                 11: "q", 12: "d"}
_STRUCTS = {code: struct.Struct("<" + code) for code in _GGUF_SCALARS.values()}


@dataclass(frozen=True)
class GGUFTensor:
    """A tensor of a GGUF file: `shape` in GGUF's order (fastest-varying dimension first), its
    bytes `data` as gguf-py presents them (typed for F16/F32, else uint8 blocks)."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # from the start of the data section
    n_bytes: int
    data: np.ndarray
    start: int = 0  # where its bytes start in the file (the data section's start + offset)


class _GGUFCursor:
    """Reads a GGUF header from `buf`, refusing whatever would not fit in the bytes left."""

    def __init__(self, buf: np.ndarray, name: str):
        self.buf, self.name, self.pos, self.elements = buf, name, 0, 0

    def fail(self, what: str) -> SourceError:
        return SourceError(f"{self.name} is not a sound GGUF file: {what} (byte {self.pos})")

    def take(self, n: int) -> int:
        """Consume `n` bytes; returns where they start."""
        if n > len(self.buf) - self.pos:
            raise self.fail(f"{n} bytes claimed, {len(self.buf) - self.pos} left: the file is "
                            "truncated or its header damaged")
        self.pos += n
        return self.pos - n

    def scalar(self, dtype: str) -> Any:
        s = _STRUCTS[dtype]
        return s.unpack_from(self.buf, self.take(s.size))[0]

    def count(self, item_bytes: int, limit: int, what: str) -> int:
        """A uint64 count of items taking at least `item_bytes` each."""
        n = self.scalar("Q")
        if n > limit or n * item_bytes > len(self.buf) - self.pos:
            raise self.fail(f"{what} claims {n} items, more than the file holds")
        return n

    def string(self, limit: int = GGUF_MAX_STRING) -> str:
        n = self.count(1, limit, "a string")
        start = self.take(n)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("a string is not UTF-8") from None

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _GGUF_SCALARS:
            v = self.scalar(_GGUF_SCALARS[vtype])
            return bool(v) if vtype == _GGUF_BOOL else v
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype != _GGUF_ARRAY or depth >= GGUF_MAX_DEPTH:
            raise self.fail(f"unknown or too deeply nested value type {vtype}")
        itype = self.scalar("I")
        size = _STRUCTS[_GGUF_SCALARS[itype]].size if itype in _GGUF_SCALARS \
            else {_GGUF_STRING: 8, _GGUF_ARRAY: 12}.get(itype)
        if size is None:
            raise self.fail(f"an array of unknown value type {itype}")
        n = self.count(size, GGUF_MAX_ELEMENTS, "an array")
        self.elements += n
        if self.elements > GGUF_MAX_ELEMENTS:
            raise self.fail(f"its metadata arrays hold over {GGUF_MAX_ELEMENTS} elements")
        if itype in _GGUF_SCALARS:
            items = np.frombuffer(self.buf, "<" + _GGUF_SCALARS[itype], n, self.take(n * size))
            return (items != 0).tolist() if itype == _GGUF_BOOL else items.tolist()
        return [self.value(itype, depth + 1) for _ in range(n)]


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """The metadata and tensors of the GGUF file at `path`, every size, count and offset
    checked first: each tensor's bytes fit its type and shape, lie in the data section,
    aligned, and tensors follow one another as GGUF writers lay them out (each at the next
    aligned offset after the previous one: a tensor whose type or offset was altered leaves a
    gap or an overlap). SourceError says what is wrong. Tensor data stays on disk (mapped)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    if path.stat().st_size < 24:
        raise SourceError(f"{path.name} is too short for a GGUF file")
    buf = np.memmap(path, mode="r")
    c = _GGUFCursor(buf, path.name)
    c.take(4)  # the magic, checked by open_source
    version = c.scalar("I")
    if version not in (2, 3):
        big = version & 0xFFFF == 0  # written for the other byte order
        raise c.fail("big-endian GGUF files are not supported" if big
                     else f"GGUF version {version} is not supported (2 and 3 are)")
    tensor_count, kv_count = c.scalar("Q"), c.scalar("Q")
    # the smallest key-value entry takes 13 bytes, the smallest tensor entry 32
    if tensor_count * 32 + kv_count * 13 > len(buf) - c.pos:
        raise c.fail(f"it claims {tensor_count} tensors and {kv_count} metadata entries, more "
                     "than the file holds")
    fields: dict[str, Any] = {}
    alignment = 32  # GGUF's default
    for _ in range(kv_count):
        key = c.string(GGUF_MAX_NAME)
        vtype = c.scalar("I")
        if key in fields:
            raise c.fail(f"metadata key {key!r} appears twice")
        fields[key] = c.value(vtype)
        if key == "general.alignment":
            alignment = fields[key]
            if vtype != _GGUF_UINT32 or not 0 < alignment <= GGUF_MAX_ALIGNMENT \
                    or alignment & (alignment - 1):
                raise c.fail(f"general.alignment {alignment!r} is not a power of two")
    infos = []
    for _ in range(tensor_count):
        name = c.string(GGUF_MAX_NAME)
        n_dims = c.scalar("I")
        if not 1 <= n_dims <= GGUF_MAX_DIMS:
            raise c.fail(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(c.scalar("Q") for _ in range(n_dims))
        raw_type = c.scalar("I")
        offset = c.scalar("Q")
        try:
            qtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise c.fail(f"tensor {name!r} has an unknown type {raw_type}") from None
        if qtype.name in ("I8", "I16", "I32", "I64", "F64"):
            raise c.fail(f"tensor {name!r} is of type {qtype.name}, not a weight type")
        if min(shape) < 1 or shape[0] % block:
            raise c.fail(f"tensor {name!r} has a shape {list(shape)} that does not fit its "
                         f"type {qtype.name} or the file")
        infos.append((name, qtype, shape, offset, math.prod(shape) // block * type_size))
    data_start = -(-c.pos // alignment) * alignment
    expected, previous, tensors = 0, None, {}
    for name, qtype, shape, offset, n_bytes in sorted(infos, key=lambda t: t[3]):
        if offset != expected:
            where = f"{previous!r} before it ends at {expected}" if previous else "the " \
                "first tensor starts at 0"
            raise c.fail(f"tensor {name!r} starts at data offset {offset}, but {where}: a "
                         "tensor's type, shape or offset was altered")
        if data_start + offset + n_bytes > len(buf):
            raise c.fail(f"tensor {name!r} ({n_bytes} bytes of {qtype.name}) runs past the end "
                         "of the file: it is truncated, or the tensor's type or shape altered")
        if name in tensors:
            raise c.fail(f"tensor {name!r} appears twice")
        previous = name
        expected = -(-(offset + n_bytes) // alignment) * alignment
        np_shape = tuple(reversed(shape))
        dtype = {"F32": np.float32, "F16": np.float16}.get(qtype.name)
        if dtype is None:  # blocks as bytes, as gguf-py gives them
            dtype, np_shape = np.uint8, quant_shape_to_byte_shape(np_shape, qtype)
        start = data_start + offset
        data = buf[start:start + n_bytes].view(dtype).reshape(np_shape)
        tensors[name] = GGUFTensor(name, qtype, shape, offset, n_bytes, data, start)
    return fields, tensors


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
# Mixture-of-experts blocks: the router, and each expert projection stacked over the experts
# (`[E, out, in]`, GGUF shape (in, out, E)), under mlx-lm's sanitized names (its SwitchGLU).
_GGUF_EXPERT_ROLES = {"ffn_gate_inp.weight": "gate", "ffn_gate_exps.weight": "gate_proj",
                      "ffn_up_exps.weight": "up_proj", "ffn_down_exps.weight": "down_proj"}
_GGUF_MOE_BLOCKS = {"qwen3_moe": "mlp", "mixtral": "block_sparse_moe"}  # model_type -> module


def _gguf_block_names(model_type: str) -> dict[str, str]:
    """GGUF block tensor name -> HF name (after "model.layers.N.") for `model_type`."""
    if model_type not in _GGUF_MOE_BLOCKS:
        return _GGUF_BLOCK_NAMES
    moe = _GGUF_MOE_BLOCKS[model_type]
    names = {k: v for k, v in _GGUF_BLOCK_NAMES.items()
             if not k.startswith(("ffn_gate.", "ffn_up.", "ffn_down.", "attn_q.b", "attn_k.b",
                                  "attn_v.b"))}
    names.update({k: f"{moe}.{role}.weight" if role == "gate" else f"{moe}.switch_mlp.{role}.weight"
                  for k, role in _GGUF_EXPERT_ROLES.items()})
    if model_type == "qwen3_moe":
        names.update({"attn_q_norm.weight": "self_attn.q_norm.weight",
                      "attn_k_norm.weight": "self_attn.k_norm.weight"})
    return names


# GGUF architectures we read, and the mlx-lm model_type they become. llama.cpp permutes the
# Q/K rows of "llama" models (Mixtral included) for its interleaved RoPE; we undo that to get
# HF's layout. llama.cpp has no "mixtral" architecture: its converter writes Mixtral as "llama"
# with llama.expert_count experts, which makes it mlx-lm's "mixtral" here.
_GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3moe": "qwen3_moe"}
_GGUF_MOE_ARCHITECTURES = {"llama": "mixtral", "qwen3moe": "qwen3_moe"}  # with expert_count
GGUF_MAX_EXPERTS = 1 << 12  # the most of any model: 512 (Qwen3-Next)


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` of Q/K rows (convert_hf_to_gguf.py)."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _release_pages(data: np.ndarray) -> None:
    """Let go of the file's pages under `data` (a view of the GGUF's mapping) once it is
    converted: mapped pages count in the process's memory, and a model's resident tensors
    read one after another held both the file's pages and their conversions (measured: ~90 MB
    over the budget at load on the MoE benchmark's GGUF). Clean file pages: nothing is lost,
    a later read maps them again."""
    root = data  # the memmap made over the file: its base is the mmap itself
    while isinstance(root.base, np.ndarray):
        root = root.base
    if not isinstance(root.base, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    # np.memmap maps from its offset rounded down to the allocation granularity
    mapped = root.__array_interface__["data"][0] - getattr(root, "offset", 0) \
        % mmap.ALLOCATIONGRANULARITY
    start = data.__array_interface__["data"][0] - mapped
    first = start - start % mmap.PAGESIZE  # madvise takes whole pages
    with contextlib.suppress(OSError, ValueError):  # an advice, not a requirement
        root.base.madvise(mmap.MADV_DONTNEED, first, start + data.nbytes - first)


_BLOCKS_AT_ONCE = 1 << 16  # 1.2 MB of Q4_1 blocks: ~6 MB of temporaries


def _gguf_blocks(data: np.ndarray, type_name: str, lead: tuple[int, ...]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """GGUF Q4_0/Q4_1/Q8_0 blocks (32 weights each) as MLX's affine quantization, losslessly:
    Q4_1 is w = d·q + m, Q4_0 w = d·(q - 8), Q8_0 w = d·q with q signed, i.e. unsigned q + 128
    with bias -128·d (exact in float16: a power-of-two multiple). `lead`: the shape of the
    tensor but its last (fastest) dimension, e.g. (rows,) or (experts, rows). Returns the
    packed uint32 weight `[*lead, columns·bits/32]`, float16 scales and biases
    `[*lead, columns/32]`, and the bits."""
    head = {"Q4_0": 2, "Q4_1": 4, "Q8_0": 2}[type_name]
    block = head + (32 if type_name == "Q8_0" else 16)
    raw = np.asarray(data, dtype=np.uint8).reshape(-1, block)  # a view of the file's map
    bits = 8 if type_name == "Q8_0" else 4
    n = raw.shape[0]
    packed = np.empty((n, 32 * bits // 8), np.uint8)
    d = np.empty(n, np.float16)
    bias = np.empty(n, np.float16)
    # in slices of blocks: unpacking a whole tensor at once (a 32000-token embedding) held
    # about twice its weights in temporaries, past the budget the plan counts at load
    for lo in range(0, n, _BLOCKS_AT_ONCE):
        part = np.array(raw[lo:lo + _BLOCKS_AT_ONCE])
        d[lo:lo + len(part)] = part[:, :2].copy().view(np.float16)[:, 0]
        qs = part[:, head:]
        if type_name == "Q8_0":
            packed[lo:lo + len(part)] = (qs.view(np.int8).astype(np.int16) + 128).astype(np.uint8)
            bias[lo:lo + len(part)] = -128 * d[lo:lo + len(part)]
            continue
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # GGUF: low nibbles first, then high
        packed[lo:lo + len(part)] = q[:, 0::2] | (q[:, 1::2] << 4)  # MLX: element 2i low
        # nibble of byte i
        bias[lo:lo + len(part)] = (part[:, 2:4].copy().view(np.float16)[:, 0]
                                   if type_name == "Q4_1" else -8 * d[lo:lo + len(part)])
    words = packed.reshape(*lead, -1).view(np.uint32)
    return words, d.reshape(*lead, -1), bias.reshape(*lead, -1), bits


class GGUFSource:
    kind = "gguf"

    def __init__(self, path: Path):
        self.path = path
        self.fields, tensors = read_gguf(path)
        arch = self.meta("general.architecture")
        if not isinstance(arch, str) or arch not in _GGUF_ARCHITECTURES:
            raise SourceError(f"unsupported GGUF architecture {arch!r:.40} in {path.name} "
                              f"(supported: {', '.join(sorted(_GGUF_ARCHITECTURES))}; "
                              "Mixtral is llama with experts)")
        self.arch = arch
        # experts: a count of them; llama.cpp writes none (or 0) for a dense llama
        experts = self.meta(f"{arch}.expert_count")
        if arch == "qwen3moe" or (experts is not None and experts != 0):
            if arch not in _GGUF_MOE_ARCHITECTURES:
                raise SourceError(f"{path.name}: {arch} models with experts are not supported "
                                  f"(supported: {', '.join(sorted(_GGUF_MOE_ARCHITECTURES))})")
            if experts is None:
                raise SourceError(f"{path.name} lacks the metadata {arch}.expert_count")
            experts = whole(experts, f"{path.name}: {arch}.expert_count", 1, GGUF_MAX_EXPERTS,
                            error=SourceError)
            self.model_type = _GGUF_MOE_ARCHITECTURES[arch]
        else:
            experts, self.model_type = 0, _GGUF_ARCHITECTURES[arch]
        self.experts = experts
        self._block_names = _gguf_block_names(self.model_type)
        self.gguf_names = {self._hf_name(name): name for name in tensors}
        self.tensors = {hf: tensors[name] for hf, name in self.gguf_names.items()}
        self.config = self._config()
        if experts:
            self._check_experts()

    def meta(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def _size(self, key: str, default: int | None = None) -> int:
        """Metadata `key`, which must be a positive integer (how large is for the model's
        config check to say, `arch.check_config`)."""
        value = self.meta(key, default)
        if value is None:
            raise SourceError(f"{self.path.name} lacks the metadata {key}")
        return whole(value, f"{self.path.name}: {key}", 1, 1 << 64, error=SourceError)

    def _number(self, key: str, default: float | None = None) -> float:
        value = self.meta(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SourceError(f"{self.path.name}: {key} must be a number, not {value!r:.40}")
        return float(value)

    def _hf_name(self, name: str) -> str:
        if name in _GGUF_GLOBAL_NAMES:
            return _GGUF_GLOBAL_NAMES[name]
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] == "blk" and re.fullmatch(r"0|[1-9][0-9]{0,5}", parts[1]):
            if parts[2] in self._block_names:
                return f"model.layers.{parts[1]}.{self._block_names[parts[2]]}"
            if parts[2] in _GGUF_EXPERT_ROLES:
                raise SourceError(f"{self.path.name}: {name!r} is a tensor of experts, but "
                                  f"{self.arch}.expert_count is {self.experts}")
            if re.fullmatch(r"ffn_(gate|up|down)\.[0-9]+\.weight", parts[2]):
                raise SourceError(f"{self.path.name}: {name!r} is one expert's tensor, from a "
                                  "GGUF written before llama.cpp stacked experts (2024); such "
                                  "files are not supported: convert the model anew")
        raise SourceError(f"unsupported tensor {name!r:.80} in {self.path.name}"
                          + (f" (a {self.model_type} model)" if self.experts else ""))

    def _config(self) -> dict[str, Any]:
        a = self.arch
        heads = self._size(f"{a}.attention.head_count")
        hidden = self._size(f"{a}.embedding_length")
        layers = self._size(f"{a}.block_count")
        # blocks are counted against the tensors before anything is sized by their number
        present = {int(n.split(".")[2]) for n in self.tensors if n.startswith("model.layers.")}
        if layers != len(present) or max(present) != layers - 1:  # (no set of `layers`)
            raise SourceError(f"{self.path.name}: block_count is {layers}, the tensors are of "
                              f"{len(present)} blocks")
        tokens = self.meta("tokenizer.ggml.tokens")
        if tokens is not None and not (isinstance(tokens, list)
                                       and all(isinstance(t, str) for t in tokens)):
            raise SourceError(f"{self.path.name}: tokenizer.ggml.tokens is not a list of "
                              "strings")
        vocab = self.meta(f"{a}.vocab_size") or (len(tokens) if tokens else None)
        embed = self.tensors.get("model.embed_tokens.weight")
        if vocab is None and embed is not None:
            vocab = embed.shape[-1]
        if self.meta(f"{a}.rope.scaling.type", "none") not in ("none", None):
            raise SourceError(f"{self.path.name}: RoPE scaling is not supported yet")
        config = {
            "model_type": self.model_type,
            "hidden_size": hidden,
            "intermediate_size": self._size(  # qwen3moe: unused (no dense blocks)
                f"{a}.feed_forward_length",
                self.meta(f"{a}.expert_feed_forward_length") if a == "qwen3moe" else None),
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": self._size(f"{a}.attention.head_count_kv", heads),
            "head_dim": self._size(f"{a}.attention.key_length", max(1, hidden // heads)),
            "rms_norm_eps": self._number(f"{a}.attention.layer_norm_rms_epsilon"),
            "rope_theta": self._number(f"{a}.rope.freq_base", 10000.0),
            "max_position_embeddings": self._size(f"{a}.context_length", 2048),
            "vocab_size": whole(vocab, f"{self.path.name}: the vocabulary size", 1, 1 << 64,
                                error=SourceError),
            "hidden_act": "silu",
            "tie_word_embeddings": "lm_head.weight" not in self.tensors,
        }
        for key in ("bos_token_id", "eos_token_id"):
            value = self.meta(f"tokenizer.ggml.{key}")
            if value is not None:  # a token of the vocabulary: arch.check_config says
                config[key] = whole(value, f"{self.path.name}: {key}", 0, 1 << 64,
                                    error=SourceError)
        if self.experts:
            config.update(self._moe_config(config))
        return config

    def _moe_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The MoE entries of mlx-lm's config for `self.model_type` (llama.cpp's keys)."""
        a, name, experts = self.arch, self.path.name, self.experts
        used = whole(self.meta(f"{a}.expert_used_count"), f"{name}: {a}.expert_used_count", 1,
                     experts, error=SourceError)
        gating = self.meta(f"{a}.expert_gating_func", 1)
        if gating != 1:  # llama_expert_gating_func_type: 1 softmax, 2 sigmoid
            raise SourceError(f"{name}: {a}.expert_gating_func {gating!r:.40} is not supported "
                              "(softmax, 1, is)")
        for key in ("expert_shared_count", "expert_group_count"):
            if self.meta(f"{a}.{key}", 0) != 0:
                raise SourceError(f"{name}: {a}.{key} is not supported (experts shared or in "
                                  "groups)")
        if self.model_type == "mixtral":
            # mlx-lm's Mixtral takes head_dim = hidden_size / heads and the expert FFN size
            # from intermediate_size (llama.cpp: feed_forward_length)
            if config["head_dim"] * config["num_attention_heads"] != config["hidden_size"]:
                raise SourceError(f"{name}: {a}.attention.key_length {config['head_dim']} is "
                                  "not hidden_size / heads, as Mixtral's is")
            return {"num_local_experts": experts, "num_experts_per_tok": used,
                    "rope_traditional": False}
        norm = self.meta(f"{a}.expert_weights_norm", True)  # llama.cpp: qwen3moe normalizes
        if not isinstance(norm, bool):
            raise SourceError(f"{name}: {a}.expert_weights_norm must be a bool")
        return {"num_experts": experts, "num_experts_per_tok": used,
                "moe_intermediate_size": self._size(f"{a}.expert_feed_forward_length"),
                "norm_topk_prob": norm, "decoder_sparse_step": 1, "mlp_only_layers": []}

    def _check_experts(self) -> None:
        """Every block of a MoE model has its router and its experts, shaped as the metadata
        says (experts, sizes): nothing is sized by a count the tensors do not bear out."""
        c, moe = self.config, _GGUF_MOE_BLOCKS[self.model_type]
        e, d, hd = self.experts, c["hidden_size"], c["head_dim"]
        f = c["moe_intermediate_size" if self.model_type == "qwen3_moe" else "intermediate_size"]
        shapes = {f"{moe}.gate.weight": (e, d), f"{moe}.switch_mlp.gate_proj.weight": (e, f, d),
                  f"{moe}.switch_mlp.up_proj.weight": (e, f, d),
                  f"{moe}.switch_mlp.down_proj.weight": (e, d, f)}
        if self.model_type == "qwen3_moe":
            shapes.update({"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
        for i in range(c["num_hidden_layers"]):
            for suffix, shape in shapes.items():
                hf = f"model.layers.{i}.{suffix}"
                t = self.tensors.get(hf)
                gguf_name = next(k for k, v in self._block_names.items() if v == suffix)
                if t is None:
                    raise SourceError(f"{self.path.name} lacks the tensor blk.{i}.{gguf_name} "
                                      f"of its {self.model_type} model")
                if tuple(reversed(t.shape)) != shape:
                    raise SourceError(
                        f"{self.path.name}: blk.{i}.{gguf_name} has the shape {list(t.shape)}, "
                        f"its metadata ({e} experts, hidden size {d}, expert FFN size {f}, head "
                        f"size {hd}) says {list(reversed(shape))}")

    def names(self) -> list[str]:
        return list(self.tensors)

    def _stored(self, name: str, expert: int | None) -> tuple[GGUFTensor, np.ndarray,
                                                               tuple[int, ...]]:
        """Tensor `name`, its data (of one `expert` of a stacked tensor if given) and that
        data's shape in HF order."""
        t = self.tensors[name]
        shape = tuple(int(n) for n in reversed(t.shape))
        if expert is None:
            return t, t.data, shape
        if len(shape) != 3:
            raise SourceError(f"{self.path.name}: {name} is not a tensor of experts")
        whole(expert, f"{self.path.name}: an expert of {name}", 0, shape[0] - 1,
              error=SourceError)
        return t, t.data[expert], shape[1:]

    def get(self, name: str, expert: int | None = None) -> mx.array:
        """Tensor `name` dequantized, float32, in HF's layout (experts stacked `[E, out, in]`);
        with `expert`, that expert's `[out, in]` only."""
        import gguf

        t, data, shape = self._stored(name, expert)
        try:
            w = gguf.quants.dequantize(data, t.tensor_type)
        except NotImplementedError:
            raise SourceError(f"{self.path.name}: tensor type {t.tensor_type.name} of {name} "
                              "cannot be dequantized") from None
        w = np.asarray(w, dtype=np.float32).reshape(shape)
        _release_pages(data)
        return mx.array(self._hf_rows(name, w))

    def _hf_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """`rows` of tensor `name` in HF's order: llama.cpp permutes llama's Q/K rows
        (Mixtral's too; not Qwen's)."""
        if self.arch != "llama" or not name.endswith(("q_proj.weight", "k_proj.weight")):
            return rows
        c = self.config
        heads = c["num_attention_heads"] if "q_proj" in name else c["num_key_value_heads"]
        return _unpermute_qk(rows, heads)

    def tensor_sizes(self) -> dict[str, tuple[int, int]]:
        """Each tensor's (elements, bytes as stored), from the header alone."""
        return {n: (math.prod(t.shape), t.n_bytes) for n, t in self.tensors.items()}

    def stored_dtype(self, name: str) -> str:
        """The float dtype tensor `name` is stored in (quantized blocks: their float16
        scales; types that are dequantized: float16, as llama.cpp computes them)."""
        return {"F32": "float32", "BF16": "bfloat16"}.get(self.tensors[name].tensor_type.name,
                                                          "float16")

    def get_weight(self, name: str, expert: int | None = None) -> Weight:
        """Tensor `name` as stored: a QuantizedTensor for Q4_0/Q4_1/Q8_0 (group size 32,
        float16 scales and biases; experts stacked: weight `[E, out, in·bits/32]` uint32,
        scales and biases `[E, out, in/32]`), else as `get` gives it. With `expert`, that
        expert's `[out, ...]` only."""
        t, data, shape = self._stored(name, expert)
        if t.tensor_type.name not in ("Q4_0", "Q4_1", "Q8_0"):
            return self.get(name, expert)
        *arrays, bits = _gguf_blocks(data, t.tensor_type.name, shape[:-1] or (1,))
        _release_pages(data)
        return QuantizedTensor(*(mx.array(self._hf_rows(name, a)) for a in arrays), bits, 32)

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
        tokens = tokenizer["tokens"]
        for name, key in _SPECIAL_TOKENS.items():
            token_id = self.meta(f"tokenizer.ggml.{key}")
            if token_id is not None:
                token_id = whole(token_id, f"{self.path.name}: {key}", 0, len(tokens) - 1,
                                 error=SourceError)
            config[name] = None if token_id is None else tokens[token_id]
        try:
            backend, _ = convert_gguf_tokenizer(self.arch, tokenizer)
            tokenizer_fast = PreTrainedTokenizerFast(tokenizer_object=backend, **config)
        except Exception as e:  # transformers raises anything on metadata it did not expect
            raise SourceError(f"cannot rebuild the tokenizer of {self.path.name}: "
                              f"{type(e).__name__}: {e}") from None
        tokenizer_fast.save_pretrained(str(dest))
        check_tokenizer(dest, self.config.get("eos_token_id"), self.path.name)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.path.name, "bytes": self.path.stat().st_size,
                "file_type": self.meta("general.file_type")}


