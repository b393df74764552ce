"""The MoE benchmark's model (tools/bench_moe.py): Qwen3-30B-A3B's shape, 4-bit, routing by its
own weights as the benchmark asks, written as mlx-lm's `convert -q` writes it (a folder) and as
llama.cpp's converter lays a qwen3moe out in GGUF, the same dequantized weights in both.

The design. Hidden dimensions come in quantization groups of 64, each group one part:
  constant  group 0: every token's embedding holds CONST there (it drives popularity)
  walk      groups 1-2 (128 dims): the token's point on a slow random walk (it drives reuse)
  key       the other groups: a random 4-bit vector per token (it drives the next token)
The vocabulary's ordinary tokens form one cycle (a seeded permutation); along it the walk is
AR(1): w[next] = rho w + sqrt(1 - rho^2) xi. The LM head's row of a token is the key of the
token before it in the cycle (zero for the special tokens, which nothing precedes), so greedy
decoding walks the cycle with a margin of ~10x the noise (robust to llama.cpp's arithmetic).
Attention's o_proj and the experts' down_proj have tiny scales (2^-16), so the residual stream
stays the current token's embedding to ~1%: every layer's routing is a function of it. Router
row e of a layer = [pop_e spread over the constant group | a random vector in the walk dims |
0], pop_e = -beta log(rank of e) over a per-layer random order of the experts (a Zipf-like
popularity); 8-bit with bias = -128 scale (symmetric, so GGUF F32 holds the same values).
`tune` picks beta and rho by simulating that routing (the embeddings through RMSNorm and the
routers, top-k) so that the long-run share of routings to a layer's top 25% of experts and the
mean Jaccard of consecutive tokens' experts meet their targets.

Every scale and bias is a bfloat16 that float16 holds exactly (checked), so GGUF's Q4_1 (two
blocks of 32 per group of 64: d = scale, m = bias as float16, nibbles reordered) dequantizes
to MLX's values bit for bit; norms and the routers (dequantized) are F32 there, as llama.cpp's
converter writes them.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

GROUP, BITS = 64, 4  # mlx-lm's convert -q; its qwen3_moe quant_predicate: routers 8-bit
CONST_GROUPS, WALK_GROUPS = 1, 2
CONST = 1.0
KEY_SCALE = 0.25  # key values ±0.125 .. ±1.875: variance ~1.3, like the walk's 1
SMALL_SCALE = 2.0**-16  # o_proj's and down_proj's: their outputs ~1e-3 of the stream's
SPECIALS = 3  # fixtures.SPECIAL: ids below this are never decoded


def bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even)."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ----------------------------------------------------------------------------- quantization


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Integers `[..., cols]` (< 2^bits) -> MLX's packed uint32 words (element i of a word at
    bits i*bits, little end first)."""
    per = 32 // bits
    q = q.astype(np.uint32).reshape(*q.shape[:-1], -1, per)
    return np.bitwise_or.reduce(q << (bits * np.arange(per, dtype=np.uint32)), axis=-1)


def unpack(words: np.ndarray, bits: int) -> np.ndarray:
    per = 32 // bits
    q = (words[..., None] >> (bits * np.arange(per, dtype=np.uint32))) & (2**bits - 1)
    return q.reshape(*words.shape[:-1], -1).astype(np.uint8)


def dequantize(words: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int
               ) -> np.ndarray:
    """MLX's affine dequantization (scales, biases as bfloat16 bits), in float32."""
    q = unpack(words, bits).astype(np.float32)
    q = q.reshape(*scales.shape, -1)
    out = q * from_bf16(scales)[..., None] + from_bf16(biases)[..., None]
    return out.reshape(*words.shape[:-1], -1)


