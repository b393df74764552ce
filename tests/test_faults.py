"""Read faults in the middle of a generation never poison later answers.

`os.preadv` is replaced by one that fails once (EIO, or an end of file) at a chosen call, or
that returns short on every call, at each read site: the neuron caches, the staging matrix
(prefill, and reads a cache has no room for), and reads ahead in the background. After a fault
the error surfaces, every row the caches hold equals the file, and the next request on the same
model answers exactly as a fresh model does. (Reads that report success with other bytes than
the file's, and short ones at any call: tests/test_read_faults.py, with the same injector.)
"""

from __future__ import annotations

import errno
import os
import threading

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


def scatter(buffers: list, data: bytes) -> int:
    """Write `data` over `buffers` in order, as preadv fills them; how many bytes."""
    position = 0
    for b in buffers:
        view = memoryview(b).cast("B")
        n = min(len(view), len(data) - position)
        view[:n] = data[position:position + n]
        position += n
    return position


class Faulty:
    """os.preadv misbehaving at call number `at` (from 1), as flaky disks, network file
    systems and buggy drivers do:

    failing: "eio" (an I/O error), "eof" (returns 0: the file seems to end there);
    short: "short" (returns part of what was asked, truly read: legal, to be completed; without
    `at`, every call returns half of its first buffer);
    lying, reporting success with other bytes than the file's: "garbage" (the whole length,
    random bytes), "stale" (the whole length, nothing written: the buffers keep what they
    held), "shifted" (the whole length, the file's bytes from 4 KB further on), "short-garbage"
    (part of the length, random bytes).
    """

    LYING = ("garbage", "stale", "shifted", "short-garbage")

    def __init__(self, kind: str, at: int = 0, seed: int = 0):
        self.kind, self.at, self.calls, self.real = kind, at, 0, os.preadv
        self.rng = np.random.default_rng([seed, at])
        self.thread: str | None = None  # where the fault happened, once it has

    def __call__(self, fd: int, buffers: list, offset: int) -> int:
        self.calls += 1
        if self.kind == "short" and not self.at:  # a legal short read: part of the first buffer
            first = memoryview(buffers[0]).cast("B")
            data = os.pread(fd, max(1, len(first) // 2), offset)
            first[:len(data)] = data
            return len(data)
        if self.calls != self.at:
            return self.real(fd, buffers, offset)
        self.thread = threading.current_thread().name
        want = sum(memoryview(b).nbytes for b in buffers)
        part = int(self.rng.integers(1, want)) if want > 1 else want
        if self.kind == "eio":
            raise OSError(errno.EIO, "Input/output error (injected)")
        if self.kind == "eof":
            return 0  # the file seems to end here
        if self.kind == "short":
            return scatter(buffers, os.pread(fd, part, offset))
        if self.kind == "garbage":
            return scatter(buffers, self.rng.bytes(want))
        if self.kind == "stale":
            return want
        if self.kind == "shifted":
            data = os.pread(fd, want, offset + 4096)
            return scatter(buffers, data + bytes(want - len(data)))
        if self.kind == "short-garbage":
            return scatter(buffers, self.rng.bytes(part))
        raise ValueError(self.kind)


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


def site_model(calibrated, site: str, monkeypatch, threads: int = 8):
    """(the model of `site`, a fresh model's logits, the read calls of one request, the
    counting os.preadv now installed): the model has answered one request, as a fresh one."""
    mode, fraction, window = SITES[site]
    bundle = Bundle.open(calibrated[mode])

    def options() -> EngineOptions:
        if fraction is None:
            return EngineOptions(None, window, 64, threads=threads)
        plan = open_model(bundle, None, mode, EngineOptions(10**12, window, 64)).flash.plan
        return EngineOptions(plan.minimum + int(fraction * (plan.total - plan.minimum)),
                             window, 64, threads=threads, lookahead=site == "lookahead")

    fresh = logits_of(open_model(bundle, None, mode, options()))
    counting = Faulty("none")
    monkeypatch.setattr(os, "preadv", counting)
    model = open_model(bundle, None, mode, options())
    loaded = counting.calls  # complete caches are read at load
    np.testing.assert_array_equal(logits_of(model), fresh)
    if site == "ahead":
        assert model.flash.caches == {} and model.flash._ahead_pool._threads  # read ahead
    if site == "lookahead":  # the next layer's predicted neurons, read in the background
        assert model.flash.read_ahead > 0
    return model, fresh, counting.calls - loaded, counting


@pytest.mark.parametrize("site", SITES)
def test_faults_never_poison_later_answers(calibrated, site, monkeypatch):
    model, fresh, total, counting = site_model(calibrated, site, monkeypatch)
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
