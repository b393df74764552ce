"""Quantized neuron records: GGUF blocks taken over losslessly, records that hold them, the
sparse FFN computed on quantized rows, and the default model's own 4-bit quantization kept
against mlx-lm running the same quantized weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import generate, load
from mlx_lm.sample_utils import make_sampler
from numpy_ffn import brute_force, dequantized
from tiny_models import write_llama_gguf

import mlx_flash
from mlx_flash.arch import QuantizedTensor
from mlx_flash.bundle import Bundle, Quantization
from mlx_flash.calibrate import calibrate, collect_inputs, text_tokens
from mlx_flash.convert import convert, export_mlx_lm
from mlx_flash.errors import BundleError
from mlx_flash.sources import open_source

DATA = Path(__file__).parent / "data"
TAIL = DATA / "wikitext-2-valid-tail.txt"


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_become_mlx_quantization_losslessly(tmp_path, qtype):
    """GGUF's 32-weight blocks as MLX affine quantization dequantize to exactly what gguf-py
    dequantizes (Q/K rows un-permuted alike)."""
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, qtype)
    source = open_source(path)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.embed_tokens.weight"):
        q = source.get_weight(name)
        assert isinstance(q, QuantizedTensor)
        assert (q.bits, q.group_size) == ((8 if qtype == "Q8_0" else 4), 32)
        np.testing.assert_array_equal(np.array(q.dequantize()), np.array(source.get(name)))


@pytest.fixture(scope="module")
def q4_tiny(tmp_path_factory):
    """A tiny Q4_1 GGUF converted keeping its quantization, and its mlx-lm export."""
    root = tmp_path_factory.mktemp("q4tiny")
    write_llama_gguf(root / "tiny.gguf", "Q4_1")
    convert(root / "tiny.gguf", root / "bundle", dtype=None, keep_quantization=True,
            progress=False)
    export_mlx_lm(root / "tiny.gguf", root / "mlx-lm", dtype=None, keep_quantization=True,
                  progress=False)
    return root


def test_kept_quantization_records_hold_the_source_rows(q4_tiny):
    """gate and up rows are the GGUF's blocks bit for bit; down columns are stored as float16
    (their blocks run across neurons): the dequantized weights, exactly."""
    b = Bundle.open(q4_tiny / "bundle", verify=True)
    fam = b.families["neuron"]
    assert fam.quantization == {"gate": Quantization(4, 32), "up": Quantization(4, 32)}
    assert b.dtype == "float16" and fam.part("down").dtype == "float16"
    source = open_source(q4_tiny / "tiny.gguf")
    model, _ = mlx_flash.load(b.path, compute_dtype="float32", sparsity="off")
    for layer in range(fam.layers):
        rows = model.flash.fetch(layer, "neuron", fam.tensors, np.arange(fam.count))
        prefix = f"model.layers.{layer}.mlp"
        gate = source.get_weight(f"{prefix}.gate_proj.weight")
        np.testing.assert_array_equal(np.array(rows.raw("gate")), np.array(gate.weight))
        np.testing.assert_array_equal(np.array(rows.raw("gate.scales")), np.array(gate.scales))
        np.testing.assert_array_equal(np.array(rows["up"]),
                                      np.array(source.get(f"{prefix}.up_proj.weight")))
        down = np.array(source.get(f"{prefix}.down_proj.weight")).T.astype(np.float16)
        np.testing.assert_array_equal(np.array(rows.raw("down")), down)


def test_kept_quantization_matches_mlx_lm_on_the_same_weights(q4_tiny):
    """Resident attention and embeddings stay quantized modules; the logits equal mlx-lm's
    quantized model's on the same weights, to float16 accumulation order."""
    reference, tokenizer = load(str(q4_tiny / "mlx-lm"))
    model, _ = mlx_flash.load(q4_tiny / "bundle", sparsity="off")
    config = json.loads((q4_tiny / "mlx-lm" / "config.json").read_text())
    assert config["quantization"] == Bundle.open(q4_tiny / "bundle").config["quantization"]
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    ids = mx.array([tokenizer.encode("hello flash world")])
    a, b = reference(ids).astype(mx.float32), model(ids).astype(mx.float32)
    np.testing.assert_allclose(np.array(b), np.array(a), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("mode", ["off", "predictor", "gate", "hybrid"])
def test_sparse_ffn_on_quantized_rows_equals_brute_force(quantized_tiny, tiny_llama, mode):
    """Each mode computes on the quantized rows it read (quantized_matmul, batch and single
    token) what NumPy computes on the dequantized weights it selected."""
    _, _, weights = tiny_llama
    bundle = Bundle.open(quantized_tiny[mode])
    assert set(bundle.families["neuron"].quantization) == {"gate", "up", "down"}
    wq = dequantized(weights, Quantization(4, 32))
    model, tokenizer = mlx_flash.load(bundle.path, sparsity=mode, compute_dtype="float32")
    engine = model.flash
    ids = text_tokens(tokenizer, DATA / "wikitext-2-valid-slice.txt")[-300:-200]
    X = collect_inputs(mlx_flash.load(bundle.path, sparsity="off")[0], ids, 100, False)
    for layer in (0, 1):
        x = X[layer][:32]
        if mode == "off":
            p = f"model.layers.{layer}.mlp"
            g, u = x @ wq[f"{p}.gate_proj.weight"].T, x @ wq[f"{p}.up_proj.weight"].T
            expected = (g / (1 + np.exp(-g)) * u) @ wq[f"{p}.down_proj.weight"].T
        else:
            expected = brute_force(mode, bundle, wq, layer, x)
        for tokens in (slice(None), slice(0, 1)):  # a batch, and one token (the kernels)
            y, _ = engine.mode(layer, mx.array(x[tokens]), engine.fetch)
            np.testing.assert_allclose(np.array(y), expected[tokens], atol=2e-4, rtol=1e-3)


def test_teal_needs_float_records(quantized_tiny, tmp_path):
    path = tmp_path / "bundle"
    shutil.copytree(quantized_tiny["off"], path)
    with pytest.raises(ValueError, match="teal.*--dtype"):
        calibrate(path, DATA / "wikitext-2-valid-slice.txt", mode="teal", tokens=256,
                  progress=False)
    Bundle.open(path, verify=True)  # untouched


def test_version_2_bundles_still_open(tiny_bundle, tmp_path):
    """Bundles of format version 2 (float records, offsets in elements) read as before."""
    from mlx_flash.bundle_writer import write_manifest

    path = tmp_path / "v2"
    shutil.copytree(tiny_bundle, path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["version"] = 2
    for fam in manifest["ffn"]["families"].values():
        size = 4  # float32
        fam["stride"] = fam.pop("record_bytes") // size
        fam["parts"] = [{"name": p["name"], "offset": p["offset"] // size,
                         "length": p["length"]} for p in fam["parts"]]
    write_manifest(path, manifest)
    old, new = Bundle.open(path), Bundle.open(tiny_bundle)
    assert old.families == new.families
    manifest["version"] = 1
    write_manifest(path, manifest)
    with pytest.raises(BundleError, match="version 1"):
        Bundle.open(path)


# ----------------------------------------------------------------------------- default model


@pytest.fixture(scope="module")
def default_q4(default_gguf, tmp_path_factory):
    """The default model converted keeping its own Q4_1 quantization, and an mlx-lm folder
    holding the GGUF's quantized weights unchanged."""
    root = tmp_path_factory.mktemp("default-q4")
    convert(default_gguf, root / "bundle", dtype=None, keep_quantization=True, progress=False)
    export_mlx_lm(default_gguf, root / "mlx-lm", dtype=None, keep_quantization=True,
                  progress=False)
    return root


def quantized_reference(folder: Path):
    """mlx-lm's model of the folder, computing in float32 as the bundle does on MLX's CPU
    backend (there, float16 quantized products are 30x slower); the quantized weights are
    unchanged, the float16 scales and norms become float32 exactly."""
    model, tokenizer = load(str(folder))
    model.set_dtype(mx.float32)
    return model, tokenizer


def test_default_q4_first_16_greedy_tokens_equal_mlx_lm(default_q4):
    reference, tokenizer = quantized_reference(default_q4 / "mlx-lm")
    model, _ = mlx_flash.load(default_q4 / "bundle", sparsity="off")
    assert model.flash.compute_dtype == (mx.float16 if mx.metal.is_available() else mx.float32)
    prompt = "The history of the lighthouse begins"
    a = generate(reference, tokenizer, prompt, max_tokens=16, sampler=make_sampler(0.0))
    b = generate(model, tokenizer, prompt, max_tokens=16, sampler=make_sampler(0.0))
    assert tokenizer.encode(b)[:16] == tokenizer.encode(a)[:16]
    q4 = Bundle.open(default_q4 / "bundle")
    assert q4.ffn_bytes < 0.55 * 3 * 576 * 2 * 1536 * 30  # vs float16 records


def perplexity(model, ids: list[int], ctx: int) -> float:
    nll, n = 0.0, 0
    for i in range(0, len(ids) - 1, ctx):
        w = ids[i:i + ctx + 1]
        logits = model(mx.array([w[:-1]])).astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nll -= mx.take_along_axis(logp[0], mx.array(w[1:])[:, None], axis=-1).sum().item()
        n += len(w) - 1
    return float(np.exp(nll / n))


def test_default_q4_perplexity_within_1_percent_of_mlx_lm(default_q4):
    reference, tokenizer = quantized_reference(default_q4 / "mlx-lm")
    model, _ = mlx_flash.load(default_q4 / "bundle", sparsity="off")
    ids = text_tokens(tokenizer, TAIL)[:257]
    ours, theirs = perplexity(model, ids, 128), perplexity(reference, ids, 128)
    assert abs(ours / theirs - 1) < 0.01, (ours, theirs)
