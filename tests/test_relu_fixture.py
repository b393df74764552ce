"""The paper's regime on a real trained ReLU model: the committed OPT fixture
(tests/data/relu-opt, trained by tools/train_relu_opt.py; see its TRAINING.json)."""

from __future__ import annotations

import json
from pathlib import Path

from mlx_flash.bundle import Bundle
from mlx_flash.evaluate import evaluate

DATA = Path(__file__).parent / "data"
TAIL = DATA / "wikitext-2-valid-tail.txt"  # in the 10% of the text the fixture never saw


def test_fixture_is_a_sparse_relu_model():
    info = json.loads((DATA / "relu-opt" / "TRAINING.json").read_text())
    assert min(info["zero_activation_fraction_per_layer"]) > 0.9
    config = json.loads((DATA / "relu-opt" / "config.json").read_text())
    assert config["model_type"] == "opt" and config["activation_function"] == "relu"


def test_predictor_recall_sparsity_and_perplexity(relu_bundle):
    """On held-out text: recall of the truly active neurons >= 0.95 averaged over layers (the
    paper's OPT predictor missed 5%), >= 85% of FFN neurons skipped per token, perplexity
    within 2% of dense."""
    selection = Bundle.open(relu_bundle).selection
    assert selection["default"] == "predictor"
    # calibrated in windows no longer than the fixture's learned positions
    assert selection["modes"]["predictor"]["calibration"]["ctx"] == 256
    r = evaluate(relu_bundle, TAIL, tokens=4096, ctx=256, progress=False)
    assert r["mode"] == "predictor"
    assert r["recall_mean"] >= 0.95, r["recall_mean"]
    assert r["neurons_fraction"] <= 0.15, r["neurons_fraction"]
    assert r["ffn_bytes_fraction"] <= 0.15
    assert abs(r["ppl_sparse"] / r["ppl_dense"] - 1) <= 0.02, (r["ppl_sparse"], r["ppl_dense"])
    for layer in r["layers"]:
        assert layer["recall"] >= 0.9 and layer["active_fraction"] < 0.1
