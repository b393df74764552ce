"""Selection modes: calibration data in the bundle, the sparse FFN against brute force NumPy,
thresholds on held-out tokens, evaluate's report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from numpy_ffn import MODES, brute_force, silu

import mlx_flash
from mlx_flash.bundle import Bundle
from mlx_flash.calibrate import calibrate, collect_inputs, text_tokens
from mlx_flash.evaluate import evaluate

DATA = Path(__file__).parent / "data" / "wikitext-2-valid-slice.txt"


@pytest.mark.parametrize("mode", MODES)
def test_sparse_ffn_equals_brute_force(calibrated, tiny_llama, mode):
    """Each mode's FFN, reading only what it selects, equals NumPy on the selected weights;
    for a single token the bytes it read are exactly the bytes it needed."""
    _, _, weights = tiny_llama
    bundle = Bundle.open(calibrated[mode])
    model, tokenizer = mlx_flash.load(bundle.path, sparsity=mode, memory_budget="off")
    engine = model.flash
    ids = text_tokens(tokenizer, DATA)[-600:-400]
    X = collect_inputs(mlx_flash.load(bundle.path, sparsity="off")[0], ids, 200, False)
    for layer in (0, 1):
        x = X[layer][:64]
        y, reads = engine.mode(layer, mx.array(x), engine.fetch)
        expected = brute_force(mode, bundle, weights, layer, x)
        np.testing.assert_allclose(np.array(y), expected, atol=2e-4, rtol=1e-3)
        def fetch_when_needed(*args, ahead=False):
            return None if ahead else engine.fetch(*args)

        # without merging and reading ahead it reads exactly what it needs; else more
        for max_gap, fetch in ((0, fetch_when_needed), (4096, fetch_when_needed),
                               (0, engine.fetch)):
            for r in engine.readers.values():
                r.max_gap = max_gap
            before = sum(r.counters.bytes for r in engine.readers.values())
            y1, one = engine.mode(layer, mx.array(x[:1]), fetch)  # the kernels' path
            read = sum(r.counters.bytes for r in engine.readers.values()) - before
            needed = int(np.array(one.bytes).sum())
            np.testing.assert_allclose(np.array(y1), expected[:1], atol=2e-4, rtol=1e-3)
            exact = max_gap == 0 and fetch is fetch_when_needed
            assert (read == needed) if exact else (read >= needed)
        assert 0 < needed < bundle.ffn_bytes / 2  # it really is sparse


def test_predictor_logits_match_numpy(calibrated):
    bundle = Bundle.open(calibrated["predictor"])
    model, _ = mlx_flash.load(bundle.path, sparsity="predictor")
    stored = {k: np.array(v) for k, v in
              mx.load(str(bundle.path / bundle.selection["modes"]["predictor"]["file"])).items()}
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    got = np.array(model.flash.mode.logits(1, mx.array(x)))
    expected = x @ stored["1.A"].T @ stored["1.B"].T + stored["1.b"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_calibration_round_trips_through_the_bundle(calibrated):
    """The bundle stays valid (checksums included), records what was calibrated, and loads
    the calibrated mode as its default."""
    for mode in MODES:
        path = calibrated[mode]
        bundle = Bundle.open(path, verify=True)
        sel = bundle.selection
        assert sel["default"] == mode
        info = sel["modes"][mode]
        assert len(info["layers"]) == 2 and info["calibration"]["tokens"] == 2048
        model, _ = mlx_flash.load(path, memory_budget=None)  # no budget: no switch to dense
        assert model.flash.mode.name == mode
    column = Bundle.open(calibrated["teal"]).families["column"]
    assert (column.count, [p.name for p in column.parts]) == (64, ["gate", "up"])


def test_recalibration_replaces_and_cleans_up(calibrated, tmp_path):
    path = tmp_path / "b"
    shutil.copytree(calibrated["hybrid"], path)
    old = Bundle.open(path).selection["modes"]["hybrid"]["file"]
    calibrate(path, DATA, mode="hybrid", tokens=1024, target="0.9,0.6", progress=False)
    bundle = Bundle.open(path, verify=True)
    info = bundle.selection["modes"]["hybrid"]
    assert info["target"] == [0.9, 0.6] and info["file"] != old
    assert not (path / old).exists()


def test_interrupted_calibration_leaves_the_bundle_valid(calibrated, tmp_path, monkeypatch):
    from mlx_flash import bundle_writer as bundle_module

    path = tmp_path / "b"
    shutil.copytree(calibrated["hybrid"], path)
    before = (path / "manifest.json").read_text()

    def crash(folder, manifest):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_module, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        calibrate(path, DATA, mode="teal", tokens=1024, progress=False)
    assert (path / "manifest.json").read_text() == before
    Bundle.open(path, verify=True)
    monkeypatch.undo()
    calibrate(path, DATA, mode="teal", tokens=1024, progress=False)  # a re-run succeeds
    assert Bundle.open(path, verify=True).selection["default"] == "teal"


def test_thresholds_hit_their_targets_on_held_out_tokens(calibrated, tiny_llama):
    """Calibrated on the first 2048 tokens, the hybrid thresholds keep their target fractions
    (0.8 of neurons by |silu(gate)|, 0.5 by |h|) on the last tokens within 0.05."""
    _, _, weights = tiny_llama
    bundle = Bundle.open(calibrated["hybrid"])
    model, tokenizer = mlx_flash.load(bundle.path, sparsity="off")
    ids = text_tokens(tokenizer, DATA)[-2048:]
    X = collect_inputs(model, ids, 512, False)
    for layer, t in enumerate(bundle.selection["modes"]["hybrid"]["layers"]):
        p = f"model.layers.{layer}.mlp"
        g = X[layer] @ weights[f"{p}.gate_proj.weight"].T
        h = silu(g) * (X[layer] @ weights[f"{p}.up_proj.weight"].T)
        assert abs((np.abs(silu(g)) > t["t_gate"]).mean() - 0.8) < 0.05
        assert abs((np.abs(h) > t["t_h"]).mean() - 0.5) < 0.05


def test_uncalibrated_mode_is_a_clear_error(tiny_bundle):
    with pytest.raises(Exception, match="not calibrated"):
        mlx_flash.load(tiny_bundle, sparsity="teal")


def test_evaluate_json(calibrated, tmp_path):
    from mlx_flash.evaluate import main

    out = tmp_path / "eval.json"
    assert main([str(calibrated["predictor"]), "--data", str(DATA), "--tokens", "256", "--ctx",
                 "128", "--json", str(out), "--quiet"]) == 0
    r = json.loads(out.read_text())
    for key in ("tokens", "mode", "ppl_dense", "ppl_oracle", "ppl_sparse", "recall_mean",
                "precision_mean", "ffn_bytes_fraction", "ffn_bytes_per_token", "layers"):
        assert key in r
    assert r["tokens"] == 256 and r["mode"] == "predictor" and len(r["layers"]) == 2
    assert 0 < r["ffn_bytes_fraction"] <= 1 and 0 <= r["recall_mean"] <= 1
    dense = evaluate(calibrated["hybrid"], DATA, tokens=256, ctx=128, mode="off",
                     progress=False)
    assert dense["ppl_sparse"] == pytest.approx(dense["ppl_dense"])  # "off" is the dense model
    assert dense["ffn_bytes_fraction"] == pytest.approx(1.0) and dense["recall_mean"] is None
