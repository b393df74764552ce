"""A token's output depends only on the bundle, the selection mode and the compute dtype: never
on the memory budget, the window, the read threads, cold reads or reading ahead.

Every setting below decodes enough tokens to evict and spill, and its logits must equal the
unbudgeted run of the same mode bit for bit (the engine multiplies the selected rows in neuron
order wherever they lie, so the arithmetic is the same); a randomized run also checks every
layer's FFN output against a NumPy model of the mode.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from numpy_ffn import MODES, brute_force
from tiny_models import greedy_logits

from mlx_flash.bundle import DTYPES, Bundle
from mlx_flash.loader import EngineOptions, compute_dtype_for, open_model

PROMPT = [5, 40, 77, 100, 9, 33, 61]
STEPS = 20
HUGE = 10**12


def decode(path, mode: str, options: EngineOptions, steps: int = STEPS,
           prompt: list[int] = PROMPT) -> tuple[np.ndarray, object]:
    """Greedy logits of `steps` decode tokens after `prompt`, and the engine."""
    model = open_model(Bundle.open(path), None, mode, options)
    return greedy_logits(model, prompt, steps), model.flash


def budgets(path, mode: str) -> list[int | None]:
    """No budget, the minimum, and budgets that leave the caches 1/8, 1/2, 3/4 and all of
    the model (the tiny models have 2 layers: from 1/2 on, one layer's caches are complete
    and the other's partial or none: per-layer shares)."""
    plan = open_model(Bundle.open(path), None, mode, EngineOptions(HUGE)).flash.plan
    room = plan.total - plan.minimum
    return [None, plan.minimum] + [plan.minimum + int(f * room)
                                   for f in (0.125, 0.5, 0.75, 1.0)]


CASES = [("float", m) for m in ("off", *MODES)] + [("q4", m) for m in
                                                   ("off", "predictor", "gate", "hybrid")]


@pytest.mark.parametrize("kind,mode", CASES)
def test_logits_equal_under_every_setting(calibrated, quantized_tiny, kind, mode):
    path = (calibrated if kind == "float" else quantized_tiny)[mode]
    expected, _ = decode(path, mode, EngineOptions())
    evictions = spills = 0
    shares = set()  # (complete layers, layers with a partial cache) the grid decoded with
    for budget in budgets(path, mode):
        for window in (0, 1, 5):
            got, engine = decode(path, mode, EngineOptions(budget, window, threads=1))
            np.testing.assert_array_equal(got, expected, err_msg=f"{budget=} {window=}")
            complete = {layer for (layer, *_), c in engine.caches.items() if c.complete}
            shares.add((len(complete), len({layer for layer, *_ in engine.caches} - complete)))
            for cache in engine.caches.values():  # spills past a cache, evictions from it
                evictions, spills = evictions + cache.stats.evictions, spills + cache.stats.spills
    # the grid exercised the partial caches' hard paths (dense "off" keeps what fits: it never
    # evicts); modes whose selections churn get complete caches or none, never partial ones
    if engine.mode.churns:
        assert all(cache.complete for cache in engine.caches.values())
    else:
        assert spills > 0 and (evictions > 0 or mode == "off")
        assert (1, 1) in shares  # one layer's caches complete, the other's partial
    assert (1, 0) in shares or not engine.mode.churns  # one layer's complete, the other none
    smallest_cache = budgets(path, mode)[2]
    for options in (EngineOptions(smallest_cache, 3, threads=8, cold=True),
                    EngineOptions(None, 2, threads=8)):
        got, _ = decode(path, mode, options)
        np.testing.assert_array_equal(got, expected, err_msg=str(options))


def test_relu_predictor_equal_under_every_setting(relu_bundle):
    """The paper's regime, with and without reading the next layer's predicted neurons ahead
    (which the caches of partial budgets do)."""
    expected, _ = decode(relu_bundle, "predictor", EngineOptions())
    read_ahead = 0
    for budget in budgets(relu_bundle, "predictor")[1:]:
        for window in (0, 1, 5):
            read = {}
            for lookahead in (True, False):
                got, engine = decode(relu_bundle, "predictor", EngineOptions(
                    budget, window, threads=8, lookahead=lookahead))
                np.testing.assert_array_equal(got, expected,
                                              err_msg=f"{budget=} {window=} {lookahead=}")
                read_ahead += engine.read_ahead
                read[lookahead] = engine.stats.decode.bytes
            # what is read ahead counts as read (a guess can only add to what a token needs)
            assert read[True] >= read[False]
    assert read_ahead > 0


class Recorder:
    """Stands for the engine in every FlashFFN: records each decode token's FFN input and
    output per layer."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def __call__(self, layer: int, x: mx.array, bias: mx.array | None) -> mx.array:
        y = self.engine(layer, x, bias)
        if x.shape[1] == 1:
            self.calls.append((layer, np.array(x[0]), np.array(y[0])))
        return y


def test_random_settings_against_numpy(calibrated, tiny_llama):
    """Seeded random settings (mode, budget, window, threads, prompt): each decode token's FFN
    output at every layer equals the NumPy model of its mode on the same input, and the
    logits equal the unbudgeted run's."""
    weights = tiny_llama[2]
    rng = np.random.default_rng(12)
    for _ in range(8):
        mode = str(rng.choice(["off", *MODES]))
        path = calibrated[mode]
        plan = open_model(Bundle.open(path), None, mode, EngineOptions(HUGE)).flash.plan
        budget = plan.minimum + int(rng.uniform(0, 1.1) * (plan.total - plan.minimum))
        options = EngineOptions(budget, int(rng.integers(0, 6)), threads=int(rng.choice([1, 8])))
        prompt = [int(t) for t in rng.integers(3, 250, size=int(rng.integers(2, 9)))]
        model = open_model(Bundle.open(path), None, mode, options)
        recorder = Recorder(model.flash)
        for layer in model.model.layers:
            layer.mlp.engine = recorder
        got = greedy_logits(model, prompt, 12)
        expected, _ = decode(path, mode, EngineOptions(), steps=12, prompt=prompt)
        np.testing.assert_array_equal(got, expected, err_msg=str(options))
        bundle = Bundle.open(path)
        for layer, x, y in recorder.calls:
            np.testing.assert_allclose(y, brute_force(mode, bundle, weights, layer, x),
                                       atol=2e-4, rtol=1e-3, err_msg=f"{mode} {options}")
        assert len(recorder.calls) == 12 * len(model.model.layers)


@pytest.fixture(scope="module")
def default_calibrated():
    """The embedded default model as its first use makes it: converted (its Q4_1 blocks kept)
    and calibrated for its default mode, in the tests' private cache."""
    from mlx_flash.calibrate import default_bundle

    return default_bundle(progress=False)


@pytest.mark.slow
def test_default_model_equal_under_every_setting(default_calibrated, default_gguf, tmp_path):
    """On the default model's calibrated bundle, every (budget, window, threads) decodes the
    unbudgeted run's logits; with selection "off" its greedy tokens are mlx-lm's on the same
    quantized weights (computed in float32, as the bundle is on MLX's CPU backend)."""
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.generate import generate_step

    from mlx_flash.convert import export_mlx_lm

    bundle = Bundle.open(default_calibrated)
    assert bundle.selection["default"] == "hybrid" and bundle.families["neuron"].quantization
    reference_model, tokenizer = mlx_lm_load(str(export_mlx_lm(
        default_gguf, tmp_path / "mlx-lm", dtype=None, keep_quantization=True, progress=False)))
    reference_model.set_dtype(DTYPES[compute_dtype_for(bundle)])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}],
                                           add_generation_prompt=True)
    expected, _ = decode(default_calibrated, "hybrid", EngineOptions(context=256), 16, prompt)
    none, minimum, eighth, half, _, full = budgets(default_calibrated, "hybrid")
    for options in (EngineOptions(none, 0, 256), EngineOptions(none, 1, 256),
                    *(EngineOptions(minimum, window, 256) for window in (0, 1, 5)),
                    EngineOptions(eighth, 5, 256), EngineOptions(half, 5, 256),
                    EngineOptions(full, 1, 256), EngineOptions(half, 2, 256, 1, cold=True)):
        got, _ = decode(default_calibrated, "hybrid", options, 16, prompt)
        np.testing.assert_array_equal(got, expected, err_msg=str(options))
    off, _ = decode(default_calibrated, "off", EngineOptions(half, 5, 256), 16, prompt)
    steps = generate_step(mx.array(prompt), reference_model, max_tokens=16,
                          sampler=lambda logits: mx.argmax(logits, axis=-1))
    assert off.argmax(axis=-1).tolist() == [int(token) for token, _ in steps]


