"""Llama-family ReLU FFNs (ReluLLaMA, ProSparse's FATReLU, TurboSparse's dReLU) against
transformers' Llama (torch CPU) on tiny random configs, and the paper's predictor on them."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from tiny_models import write_hf_relu_llama

import mlx_flash
from mlx_flash.calibrate import calibrate
from mlx_flash.convert import convert

torch = pytest.importorskip("torch", reason="torch (CPU) is the reference; make test "
                            "installs it")

MAX_ABS_DIFF = 1e-4  # float32 on both sides
ACTIVATIONS = ("relu", "fatrelu", "drelu")


@pytest.fixture(scope="module", params=ACTIVATIONS)
def relu_pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    reference = write_hf_relu_llama(folder, request.param)
    bundle = convert(folder, folder.parent / "bundle", dtype="float32", progress=False)
    return request.param, reference, bundle.path


def test_logits_match_transformers(relu_pair):
    _, reference, path = relu_pair
    model, _ = mlx_flash.load(path)
    ids = np.random.default_rng(1).integers(3, 260, size=(2, 19))
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    got = np.array(model(mx.array(ids)))
    assert np.abs(got - expected).max() < MAX_ABS_DIFF
    assert np.abs(expected).max() > 0.1


def test_greedy_generation_matches_transformers(relu_pair):
    _, reference, path = relu_pair
    model, _ = mlx_flash.load(path)
    prompt = [1, 40, 99, 7, 120, 33]
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=10,
                                      do_sample=False, min_new_tokens=10)[0, len(prompt):]
    got = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=10)]
    assert got == expected.tolist()


def test_exact_zeros_let_the_predictor_skip_neurons(relu_pair, tmp_path):
    """ReLU-family FFNs are exactly zero for many neurons: the default mode is the paper's
    predictor, and with it the model reads only the records it predicts."""
    activation, _, path = relu_pair
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(path, copy)
    bundle = calibrate(copy, Path(__file__).parent / "data" / "wikitext-2-valid-slice.txt",
                       tokens=2048, epochs=4,
                       progress=False)
    assert bundle.selection["default"] == "predictor"
    layers = bundle.selection["modes"]["predictor"]["layers"]
    assert all(0 < la["active"] < 1 for la in layers)  # some neurons exactly zero, not all
    assert all(la["recall"] >= 0.9 for la in layers)
