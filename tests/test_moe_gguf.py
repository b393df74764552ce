"""GGUF files of mixture-of-experts models (llama.cpp's qwen3moe, and Mixtral, which llama.cpp
writes as a llama with experts) read as mlx-lm's qwen3_moe / mixtral: config, sanitized
parameter names and shapes, weights dequantized and as stored, hostile metadata refused."""

from __future__ import annotations

import importlib
import tracemalloc
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny_models import greedy_logits
from tiny_moe_gguf import MOE_ARCHS, write_moe_gguf

from mlx_flash.arch import QuantizedTensor
from mlx_flash.sources import SourceError, open_source

ARCHS = list(MOE_ARCHS)
QTYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"]
# relative error bounds of each type's rows (sanity only: exactness is against gguf-py)
TOLERANCE = {"F32": 0, "F16": 1e-3, "Q8_0": 2e-2, "Q4_0": 0.3, "Q4_1": 0.3}


def mlx_lm_model(config: dict):
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    return module.Model(module.ModelArgs.from_dict(config))


def loaded(config: dict, weights: dict) -> object:
    model = mlx_lm_model(config)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])  # strict: all of them
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def moe_files(tmp_path_factory):
    """(arch, qtype) -> (path, what write_moe_gguf wrote), written once."""
    root = tmp_path_factory.mktemp("moe-gguf")
    cache: dict[tuple[str, str], tuple[Path, dict]] = {}

    def get(arch: str, qtype: str) -> tuple[Path, dict]:
        if (arch, qtype) not in cache:
            path = root / f"{arch}-{qtype}.gguf"
            cache[arch, qtype] = path, write_moe_gguf(path, arch, qtype)
        return cache[arch, qtype]

    return get


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_moe_gguf_reads_as_mlx_lm_model(moe_files, arch, qtype):
    path, written = moe_files(arch, qtype)
    source = open_source(path)
    config = source.config
    assert config["model_type"] == MOE_ARCHS[arch][1]
    for key, value in written["config"].items():  # everything mlx-lm's config holds
        assert config[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float)
                               else value), key
    expected = {k: tuple(v.shape) for k, v in tree_flatten(mlx_lm_model(config).parameters())}
    assert sorted(source.names()) == sorted(expected)
    for name in source.names():
        w = source.get(name)
        assert w.dtype == mx.float32 and tuple(w.shape) == expected[name], name
        w = np.array(w)
        # exactly what gguf-py dequantizes the written blocks to, in mlx-lm's layout
        np.testing.assert_array_equal(w, written["dequantized"][name], err_msg=name)
        ref = written["weights"][name]
        rel = np.linalg.norm(w - ref) / np.linalg.norm(ref)
        assert rel <= TOLERANCE[written["qtypes"][name]], (name, rel)

        stored = source.get_weight(name)
        if w.ndim == 3:  # one expert at a time: the same rows
            for e in (0, w.shape[0] - 1):
                np.testing.assert_array_equal(np.array(source.get(name, expert=e)), w[e])
                one = source.get_weight(name, expert=e)
                one = one.dequantize() if isinstance(one, QuantizedTensor) else one
                np.testing.assert_array_equal(np.array(one), w[e])
            for e in (-1, w.shape[0], 10**9):
                with pytest.raises(SourceError, match="an expert of"):
                    source.get(name, expert=e)
        if written["qtypes"][name] not in ("Q8_0", "Q4_0", "Q4_1"):
            assert isinstance(stored, mx.array)
            np.testing.assert_array_equal(np.array(stored), w)
            continue
        assert isinstance(stored, QuantizedTensor), name
        bits = 8 if qtype == "Q8_0" else 4
        assert (stored.bits, stored.group_size) == (bits, 32)
        *lead, columns = expected[name]
        assert stored.weight.dtype == mx.uint32
        assert tuple(stored.weight.shape) == (*lead, columns * bits // 32)
        assert stored.scales.dtype == stored.biases.dtype == mx.float16
        assert tuple(stored.scales.shape) == tuple(stored.biases.shape) \
            == (*lead, columns // 32)
        np.testing.assert_array_equal(np.array(stored.dequantize()), w, err_msg=name)
        # mx.dequantize computes in its scales' dtype: float32 ones give gguf-py's exactly
        # (float16 ones round the products to float16)
        plain = mx.dequantize(stored.weight, stored.scales.astype(mx.float32),
                              stored.biases.astype(mx.float32), group_size=32, bits=bits)
        np.testing.assert_array_equal(np.array(plain), w, err_msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_moe_gguf_logits_match_mlx_lm(moe_files, arch):
    """mlx-lm's model of get()'s weights decodes as mlx-lm's of the weights written (F32)."""
    path, written = moe_files(arch, "F32")
    source = open_source(path)
    ours = loaded(source.config, {n: source.get(n) for n in source.names()})
    reference = loaded(written["config"], written["weights"])
    prompt = [1, 40, 72, 101, 108, 108, 111, 2]
    np.testing.assert_array_equal(greedy_logits(ours, prompt, 6),
                                  greedy_logits(reference, prompt, 6))


@pytest.mark.parametrize("arch", ARCHS)
def test_moe_gguf_tokenizer_and_description(moe_files, arch, tmp_path):
    from transformers import AutoTokenizer

    path, _ = moe_files(arch, "Q8_0")
    source = open_source(path)
    source.save_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tokenizer.decode(tokenizer.encode("the cat")) == "the cat"
    assert source.describe()["kind"] == "gguf"


def _dequantizable() -> list[str]:
    out = []
    for t in gguf.GGMLQuantizationType:
        block, size = gguf.GGML_QUANT_SIZES[t]
        if t.name in ("F32", "I8", "I16", "I32", "I64", "F64"):
            continue
        try:
            gguf.quants.dequantize(np.zeros((1, size), np.uint8), t)
        except (NotImplementedError, ValueError):
            continue
        out.append(t.name)
    return out


# every in-dimension a multiple of 256, the largest block; the smallest such model
BIG_BLOCKS = {"hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1,
              "head_dim": 128, "expert_ffn": 256, "experts": 2, "experts_per_tok": 1,
              "num_hidden_layers": 1}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random blocks: NaN scales, inf
@pytest.mark.parametrize("qtype", _dequantizable())
def test_moe_gguf_every_type_dequantizes(tmp_path, qtype):
    """Every GGML type gguf-py dequantizes reads through `get`, experts stacked: what gguf-py
    makes of the blocks (random blocks for types it cannot quantize), Mixtral's Q/K rows
    un-permuted."""
    for arch in ARCHS if qtype in ("Q4_K", "IQ4_NL", "BF16") else ARCHS[:1]:
        path = tmp_path / f"{arch}.gguf"
        written = write_moe_gguf(path, arch, qtype, **BIG_BLOCKS)
        source = open_source(path)
        assert sorted(source.names()) == sorted(written["dequantized"])
        for name, ref in written["dequantized"].items():
            np.testing.assert_array_equal(np.array(source.get(name)), ref, err_msg=name)
            # as stored: the same values (QuantizedTensor for Q4_0/Q4_1/Q8_0, else get's)
            w = source.get_weight(name)
            w = w.dequantize() if isinstance(w, QuantizedTensor) else w
            np.testing.assert_array_equal(np.array(w), ref, err_msg=name)


# ------------------------------------------------------------------------------ hostile files

def refused(path: Path, match: str) -> None:
    """open_source refuses `path` with a SourceError matching `match`, allocating little."""
    tracemalloc.start()
    try:
        with pytest.raises(SourceError, match=match):
            open_source(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


HOSTILE = {  # (arch, metadata) -> the error
    "qwen3moe-no-experts": ("qwen3moe", {"{arch}.expert_count": 0},
                            r"qwen3moe\.expert_count must be an integer from 1 to 4096, not 0"),
    "qwen3moe-count-missing": ("qwen3moe", {"{arch}.expert_count": None},
                               r"lacks the metadata qwen3moe\.expert_count"),
    "qwen3moe-billion": ("qwen3moe", {"{arch}.expert_count": 10**9},
                         r"expert_count must be an integer from 1 to 4096, not 1000000000"),
    "qwen3moe-2^64-1": ("qwen3moe", {"{arch}.expert_count": 2**64 - 1},
                        r"expert_count must be an integer from 1 to 4096"),
    "qwen3moe-fewer": ("qwen3moe", {"{arch}.expert_count": 4},
                       r"blk\.0\.ffn_gate_inp\.weight has the shape \[64, 8\], its metadata "
                       r"\(4 experts"),
    "qwen3moe-more": ("qwen3moe", {"{arch}.expert_count": 4096},
                      r"blk\.0\.ffn_gate_inp\.weight has the shape \[64, 8\], its metadata "
                      r"\(4096 experts"),
    "qwen3moe-ffn": ("qwen3moe", {"{arch}.expert_feed_forward_length": 64},
                     r"blk\.0\.ffn_gate_exps\.weight has the shape \[64, 32, 8\], its metadata "
                     r"\(8 experts, hidden size 64, expert FFN size 64.* says \[64, 64, 8\]"),
    "qwen3moe-ffn-missing": ("qwen3moe", {"{arch}.expert_feed_forward_length": None},
                             r"lacks the metadata qwen3moe\.expert_feed_forward_length"),
    "qwen3moe-head": ("qwen3moe", {"{arch}.attention.key_length": 16},
                      r"attn_q_norm\.weight has the shape \[32\].* says \[16\]"),
    "qwen3moe-used": ("qwen3moe", {"{arch}.expert_used_count": 9},
                      r"expert_used_count must be an integer from 1 to 8, not 9"),
    "qwen3moe-sigmoid": ("qwen3moe", {"{arch}.expert_gating_func": 2},
                         r"expert_gating_func 2 is not supported \(softmax, 1, is\)"),
    "qwen3moe-shared": ("qwen3moe", {"{arch}.expert_shared_count": 1},
                        r"expert_shared_count is not supported"),
    "mixtral-no-experts": ("mixtral", {"{arch}.expert_count": 0},
                           r"'blk\.\d+\.ffn_\w+\.weight' is a tensor of experts, but "
                           r"llama\.expert_count is 0"),
    "mixtral-billion": ("mixtral", {"{arch}.expert_count": 10**9},
                        r"llama\.expert_count must be an integer from 1 to 4096"),
    "mixtral-fewer": ("mixtral", {"{arch}.expert_count": 2},
                      r"blk\.0\.ffn_gate_inp\.weight has the shape \[64, 8\].* \(2 experts"),
    "mixtral-ffn": ("mixtral", {"{arch}.feed_forward_length": 14336},
                    r"blk\.0\.ffn_gate_exps\.weight has the shape \[64, 32, 8\], .* says "
                    r"\[64, 14336, 8\]"),
    "mixtral-head": ("mixtral", {"{arch}.attention.key_length": 32},
                     r"key_length 32 is not hidden_size / heads"),
    "mixtral-used-missing": ("mixtral", {"{arch}.expert_used_count": None},
                             r"expert_used_count must be an integer from 1 to 8, not None"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_moe_metadata_is_a_clear_error(tmp_path, case):
    arch, metadata, match = HOSTILE[case]
    path = tmp_path / "hostile.gguf"
    write_moe_gguf(path, arch, "Q8_0", metadata=metadata)
    refused(path, match)


def test_unsupported_moe_architecture_lists_the_supported(moe_files, tmp_path):
    """qwen2moe (shared experts) is not read: the error names what is."""
    path, _ = moe_files("qwen3moe", "F32")
    data = path.read_bytes()
    header = data[:4096].replace(b"qwen3moe", b"qwen2moe")  # same length: offsets hold
    (tmp_path / "qwen2moe.gguf").write_bytes(header + data[4096:])
    refused(tmp_path / "qwen2moe.gguf", r"unsupported GGUF architecture 'qwen2moe' .*"
            r"\(supported: llama, qwen2, qwen3moe; Mixtral is llama with experts\)")


def write_with_experts(path, arch: str, tensor: str) -> None:
    """A GGUF of `arch` claiming 8 experts, holding one small tensor `tensor`."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_expert_count(8)
    writer.add_tensor(tensor, np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_experts_of_other_architectures_are_refused(tmp_path):
    path = tmp_path / "qwen2-experts.gguf"
    write_with_experts(path, "qwen2", "token_embd.weight")
    refused(path, r"qwen2 models with experts are not supported \(supported: llama, qwen3moe\)")


def test_split_experts_of_old_mixtral_ggufs_are_refused(tmp_path):
    """GGUFs from before llama.cpp stacked the experts (blk.N.ffn_gate.E.weight)."""
    path = tmp_path / "old-mixtral.gguf"
    write_with_experts(path, "llama", "blk.0.ffn_gate.3.weight")
    refused(path, r"'blk\.0\.ffn_gate\.3\.weight' is one expert's tensor, from a GGUF written "
            r"before llama.cpp stacked experts")


# ------------------------------------------------------------ converted and served by mlx_flash

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 40, 41, 42, 43]
STEPS = 16


def mlx_lm_of_stored(source) -> object:
    """mlx-lm's model of `source`'s tensors as stored: float as `get` gives them, Q4_0/Q4_1/
    Q8_0 as MLX quantized modules (float32 scales: what a quantized bundle computes with on
    MLX's CPU backend) — what mlx-lm would load from an mlx-lm folder of the same weights."""
    import mlx.nn as nn

    weights, bits = {}, set()
    for name in source.names():
        w = source.get_weight(name)
        if isinstance(w, QuantizedTensor):
            base = name.removesuffix(".weight")
            weights.update({name: w.weight, f"{base}.scales": w.scales.astype(mx.float32),
                            f"{base}.biases": w.biases.astype(mx.float32)})
            bits.add(w.bits)
        else:
            weights[name] = w
    model = mlx_lm_model(source.config)
    if bits:
        (b,) = bits
        nn.quantize(model, group_size=32, bits=b,
                    class_predicate=lambda path, m: f"{path}.scales" in weights)
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_converted_moe_gguf_decodes_as_mlx_lm(moe_files, tmp_path, arch, qtype):
    """A MoE GGUF converted by mlx_flash decodes greedily to mlx-lm's logits, bit for bit, on
    the same weights (experts kept quantized as the GGUF stores them), all experts held or a
    few slots per layer that evict."""
    pytest.importorskip("mlx_flash.moe")
    from mlx_flash.api import load
    from mlx_flash.convert import convert
    from mlx_flash.memory import expert_budget

    path, _ = moe_files(arch, qtype)
    source = open_source(path)
    reference = greedy_logits(mlx_lm_of_stored(source), PROMPT, STEPS)
    # float32: the GGUF's F32 norms and router as they are (dtype None stores them as the
    # quantized experts' scales, float16)
    bundle = convert(path, tmp_path / "moe.flash", dtype="float32", progress=False)
    for budget in (None, expert_budget(bundle, 4, 2048, 3)):
        model, _ = load(bundle.path, memory_budget=budget)
        got = greedy_logits(model, PROMPT, STEPS)
        assert np.array_equal(got, reference), (budget, float(np.abs(got - reference).max()))