def test_selections_larger_than_the_staging_matrix(relu_bundle, monkeypatch):
    """A staging matrix smaller than a token's selection (as on large models, where it holds
    16 MiB of a layer): the predictor computes in slices of it, with or without caches, and
    every budget still decodes the same logits (the minimum, without caches, failed)."""
    import mlx_flash.memory

    record = Bundle.open(relu_bundle).families["neuron"].record_bytes
    monkeypatch.setattr(mlx_flash.memory, "STAGING_BYTES", 24 * record)
    expected, engine = decode(relu_bundle, "predictor", EngineOptions())
    assert engine.matrices["neuron"].capacity == 24
    for budget in budgets(relu_bundle, "predictor")[1:]:
        got, _ = decode(relu_bundle, "predictor", EngineOptions(budget, 5, threads=8))
        np.testing.assert_array_equal(got, expected, err_msg=f"{budget=}")


def test_auto_budget_holds_the_model_whole_and_computes_it_densely(calibrated):
    """Without a budget, a model that fits is held whole (complete caches, nothing read per
    token) and the bundle's default mode is then the dense FFN; a mode named is kept."""
    model = open_model(Bundle.open(calibrated["hybrid"]), None, None, EngineOptions("auto"))
    engine = model.flash
    assert engine.plan.whole and engine.mode.name == "off"
    assert all(cache.complete for cache in engine.caches.values())
    logits_auto, held = decode(calibrated["hybrid"], None, EngineOptions("auto"))
    assert held.stats.prefill.bytes == held.stats.decode.bytes == 0  # read once, at load
    np.testing.assert_array_equal(logits_auto, decode(calibrated["hybrid"], "off",
                                                      EngineOptions())[0])
    named = open_model(Bundle.open(calibrated["hybrid"]), None, "hybrid", EngineOptions("auto"))
    assert named.flash.mode.name == "hybrid" and named.flash.plan.whole
