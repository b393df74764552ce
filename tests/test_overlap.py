"""The expert engine's lookahead never changes what the caches keep.

Decoding, the next layer's guessed experts are read into a prefetch area (slots lent by the
caches), never into a cache: whatever the guesses, after every token each cache holds the
same experts as the run without lookahead on the same slots (so the same hits), its slots
equal the file, and the tokens are the same; a guess that the layer then routes to is copied
from the area instead of read again, and a wrong one costs its read only."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from test_moe import PROMPT, assert_slots_equal_the_file, slots_budget
from tiny_moe import write_tiny_moe

import mlx_flash.loader as loader
from mlx_flash.api import load
from mlx_flash.convert import convert
from mlx_flash.memory import reserve_prefetch

DATA = Path(__file__).parent / "data"
STEPS = 24


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """A random 4-bit qwen3_moe (8 experts, top-2) and the trained fixture (16, top-4, whose
    routers guess the next layer's experts well: docs/MOE.md), as bundles."""
    root = tmp_path_factory.mktemp("overlap")
    write_tiny_moe(root / "random", "qwen3_moe", 4)
    return {name: convert(src, root / f"{name}.flash", dtype=None, progress=False).path
            for name, src in (("random", root / "random"), ("trained", DATA / "moe-tiny"))}


def decode_keeping(model, steps: int, prompt: list[int] = PROMPT
                   ) -> tuple[np.ndarray, list[dict]]:
    """Greedy logits of `steps` tokens after `prompt`, and after each token the records
    (experts, neurons) every cache's policy keeps (not those read on a guess)."""
    from mlx_lm.models.cache import make_prompt_cache

    state = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=state)[:, -1]
    out, kept = [], []
    for _ in range(steps):
        out.append(np.array(logits.astype(mx.float32)))
        kept.append({key: np.sort(cache.kept()) for key, cache in model.flash.caches.items()})
        logits = model(mx.argmax(logits, axis=-1)[:, None], cache=state)[:, -1]
    return np.concatenate(out), kept


def on_and_off(path: Path, slots: int, monkeypatch) -> tuple:
    """The model with lookahead, and without it on the same slots (the prefetch area's
    slots lent the same way, left unused)."""
    on, _ = load(path, memory_budget=slots_budget(path, slots), lookahead=True)
    lent = on.flash.plan.prefetch
    assert lent > 0 and on.flash.prefetch.capacity == lent
    plan_of = loader.expert_plan

    def plan_lending(*args, **kw):
        plan = plan_of(*args, **kw)
        reserve_prefetch(plan, lent)
        return plan

    with monkeypatch.context() as patch:
        patch.setattr(loader, "expert_plan", plan_lending)
        off, _ = load(path, memory_budget=slots_budget(path, slots), lookahead=False)
    assert off.flash.prefetch is None
    assert {i: c.capacity for i, c in on.flash.caches.items()} \
        == {i: c.capacity for i, c in off.flash.caches.items()}
    return on, off


@pytest.mark.parametrize(("model", "slots", "seed"), [
    ("random", 4, 0), ("random", 4, 1), ("random", 3, 2), ("random", 5, 3),
    ("trained", 8, None), ("trained", 12, None), ("trained", 8, 4)])
def test_guesses_never_change_what_the_caches_keep(bundles, monkeypatch, model, slots, seed):
    """seed None: the next layer's own router guesses; else random guesses (mostly wrong)."""
    on, off = on_and_off(bundles[model], slots, monkeypatch)
    engine = on.flash
    if seed is not None:
        rng = np.random.default_rng(seed)
        monkeypatch.setattr(engine, "_ranked", lambda scores: rng.permutation(
            engine.family.count)[:engine.lookahead])
    want, kept_off = decode_keeping(off, STEPS)
    got, kept_on = decode_keeping(on, STEPS)
    assert np.array_equal(got, want)
    for token, (a, b) in enumerate(zip(kept_on, kept_off, strict=True)):
        for layer in a:
            assert np.array_equal(a[layer], b[layer]), (token, layer)
    hits_on, hits_off = on.flash.cache_stats(), off.flash.cache_stats()
    assert hits_on == hits_off and hits_off.evictions > 0
    assert_slots_equal_the_file(engine, bundles[model])
    # every expert read ahead was either promoted (not read again) or wasted
    ahead = engine.lookahead_stats
    assert ahead.unused > 0 and engine.read_ahead == ahead.promoted + ahead.unused
    assert engine.stats.decode.records_read + ahead.promoted \
        == off.flash.stats.decode.records_read
    if seed is None:  # the router's guesses save reads
        assert ahead.promoted > 0


def test_no_prefetch_area_where_nothing_is_guessed(bundles):
    """Every expert held, or the naive engine: no slot is lent, nothing read ahead."""
    path = bundles["random"]
    for budget in (None, "off"):
        model, _ = load(path, memory_budget=budget, lookahead=True)
        decode_keeping(model, 4)
        assert model.flash.plan.prefetch == 0 and model.flash.prefetch is None
        assert model.flash.read_ahead == 0


@pytest.mark.parametrize("share", [2, 3])
def test_dense_guesses_never_change_what_the_windows_keep(relu_bundle, share):
    """The dense engine's lookahead (the predictor's guess of the next layer's neurons) reads
    into free rows of the window caches only: each window keeps what it keeps without it."""
    from test_exact import PROMPT as DENSE_PROMPT
    from test_exact import budgets

    from mlx_flash.bundle import Bundle
    from mlx_flash.loader import EngineOptions, open_model

    budget = budgets(relu_bundle, "predictor")[share]

    def model(lookahead: bool):
        return open_model(Bundle.open(relu_bundle), None, "predictor",
                          EngineOptions(budget, 5, threads=8, lookahead=lookahead))

    on, off = model(True), model(False)
    want, kept_off = decode_keeping(off, STEPS, DENSE_PROMPT)
    got, kept_on = decode_keeping(on, STEPS, DENSE_PROMPT)
    assert np.array_equal(got, want)
    for token, (a, b) in enumerate(zip(kept_on, kept_off, strict=True)):
        for key in a:
            assert np.array_equal(a[key], b[key]), (token, key)
    assert on.flash.cache_stats() == off.flash.cache_stats()
    assert on.flash.read_ahead > 0
