"""Session fixtures: converted models are made once per test session and shared."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Conversions the tests trigger go into a private cache, never the user's ~/.cache.
os.environ["MLX_FLASH_HOME"] = tempfile.mkdtemp(prefix="mlx_flash_test_home_")

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def wikitext() -> str:
    return (DATA / "wikitext-2-valid-slice.txt").read_text()


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from mlx_flash.paths import default_model_source

    return default_model_source()


@pytest.fixture(scope="session")
def default_bundle(default_gguf, tmp_path_factory) -> Path:
    """The default model as a float16 bundle."""
    from mlx_flash.convert import convert

    out = tmp_path_factory.mktemp("default") / "bundle-f16"
    convert(default_gguf, out, dtype="float16", progress=False)
    return out


@pytest.fixture(scope="session")
def default_reference(default_gguf, tmp_path_factory) -> Path:
    """The default model as a plain dense mlx-lm folder with the same float16 weights."""
    from mlx_flash.convert import export_mlx_lm

    out = tmp_path_factory.mktemp("default") / "mlx-lm-f16"
    export_mlx_lm(default_gguf, out, dtype="float16", progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """(folder, config, weights) of a tiny random HF llama folder."""
    from tiny_models import write_hf_llama

    folder = tmp_path_factory.mktemp("tiny") / "llama"
    config, weights = write_hf_llama(folder)
    return folder, config, weights


@pytest.fixture(scope="session")
def tiny_bundle(tiny_llama, tmp_path_factory) -> Path:
    """The tiny llama as a float32 bundle."""
    from mlx_flash.convert import convert

    out = tmp_path_factory.mktemp("tiny") / "bundle"
    convert(tiny_llama[0], out, dtype="float32", progress=False)
    return out


@pytest.fixture(scope="session")
def relu_bundle(tmp_path_factory) -> Path:
    """The committed ReLU OPT fixture (tests/data/relu-opt) as a float32 bundle, with the
    paper's predictor calibrated on the head of the WikiText slice (text the fixture was
    trained on; the predictor is evaluated on the held-out tail)."""
    from mlx_flash.calibrate import calibrate
    from mlx_flash.convert import convert

    out = tmp_path_factory.mktemp("relu") / "bundle"
    convert(DATA / "relu-opt", out, dtype="float32", progress=False)
    calibrate(out, DATA / "wikitext-2-valid-slice.txt", tokens=8192, progress=False)
    return out


@pytest.fixture(scope="session")
def calibrated(tiny_bundle, tmp_path_factory) -> dict[str, Path]:
    """One copy of the tiny bundle per selection mode, calibrated on the first 2048 tokens
    (the bundle itself for "off")."""
    import shutil

    from numpy_ffn import MODES

    from mlx_flash.calibrate import calibrate

    out = {"off": tiny_bundle}
    for mode in MODES:
        path = tmp_path_factory.mktemp(mode) / "bundle"
        shutil.copytree(tiny_bundle, path)
        calibrate(path, DATA / "wikitext-2-valid-slice.txt", mode=mode, tokens=2048, epochs=3,
                  progress=False)
        out[mode] = path
    return out


@pytest.fixture(scope="session")
def quantized_tiny(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """The tiny float llama converted with --quantize (4-bit, groups of 32), calibrated for
    each mode that quantized records support."""
    import shutil

    from mlx_flash.bundle import Quantization
    from mlx_flash.calibrate import calibrate
    from mlx_flash.convert import convert

    root = tmp_path_factory.mktemp("quantized")
    convert(tiny_llama[0], root / "bundle", dtype="float32", quantize=Quantization(4, 32),
            progress=False)
    out = {"off": root / "bundle"}
    for mode in ("predictor", "gate", "hybrid"):
        out[mode] = root / mode
        shutil.copytree(root / "bundle", out[mode])
        calibrate(out[mode], DATA / "wikitext-2-valid-slice.txt", mode=mode, tokens=1024,
                  epochs=2, progress=False)
    return out
