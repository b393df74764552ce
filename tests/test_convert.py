"""Conversion from GGUF files and HF folders: weights, layout, tokenizer, and failures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import _get_classes
from tiny_models import TINY_LLAMA, byte_vocab, write_llama_gguf

import mlx_flash
from mlx_flash.bundle import Bundle
from mlx_flash.convert import convert
from mlx_flash.sources import SourceError


def reference_llama(config: dict, weights: dict[str, np.ndarray]):
    """mlx-lm's own llama with the given float weights: the reference model."""
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    return model


def records(bundle: Bundle, layer: int) -> np.ndarray:
    fam = bundle.families["neuron"]
    offset, length = fam.segments[layer]
    raw = np.fromfile(bundle.ffn_path, dtype=np.float32, count=length // 4, offset=offset)
    return raw.reshape(fam.count, fam.record_bytes // 4)


def test_hf_folder_model_matches_mlx_lm(tiny_llama, tiny_bundle):
    folder, config, weights = tiny_llama
    model, tokenizer = mlx_flash.load(tiny_bundle)
    ref = reference_llama(config, weights)
    x = mx.array([tokenizer.encode("the theme of the tale")])
    diff = mx.abs(model(x) - ref(x)).max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_dequantized_like_mlx(qtype, tmp_path):
    """Our GGUF reader (gguf-py) and MLX's own GGUF loader, two implementations, agree on
    every FFN weight; F32 files round-trip exactly, including llama.cpp's Q/K permutation."""
    src = tmp_path / f"tiny-{qtype}.gguf"
    config, weights = write_llama_gguf(src, qtype)
    bundle = convert(src, tmp_path / "bundle", dtype="float32", progress=False)
    mlx_weights = mx.load(str(src))
    d = config["hidden_size"]
    for layer in range(config["num_hidden_layers"]):
        rec = records(bundle, layer)
        for part, name, sl in (("gate", "ffn_gate", slice(0, d)), ("up", "ffn_up", slice(d, 2 * d)),
                               ("down", "ffn_down", slice(2 * d, 3 * d))):
            key = f"blk.{layer}.{name}"
            w = mlx_weights[f"{key}.weight"]
            if f"{key}.scales" in mlx_weights:
                w = mx.dequantize(w, mlx_weights[f"{key}.scales"], mlx_weights[f"{key}.biases"],
                                  group_size=32, bits=4 if qtype.startswith("Q4") else 8)
            w = np.array(w.astype(mx.float32))
            got = rec[:, sl].T if part == "down" else rec[:, sl]
            # MLX dequantizes in float16; gguf-py in float32
            np.testing.assert_allclose(got, w, atol=2e-3 * np.abs(w).max(), rtol=2e-3)
    if qtype == "F32":
        resident = bundle.load_resident()
        for name in ("model.layers.0.self_attn.q_proj.weight",
                     "model.layers.1.self_attn.k_proj.weight", "lm_head.weight"):
            np.testing.assert_array_equal(np.array(resident[name]), weights[name])


def test_gguf_model_matches_mlx_lm(tmp_path):
    """A converted GGUF computes what mlx-lm computes on the original weights."""
    src = tmp_path / "tiny.gguf"
    config, weights = write_llama_gguf(src, "F32")
    model, tokenizer = mlx_flash.load(src, dtype="float32")
    tokens, _ = byte_vocab()  # the merges "h e" and "Ġt he" apply
    assert tokenizer.encode("the theme") == [tokens.index(t) for t in ("t", "he", "Ġthe", "m", "e")]
    assert tokenizer.eos_token_ids == {2}
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    ref = reference_llama(config, weights)
    x = mx.array([[5, 9, 100, 7, 3]])
    assert mx.abs(model(x) - ref(x)).max().item() < 1e-4


def test_qwen2_gguf_keeps_qk_rows(tmp_path):
    """llama.cpp permutes Q/K only for "llama" GGUFs; qwen2 rows stay as they are."""
    src = tmp_path / "tiny-qwen2.gguf"
    config, weights = write_llama_gguf(src, "F32", arch="qwen2")
    bundle = convert(src, tmp_path / "bundle", dtype="float32", progress=False)
    assert bundle.config["model_type"] == "qwen2"
    q = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(np.array(bundle.load_resident()[q]), weights[q])


def test_bfloat16_bundle(tiny_llama, tmp_path):
    folder, config, weights = tiny_llama
    bundle = convert(folder, tmp_path / "bf16", dtype="bfloat16", progress=False)
    assert bundle.dtype == "bfloat16" and bundle.families["neuron"].record_bytes == 3 * 64 * 2
    model, _ = mlx_flash.load(bundle.path)
    ref = reference_llama(config, weights)
    ref.set_dtype(mx.bfloat16)
    x = mx.array([[5, 9, 100, 7, 3]])
    a, b = model(x).astype(mx.float32), ref(x).astype(mx.float32)
    assert mx.abs(a - b).max().item() < 0.05 * mx.abs(b).max().item()


def run_convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_flash.convert", *args],
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(r: subprocess.CompletedProcess, message: str) -> None:
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


def test_cli_unsupported_architecture(tiny_llama, tmp_path):
    folder = tmp_path / "gpt2"
    shutil.copytree(tiny_llama[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    r = run_convert(str(folder), str(tmp_path / "out"))
    assert_one_line_error(r, "unsupported architecture 'gpt2'")
    assert not (tmp_path / "out").exists()


def test_cli_unsupported_activation(tiny_llama, tmp_path):
    folder = tmp_path / "gelu"
    shutil.copytree(tiny_llama[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (folder / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_convert(str(folder), str(tmp_path / "out")), "hidden_act='gelu'")


def test_cli_missing_source(tmp_path):
    assert_one_line_error(run_convert(str(tmp_path / "nope.gguf"), str(tmp_path / "out")),
                          "does not exist")


def test_cli_existing_out(tiny_llama, tmp_path):
    (tmp_path / "out").mkdir()
    assert_one_line_error(run_convert(str(tiny_llama[0]), str(tmp_path / "out")),
                          "already exists")


def test_cli_corrupt_gguf_leaves_nothing(tmp_path):
    src = tmp_path / "tiny.gguf"
    write_llama_gguf(src, "Q8_0")
    data = src.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    r = run_convert(str(tmp_path / "cut.gguf"), str(tmp_path / "out"))
    assert_one_line_error(r, "cut.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf", "tiny.gguf"]


def test_failed_conversion_leaves_no_partial_bundle(tiny_llama, tmp_path):
    """A source missing one FFN tensor fails before anything is published, and the staging
    folder is removed."""
    folder = tmp_path / "broken"
    shutil.copytree(tiny_llama[0], folder)
    weights = mx.load(str(folder / "model.safetensors"))
    del weights["model.layers.1.mlp.down_proj.weight"]
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    r = run_convert(str(folder), str(tmp_path / "out"))
    assert_one_line_error(r, "down_proj")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_failure_midway_removes_staging(tiny_llama, tmp_path, monkeypatch):
    """An error after records were written (here: in the tokenizer step) removes them too."""
    from mlx_flash import sources

    def fail(self, dest):
        assert any(dest.parent.glob("ffn.bin"))
        raise SourceError("tokenizer exploded")

    monkeypatch.setattr(sources.HFSource, "save_tokenizer", fail)
    with pytest.raises(SourceError, match="exploded"):
        convert(tiny_llama[0], tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_mlx_lm_export_loads_in_mlx_lm(tiny_llama, tmp_path):
    from mlx_lm import load

    folder, config, weights = tiny_llama
    out = tmp_path / "dense"
    r = run_convert(str(folder), str(out), "--format", "mlx-lm", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    model, _ = load(str(out))
    ref = reference_llama(config, weights)
    x = mx.array([[1, 2, 3]])
    assert mx.abs(model(x) - ref(x)).max().item() == 0


def test_tiny_config_is_what_we_wrote(tiny_bundle):
    config = Bundle.open(tiny_bundle).config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "head_dim"):
        assert config[key] == TINY_LLAMA[key]


def test_cached_conversion_is_reused(tiny_llama):
    from mlx_flash.paths import resolve_bundle

    first = resolve_bundle(tiny_llama[0], dtype="float32", progress=False)
    mtime = (first / "manifest.json").stat().st_mtime_ns
    assert resolve_bundle(tiny_llama[0], dtype="float32", progress=False) == first
    assert (first / "manifest.json").stat().st_mtime_ns == mtime
    assert resolve_bundle(first) == first
    assert Path(first).parent.parent.name.startswith("mlx_flash_test_home_")


# Damaged model folders (issue 13): each was a traceback or an allocation sized by the damage.
HF_DAMAGES = {
    "config a list": ({"config.json": "[1, 2]"}, "not a JSON object"),
    "config nested deeply": ({"config.json": "[" * 100_000 + "]" * 100_000}, "not valid JSON"),
    "null size": ({"hidden_size": None}, "hidden_size must be an integer"),
    "zero size": ({"intermediate_size": 0}, "intermediate_size must be an integer"),
    "size a string": ({"num_attention_heads": "4"}, "num_attention_heads must be an integer"),
    "zero heads": ({"num_attention_heads": 0}, "num_attention_heads"),
    "heads not dividing": ({"num_key_value_heads": 3}, "num_key_value_heads"),
    "eps NaN": ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a positive number"),
    "theta infinite": ({"rope_theta": float("inf")}, "rope_theta must be a positive number"),
    "eos past the vocabulary": ({"eos_token_id": 2**31 - 1}, "eos_token_id"),
    "rope_scaling a list": ({"rope_scaling": [1]}, "rope_scaling"),
    "generation config a list": ({"generation_config.json": "[]"}, "not a JSON object"),
    "quantization a list": ({"quantization": [4]}, "quantization"),
    "weights header claims 8 GB": ({"model.safetensors": lambda b: (8 << 30).to_bytes(
        8, "little") + b[8:]}, "header claims"),
    "weights past the end": ({"model.safetensors": lambda b: b[:-64]}, "past the end"),
}


@pytest.mark.parametrize("damage", HF_DAMAGES, ids=list(HF_DAMAGES))
def test_damaged_model_folder_is_a_clear_error(tiny_llama, tmp_path, damage):
    """A config entry replaced (or a whole file, by text or by an edit of its bytes): an
    error the command lines report in one line, before anything is written."""
    from mlx_flash.arch import UnsupportedModel
    from mlx_flash.errors import ConversionError

    folder = tmp_path / "damaged"
    shutil.copytree(tiny_llama[0], folder)
    changes, message = HF_DAMAGES[damage]
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if callable(value):
            (folder / key).write_bytes(value((folder / key).read_bytes()))
        elif key.endswith(".json"):
            (folder / key).write_text(value)
        else:
            config[key] = value
            (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises((SourceError, UnsupportedModel, ConversionError), match=message):
        convert(folder, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]