def affine4(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`[rows, cols]` floats -> (nibbles, scale bits, bias bits): per group of 64, min to max
    in 16 levels (a constant group: scale 0, bias its value)."""
    g = values.reshape(values.shape[0], -1, GROUP)
    lo, hi = g.min(-1), g.max(-1)
    s, b = from_bf16(bf16((hi - lo) / 15)), from_bf16(bf16(lo))
    q = np.rint((g - b[..., None]) / np.where(s > 0, s, 1)[..., None])
    return np.clip(q, 0, 15).astype(np.uint8).reshape(values.shape), bf16(s), bf16(b)


def symmetric8(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`[rows, cols]` floats -> (bytes, scale bits, bias bits), 8-bit with bias = -128 scale:
    value = scale (q - 128), exact in float32 and in GGUF's F32."""
    g = values.reshape(values.shape[0], -1, GROUP)
    s = from_bf16(bf16(np.abs(g).max(-1) / 127))
    q = np.rint(g / np.where(s > 0, s, 1)[..., None]) + 128
    return np.clip(q, 1, 255).astype(np.uint8).reshape(values.shape), bf16(s), bf16(-128 * s)


def q4_1_blocks(words: np.ndarray, scales: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """MLX 4-bit group-64 rows -> GGUF Q4_1 bytes `[..., cols/32 * 20]`: per 32 values d (the
    group's scale) and m (its bias) as float16, then 16 bytes whose low nibbles are values
    0-15 and high nibbles 16-31. ValueError if a scale or bias is not float16-exact."""
    f32 = [from_bf16(a) for a in (scales, biases)]
    f16 = [a.astype(np.float16) for a in f32]
    if not all(np.array_equal(a.astype(np.float32), b) for a, b in zip(f16, f32, strict=True)):
        raise ValueError("a scale or bias float16 does not hold exactly")
    lead, cols = words.shape[:-1], words.shape[-1] * 8
    by = np.ascontiguousarray(words).view(np.uint8).reshape(-1, 16)  # one block of 32 a row
    first, second = by[:, :8], by[:, 8:]  # values 0-15 and 16-31, two a byte (low first)
    out = np.empty((by.shape[0], 20), np.uint8)
    for i, a in enumerate(f16):  # each group's d (i = 0) and m (1), on both its blocks
        out[:, 2 * i:2 * i + 2] = np.repeat(a.reshape(-1), 2).view(np.uint8).reshape(-1, 2)
    out[:, 4::2] = (first & 0x0F) | (second << 4)  # value 2j | value 2j+16 << 4
    out[:, 5::2] = (first >> 4) | (second & 0xF0)
    return out.reshape(*lead, cols // 32 * 20)


# ----------------------------------------------------------------------------- the design


@dataclass(frozen=True)
class Design:
    """The routing design of a model with `hidden` dims, `experts` per layer (top-`k`) and
    `vocab` tokens; `beta` (popularity) and `rho` (reuse) as `tune` picks them."""

    hidden: int
    experts: int
    k: int
    vocab: int
    beta: float
    rho: float
    seed: int = 0

    @property
    def walk(self) -> slice:
        return slice(CONST_GROUPS * GROUP, (CONST_GROUPS + WALK_GROUPS) * GROUP)

    @property
    def key(self) -> slice:
        return slice(self.walk.stop, self.hidden)

    def rng(self, *tag: int | str) -> np.random.Generator:
        return np.random.default_rng([self.seed, *(t if isinstance(t, int) else
                                                   int.from_bytes(t.encode(), "little")
                                                   for t in tag)])

    @cached_property
    def cycle(self) -> np.ndarray:
        """The ordinary tokens in decoding order (each one's successor the next, cyclically)."""
        return SPECIALS + self.rng("cycle").permutation(self.vocab - SPECIALS)

    def successor(self, token: int) -> int:
        pos = int(np.flatnonzero(self.cycle == token)[0])
        return int(self.cycle[(pos + 1) % len(self.cycle)])

    def embedding_rows(self, walk: np.ndarray, keys: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Embedding rows (nibbles, scales, biases) of tokens with these walk values
        `[n, 128]` and key nibbles `[n, key dims]`."""
        n = len(walk)
        q = np.zeros((n, self.hidden), np.uint8)
        s = np.zeros((n, self.hidden // GROUP), np.uint16)
        b = s.copy()
        c = self.walk.start // GROUP
        b[:, :c] = bf16(np.full(1, CONST))
        w = slice(c, self.walk.stop // GROUP)
        q[:, self.walk], s[:, w], b[:, w] = affine4(walk)
        q[:, self.key] = keys
        s[:, w.stop:] = bf16(np.full(1, KEY_SCALE))
        b[:, w.stop:] = bf16(np.full(1, -7.5 * KEY_SCALE))
        return q, s, b

    def keys(self, n: int, tag: int | str = "keys") -> np.ndarray:
        return self.rng(tag).integers(0, 16, (n, self.key.stop - self.key.start), np.uint8)

    def ar1(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """`[n, 128]` steps of the walk (stationary, unit variance per dim)."""
        dims = self.walk.stop - self.walk.start
        xi = rng.standard_normal((n, dims)).astype(np.float32)
        out = np.empty_like(xi)
        out[0] = xi[0]
        step = np.sqrt(1 - self.rho**2)
        for i in range(1, n):
            out[i] = self.rho * out[i - 1] + step * xi[i]
        return out

    @cached_property
    def embedding(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The embedding table: nibbles `[vocab, hidden]`, scale and bias bits."""
        walk = self.rng("walk").standard_normal((self.vocab, self.walk.stop - self.walk.start))
        walk = walk.astype(np.float32)
        walk[self.cycle] = self.ar1(len(self.cycle), self.rng("cycle-walk"))
        return self.embedding_rows(walk, self.keys(self.vocab))

    @cached_property
    def lm_head(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row of token u: the key of the token before u in the cycle; zero elsewhere."""
        q, s, b = (np.zeros_like(a) for a in self.embedding)
        eq, es, eb = self.embedding
        before, after = self.cycle, np.roll(self.cycle, -1)
        keys = slice(self.walk.stop // GROUP, None)
        q[after, self.key] = eq[before, self.key]
        s[after, keys], b[after, keys] = es[before, keys], eb[before, keys]
        return q, s, b

    def router(self, layer: int) -> np.ndarray:
        """Layer `layer`'s router weights `[experts, hidden]` (floats before quantization)."""
        rng = self.rng("router", layer)
        rank = np.empty(self.experts)
        rank[rng.permutation(self.experts)] = np.arange(1, self.experts + 1)
        pop = -self.beta * np.log(rank)
        w = np.zeros((self.experts, self.hidden), np.float32)
        w[:, :self.walk.start] = (pop - pop.mean())[:, None] / self.walk.start
        dims = self.walk.stop - self.walk.start
        w[:, self.walk] = rng.standard_normal((self.experts, dims)) / np.sqrt(dims)
        return w

    def router8(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return symmetric8(self.router(layer))


def rms_norm(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def route(design: Design, embeddings: np.ndarray, layers: int) -> np.ndarray:
    """`[layers, tokens, k]`: each layer's top-k experts for these embedding rows (floats) as
    the model routes them with its other blocks' outputs left out."""
    x = rms_norm(embeddings)
    out = []
    for layer in range(layers):
        q, s, b = design.router8(layer)
        logits = x @ dequantize(pack(q, 8), s, b, 8).T
        out.append(np.argsort(-logits, axis=-1, kind="stable")[:, :design.k])
    return np.stack(out)


def routing_stats(trace: np.ndarray, n: int) -> dict[str, float]:
    """The share of routings to each layer's most routed 25% of experts, and the mean Jaccard
    similarity of consecutive tokens' expert sets (`trace`: `[layers, tokens, k]`)."""
    share, jac = [], []
    for layer in trace:
        counts = np.sort(np.bincount(layer.reshape(-1), minlength=n))[::-1]
        share.append(counts[: n // 4].sum() / counts.sum())
        member = np.zeros((len(layer), n), bool)
        np.put_along_axis(member, layer, True, axis=1)
        inter = (member[1:] & member[:-1]).sum(1)
        jac.extend(inter / (member[1:] | member[:-1]).sum(1))
    return {"top25_share": float(np.mean(share)), "jaccard": float(np.mean(jac))}


def simulate(design: Design, tokens: int = 2000, layers: int = 2) -> np.ndarray:
    """The design's routing over `tokens` steps of a fresh walk (not the vocabulary's)."""
    walk = design.ar1(tokens, design.rng("probe"))
    q, s, b = design.embedding_rows(walk, design.keys(tokens, "probe-keys"))
    return route(design, dequantize(pack(q, 4), s, b, 4), layers)


def tune(hidden: int, experts: int, k: int, vocab: int, share: float, jaccard: float,
         seed: int = 0, tokens: int = 2000) -> Design:
    """beta and rho such that the simulated routing's long-run top-25% share is `share` and its
    consecutive Jaccard `jaccard` (alternating bisections: the share grows with beta, the
    Jaccard with rho, each a little with the other)."""
    beta, rho = 1.0, 0.9
    for _ in range(3):
        for which in ("rho", "beta"):
            lo, hi = (0.0, 0.999) if which == "rho" else (0.0, 2.0)
            for _ in range(12):
                mid = (lo + hi) / 2
                d = Design(hidden, experts, k, vocab, mid if which == "beta" else beta,
                           mid if which == "rho" else rho, seed)
                stats = routing_stats(simulate(d, tokens), experts)
                low = stats["jaccard"] < jaccard if which == "rho" \
                    else stats["top25_share"] < share
                lo, hi = (mid, hi) if low else (lo, mid)
            beta, rho = ((lo + hi) / 2, rho) if which == "beta" else (beta, (lo + hi) / 2)
    return Design(hidden, experts, k, vocab, beta, rho, seed)


# ----------------------------------------------------------------------------- tensors


def tensors(config: dict) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict]:
    """mlx-lm's quantized model's tensors (name -> shape, dtype) and config, as its
    `convert -q` writes them; the model is built lazily (nothing allocated)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes, quantize_model

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model, qconfig = quantize_model(model, dict(config), GROUP, BITS)
    out = {}
    for name, a in tree_flatten(model.parameters()):
        out[name] = (tuple(a.shape), "uint32" if a.dtype == mx.uint32 else "bfloat16")
    return out, qconfig


class ModelTensors:
    """Every tensor of the designed model, by mlx-lm name, as the folder stores it (packed
    words, bfloat16 bits); each quantized matrix's (words, scales, biases) made together."""

    def __init__(self, config: dict, design: Design):
        self.design = design
        self.specs, self.qconfig = tensors(config)
        self._last: tuple[str, tuple] | None = None

    def bits(self, base: str) -> int:
        words = self.specs[f"{base}.weight"][0][-1]
        return words * 32 // (self.specs[f"{base}.scales"][0][-1] * GROUP)

    def matrix(self, base: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(words, scale bits, bias bits) of quantized matrix `base`."""
        if self._last and self._last[0] == base:
            return self._last[1]
        d = self.design
        if base == "model.embed_tokens":
            q, s, b = d.embedding
            out = pack(q, 4), s, b
        elif base == "lm_head":
            q, s, b = d.lm_head
            out = pack(q, 4), s, b
        elif base.endswith(".mlp.gate"):
            q, s, b = d.router8(int(base.split(".")[2]))
            out = pack(q, 8), s, b
        else:  # random 4-bit: uniform nibbles, mean 0; std ~1/sqrt(fan in), or tiny
            shape = self.specs[f"{base}.weight"][0]
            rng = d.rng(base)
            words = rng.integers(0, 2**32, size=shape, dtype=np.uint32)
            groups = self.specs[f"{base}.scales"][0]
            if base.endswith(("o_proj", "down_proj")):
                s = np.full(groups, SMALL_SCALE, np.float32)
            else:
                fan_in = groups[-1] * GROUP
                s = fan_in**-0.5 / 4.6 * rng.uniform(0.75, 1.25, groups).astype(np.float32)
            s = from_bf16(bf16(s))
            out = words, bf16(s), bf16(-7.5 * s)
        self._last = (base, out)
        return out

    def __call__(self, name: str) -> np.ndarray:
        shape, _ = self.specs[name]
        if len(shape) == 1:  # norms
            return bf16(np.ones(shape, np.float32))
        base, part = name.rsplit(".", 1)
        return self.matrix(base)[("weight", "scales", "biases").index(part)]


# ----------------------------------------------------------------------------- the folder


def write_safetensors(path: Path, specs: dict[str, tuple[tuple[int, ...], str]],
                      make: Callable[[str], np.ndarray]) -> None:
    """A safetensors file written tensor by tensor (`make(name)` -> its array)."""
    codes = {"uint32": ("U32", 4), "bfloat16": ("BF16", 2)}
    header, offset = {}, 0
    for name, (shape, dtype) in specs.items():
        n = int(np.prod(shape)) * codes[dtype][1]
        header[name] = {"dtype": codes[dtype][0], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "mlx"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, (shape, _) in specs.items():
            a = make(name)
            assert a.shape == shape, (name, a.shape, shape)
            f.write(np.ascontiguousarray(a).tobytes())
    tmp.rename(path)


def _shard(name: str) -> str:
    return name.split(".layers.")[1].split(".")[0] if ".layers." in name else "rest"


def write_folder(folder: Path, config: dict, design: Design) -> dict:
    """The model as an mlx-lm folder (one shard per layer, the rest in one more); returns
    its config."""
    from fixtures import save_byte_tokenizer
    from mlx_lm.utils import save_config

    made = ModelTensors(config, design)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: dict[str, dict] = {}
    for name, spec in made.specs.items():
        shards.setdefault(_shard(name), {})[name] = spec
    files = {i: f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
             for n, i in enumerate(shards)}
    weight_map = {}
    for i, group in shards.items():
        t0 = time.perf_counter()
        write_safetensors(tmp / files[i], group, made)
        weight_map.update(dict.fromkeys(group, files[i]))
        print(f"  wrote {files[i]} ({time.perf_counter() - t0:.1f} s)", flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}, indent=1))
    save_config(made.qconfig, tmp / "config.json")
    save_byte_tokenizer(tmp)
    tmp.rename(folder)
    return made.qconfig


# ----------------------------------------------------------------------------- the GGUF

# mlx-lm's names -> llama.cpp's (convert_hf_to_gguf.py's qwen3moe tensors)
GGUF_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
               "lm_head": "output"}
GGUF_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
              "mlp.gate": "ffn_gate_inp", "mlp.switch_mlp.gate_proj": "ffn_gate_exps",
              "mlp.switch_mlp.up_proj": "ffn_up_exps",
              "mlp.switch_mlp.down_proj": "ffn_down_exps"}


def gguf_name(base: str) -> str:
    if base in GGUF_GLOBAL:
        return GGUF_GLOBAL[base] + ".weight"
    _, _, layer, rest = base.split(".", 3)
    return f"blk.{layer}.{GGUF_BLOCK[rest]}.weight"


def gguf_tensors(made: ModelTensors) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """(mlx-lm base name, GGML type, numpy shape of the stored bytes/floats), in file order."""
    for name, (shape, _) in made.specs.items():
        if len(shape) == 1:
            yield name.removesuffix(".weight"), "F32", shape
        elif name.endswith(".weight"):
            base = name.removesuffix(".weight")
            cols = made.specs[f"{base}.scales"][0][-1] * GROUP
            if made.bits(base) == 8:  # the router: F32, as the converter keeps it
                yield base, "F32", (*shape[:-1], cols)
            else:
                yield base, "Q4_1", (*shape[:-1], cols // 32 * 20)


def gguf_data(made: ModelTensors, base: str, kind: str) -> np.ndarray:
    if f"{base}.scales" not in made.specs:  # a norm
        return from_bf16(made(f"{base}.weight"))
    words, s, b = made.matrix(base)
    if kind == "F32":
        return dequantize(words, s, b, made.bits(base))
    return q4_1_blocks(words, s, b)


def write_gguf(path: Path, config: dict, design: Design) -> None:
    """The model as llama.cpp's qwen3moe GGUF (gguf-py's writer, tensor by tensor); its
    tokenizer a byte-level BPE over `vocab` distinct tokens (fed token ids, never text)."""
    import gguf
    from fixtures import add_byte_tokenizer, byte_vocab

    made = ModelTensors(config, design)
    c = made.qconfig
    arch = "qwen3moe"
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for key, value in {
            "context_length": c["max_position_embeddings"], "embedding_length": c["hidden_size"],
            "feed_forward_length": c["intermediate_size"], "block_count": c["num_hidden_layers"],
            "attention.head_count": c["num_attention_heads"],
            "attention.head_count_kv": c["num_key_value_heads"],
            "expert_count": c["num_experts"], "expert_used_count": c["num_experts_per_tok"],
            "expert_feed_forward_length": c["moe_intermediate_size"],
            "attention.key_length": c["head_dim"],
            "attention.value_length": c["head_dim"]}.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.rope.freq_base", c["rope_theta"])
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c["rms_norm_eps"])
    writer.add_uint32("general.file_type", int(gguf.LlamaFileType.MOSTLY_Q4_1))
    tokens, merges = byte_vocab()
    tokens += [f"<t{i}>" for i in range(c["vocab_size"] - len(tokens))]
    add_byte_tokenizer(writer, tokens, merges, "qwen2", c["bos_token_id"], c["eos_token_id"])
    order = list(gguf_tensors(made))
    for base, kind, shape in order:
        t = gguf.GGMLQuantizationType[kind]
        dtype = np.dtype(np.float32 if kind == "F32" else np.uint8)
        writer.add_tensor_info(gguf_name(base), shape, dtype,
                               int(np.prod(shape)) * dtype.itemsize,
                               None if kind == "F32" else t)
    writer.write_header_to_file(tmp)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    t0 = time.perf_counter()
    for base, kind, shape in order:
        data = gguf_data(made, base, kind)
        assert data.shape == tuple(shape), (base, data.shape, shape)
        writer.write_tensor_data(np.ascontiguousarray(data))
        if base.endswith("down_proj"):
            print(f"  wrote {base.rsplit('.', 3)[0]} ({time.perf_counter() - t0:.1f} s)",
                  flush=True)
    writer.close()
    tmp.rename(path)
