"""Read faults in the middle of a generation never poison later answers.

`os.preadv` is replaced by one that fails once (EIO, or an end of file) at a chosen call, or
that returns short on every call, at each read site: the neuron caches, the staging matrix
(prefill, and reads a cache has no room for), and reads ahead in the background. After a fault
the error surfaces, every row the caches hold equals the file, and the next request on the same
model answers exactly as a fresh model does.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from tiny_models import greedy_logits

from mlx_flash.bundle import Bundle
from mlx_flash.errors import BundleError
from mlx_flash.flash_io import FlashReader
from mlx_flash.loader import EngineOptions, open_model
from mlx_flash.neuron_matrix import NeuronMatrix

PROMPT = [5, 40, 77, 100, 9, 33, 61]
STEPS = 10


def logits_of(model) -> np.ndarray:
    return greedy_logits(model, PROMPT, STEPS)


class Faulty:
    """os.preadv failing at call number `at` ("eio", "eof"), or short on every call."""

    def __init__(self, kind: str, at: int = 0):
        self.kind, self.at, self.calls, self.real = kind, at, 0, os.preadv

    def __call__(self, fd: int, buffers: list, offset: int) -> int:
        self.calls += 1
        if self.kind == "short":  # a legal short read: part of the first buffer, filled
            first = memoryview(buffers[0]).cast("B")
            data = os.pread(fd, max(1, len(first) // 2), offset)
            first[:len(data)] = data
            return len(data)
        if self.calls == self.at:
            if self.kind == "eio":
                raise OSError(errno.EIO, "Input/output error (injected)")
            return 0  # the file seems to end here
        return self.real(fd, buffers, offset)


def assert_caches_equal_file(engine) -> int:
    """Every row the engine's caches hold equals its record in the file; how many rows."""
    rows = 0
    for (layer, family, parts), cache in engine.caches.items():
        fam = engine.families[family]
        held = cache.neuron_at[:cache.size]
        order = np.argsort(held)
        fresh = NeuronMatrix(fam, max(1, len(held)), parts)
        reader = FlashReader(engine.bundle.path / fam.file, max_gap=0)
        reader.read_records(fam, layer, held[order], np.arange(len(held)), fresh, parts)
        reader.close()
        for name, matrix in cache.matrix.rows.items():
            np.testing.assert_array_equal(matrix[:cache.size][order], fresh.rows[name][
                :len(held)], err_msg=f"layer {layer} {family} {name}")
        rows += len(held)
    return rows


# the site each setting reads through: partial window caches (and staging for what they
# spill), complete caches in some layers and staging in the others (hybrid, whose selections
# churn, gets no partial cache), staging alone (selection off, no budget: every record every
# token), reads ahead (hybrid without caches), the next layer's predicted records read while
# its attention computes (predictor, caches)
SITES = {"cache": ("predictor", 0.5, 5), "complete": ("hybrid", 0.5, 5),
         "staging": ("off", None, 5), "ahead": ("hybrid", 0.0, 0),
         "lookahead": ("predictor", 0.5, 5)}


@pytest.mark.parametrize("site", SITES)
def test_faults_never_poison_later_answers(calibrated, site, monkeypatch):
    mode, fraction, window = SITES[site]
    path = calibrated[mode]
    bundle = Bundle.open(path)

    def options() -> EngineOptions:
        if fraction is None:
            return EngineOptions(None, window, 64, threads=8)
        plan = open_model(bundle, None, mode, EngineOptions(10**12, window, 64)).flash.plan
        return EngineOptions(plan.minimum + int(fraction * (plan.total - plan.minimum)),
                             window, 64, threads=8, lookahead=site == "lookahead")

    fresh = logits_of(open_model(bundle, None, mode, options()))
    counting = Faulty("none")
    monkeypatch.setattr(os, "preadv", counting)
    model = open_model(bundle, None, mode, options())
    loaded = counting.calls  # complete caches are read at load
    np.testing.assert_array_equal(logits_of(model), fresh)
    total = counting.calls - loaded
    if site == "ahead":
        assert model.flash.caches == {} and model.flash._ahead_pool._threads  # read ahead
    if site == "lookahead":  # the next layer's predicted neurons, read in the background
        assert model.flash.read_ahead > 0
    rng = np.random.default_rng(len(site))
    for kind in ("eio", "eof"):
        for at in rng.integers(total // 4, total, size=3):  # most of them while decoding
            monkeypatch.setattr(os, "preadv", Faulty(kind, int(at)))
            with pytest.raises((OSError, BundleError)):
                logits_of(model)
            monkeypatch.setattr(os, "preadv", counting)
            assert_caches_equal_file(model.flash)
            np.testing.assert_array_equal(logits_of(model), fresh, err_msg=f"{kind} at {at}")
    monkeypatch.setattr(os, "preadv", Faulty("short"))
    np.testing.assert_array_equal(logits_of(model), fresh)
    held = assert_caches_equal_file(model.flash)
    assert (held > 0) == (site in ("cache", "complete", "lookahead"))
    if site == "complete":
        assert 0 < model.flash.plan.complete_layers < model.flash.plan.layers


def test_a_token_past_cache_and_staging_leaves_the_cache_as_the_file(calibrated, monkeypatch):
    """A token that needs more records than its cache and the staging matrix hold together is
    an error (raise the budget), and the records its cache admitted for it are not left
    resident unread (hybrid's selections churn, and the plan gives it complete caches or
    none: here it is planned as a mode whose partial caches pay would be)."""
    import mlx_flash.memory
    from mlx_flash.selection import Hybrid

    monkeypatch.setattr(Hybrid, "churns", False)
    bundle = Bundle.open(calibrated["hybrid"])
    monkeypatch.setattr(mlx_flash.memory, "STAGING_BYTES",
                        8 * bundle.families["up"].record_bytes)
    plan = open_model(bundle, None, "hybrid", EngineOptions(10**12, 5, 64)).flash.plan
    model = open_model(bundle, None, "hybrid", EngineOptions(
        plan.minimum + (plan.total - plan.minimum) // 4, 5, 64))
    assert model.flash.matrices["up"].capacity == 8
    with pytest.raises(RuntimeError, match="raise the budget"):
        logits_of(model)
    assert_caches_equal_file(model.flash)
