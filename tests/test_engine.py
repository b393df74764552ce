"""The flash engine: the sliding-window neuron cache, cold reads, the memory budget."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

import mlx_flash
from mlx_flash.bundle import Bundle, RecordFamily, RecordPart
from mlx_flash.errors import BudgetError
from mlx_flash.eviction import POLICIES
from mlx_flash.flash_io import FlashReader
from mlx_flash.neuron_cache import NeuronCache
from mlx_flash.sysmem import parse_size

COUNT, D = 40, 4
FAMILY = RecordFamily("neuron", "ffn.bin", COUNT, 2 * D * 4, "float32",
                      (RecordPart("up", 0, D, "float32"), RecordPart("down", 4 * D, D, "float32")),
                      ((0, COUNT * 32),))


@pytest.fixture(scope="module")
def segment(tmp_path_factory):
    records = (np.arange(COUNT)[:, None] * 100.0 + np.arange(2 * D)[None, :]).astype(np.float32)
    path = tmp_path_factory.mktemp("cache") / "ffn.bin"
    path.write_bytes(records.tobytes())
    return path, records


@pytest.mark.parametrize("policy", sorted(POLICIES))
@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, COUNT), window=st.integers(1, 6),
       tokens=st.lists(st.sets(st.integers(0, COUNT - 1), max_size=COUNT), min_size=1,
                       max_size=25))
def test_cache_agrees_with_a_dict(segment, policy, capacity, window, tokens):
    """Random token sequences through a NeuronCache under every eviction policy, against a
    brute-force reference (a dict record -> row): every resident record's row holds its
    record, every record a token needs is resident unless it was spilled for lack of room,
    nothing is evicted that the token needs, the matrix is never reallocated; and with the
    sliding window, records unused for `window` tokens are gone (unless the cache has room
    for all)."""
    path, records = segment
    reader = FlashReader(path, max_gap=0)
    kwargs = {"window": window} if policy == "window" else {}
    cache = NeuronCache(FAMILY, ("up", "down"), capacity,
                        POLICIES[policy](COUNT, capacity, **kwargs))
    addresses = {p: cache.matrix.buffer_address(p) for p in ("up", "down")}
    reference: dict[int, np.ndarray] = {}
    last_used: dict[int, int] = {}
    for t, needed in enumerate(tokens, start=1):
        ids = np.array(sorted(needed), dtype=np.int64)
        before = set(cache.resident())
        load, slots, spill = cache.admit(ids, t)
        reader.read_records(FAMILY, 0, load, slots, cache.matrix, ("up", "down"))
        for n in ids:
            last_used[int(n)] = t
        if policy == "window":
            for n in list(reference):
                if last_used[n] <= t - window and capacity < COUNT:  # out of the window (a
                    del reference[n]  # cache with room for every record keeps them all)
        for n in load:
            reference[int(n)] = records[n]
        resident = cache.resident()
        assert len(resident) == cache.size <= capacity
        assert set(reference) >= set(resident)  # nothing resident that the window dropped
        assert set(needed) & before <= set(resident)  # what the token needs is never evicted
        for n in set(reference) - set(resident):  # dropped early: only to make room
            assert n not in needed and len(needed) + len(reference) > capacity
            del reference[n]
        assert set(needed) - set(spill.tolist()) <= set(resident)
        if len(needed) <= capacity:
            assert len(spill) == 0
        up = np.array(cache.matrix.parts["up"])
        down = np.array(cache.matrix.parts["down"])
        for n, slot in resident.items():
            np.testing.assert_array_equal(up[slot], reference[n][:D])
            np.testing.assert_array_equal(down[slot], reference[n][D:])
            assert cache.slot_of[n] == slot and cache.neuron_at[slot] == n
    assert {p: cache.matrix.buffer_address(p) for p in ("up", "down")} == addresses


def decode(model, prompt, n):
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


def partial_budget(path, fraction: float) -> int:
    """A budget whose caches hold `fraction` of each layer's neurons: the window then evicts
    (caches with room for every neuron keep them all)."""
    plan = mlx_flash.load(path, memory_budget=10**12)[0].flash.plan
    return plan.minimum + int(fraction * (plan.total - plan.minimum))


def test_window_cache_changes_reads_not_results(relu_bundle):
    """Greedy decoding with the sliding-window cache gives the tokens decoding without it
    gives (the selection decides the math; the cache only where rows come from), and reads
    only what is new to the window."""
    prompt = [ord(c) + 3 for c in "The history of the "]
    plain, _ = mlx_flash.load(relu_bundle, memory_budget=None, window=0)
    cached, _ = mlx_flash.load(relu_bundle, memory_budget=partial_budget(relu_bundle, 0.6),
                               window=4)
    assert decode(cached, prompt, 40) == decode(plain, prompt, 40)
    a, b = plain.flash.stats.decode, cached.flash.stats.decode
    assert a.needed_bytes == b.needed_bytes
    assert b.bytes < 0.5 * a.bytes  # most of what a token needs, the window already holds
    stats = cached.flash.cache_stats()
    assert stats.hit_rate > 0.5 and stats.spills == 0 and stats.evictions > 0


def test_neuron_matrices_stay_put_and_memory_does_not_grow(relu_bundle):
    """200 decode tokens: every cache matrix keeps its buffer, and MLX's peak memory grows by
    no more than the KV cache does."""
    model, _ = mlx_flash.load(relu_bundle, memory_budget=partial_budget(relu_bundle, 0.6),
                              window=5)
    engine = model.flash
    addresses = {k: c.matrix.buffer_address(c.parts[0]) for k, c in engine.caches.items()}
    assert addresses
    steps = generate_step(mx.array([40, 41, 42]), model, max_tokens=200)
    for _ in range(20):
        next(steps)
    mx.eval(mx.zeros(1))
    peak = mx.get_peak_memory()
    for _ in steps:
        pass
    config = Bundle.open(relu_bundle).config
    kv_growth = 180 * 2 * config["num_hidden_layers"] * config["hidden_size"] * 4
    assert mx.get_peak_memory() - peak <= kv_growth + 256 * 1024
    assert {k: c.matrix.buffer_address(c.parts[0]) for k, c in engine.caches.items()} == addresses
    assert engine.cache_stats().evictions > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/io is Linux's")
def test_cold_reads_reach_the_storage(relu_bundle):
    """Cold mode: what the reader counts is what the kernel reads from storage (page
    granular), every time — the page cache does not serve it."""

    def storage_reads():
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))

    model, _ = mlx_flash.load(relu_bundle, memory_budget=None, window=0, cold=True)
    prompt = [40, 41, 42, 43]
    for _ in range(2):  # the second pass reads the same records again: still from storage
        counted, before = model.flash.reader_for("neuron").counters.bytes, storage_reads()
        decode(model, prompt, 8)
        counted = model.flash.reader_for("neuron").counters.bytes - counted
        actual = storage_reads() - before
        calls = model.flash.read_calls
        assert counted <= actual <= counted + 2 * 4096 * calls


def test_budget(relu_bundle):
    with pytest.raises(BudgetError, match="minimum"):
        mlx_flash.load(relu_bundle, memory_budget="1MB")
    bundle = Bundle.open(relu_bundle)
    budget = parse_size("35MB")  # the minimum is ~29 MB, all FFN rows would take ~8.5 MB more
    model, _ = mlx_flash.load(relu_bundle, memory_budget=budget, context=64)
    plan = model.flash.plan
    assert plan.minimum < plan.total <= budget
    fam = bundle.families["neuron"]
    assert 0 < min(plan.capacity[("neuron", tuple(p.name for p in fam.parts))]) < fam.count
    tokens = decode(model, [40, 41], 4)
    # the KV cache the plan counts: 64 tokens, allocated once (not mlx-lm's 256-token steps)
    cache = make_prompt_cache(model)
    again = [int(t) for t, _ in generate_step(mx.array([40, 41]), model, max_tokens=4,
                                              prompt_cache=cache)]
    assert again == tokens
    assert {c.keys.shape[2] for c in cache} == {64}
    # with rotating_kv (mlx-lm's max_kv_size), the same bound, rotating past it
    for limit in (budget, None):  # rotating_kv bounds the KV cache with or without a budget
        model, _ = mlx_flash.load(relu_bundle, memory_budget=limit, context=16, rotating_kv=True)
        cache = make_prompt_cache(model)
        list(generate_step(mx.array([40, 41]), model, max_tokens=24, prompt_cache=cache))
        assert {(type(c).__name__, c.keys.shape[2]) for c in cache} == {("RotatingKVCache", 16)}


def test_parse_size():
    assert parse_size("150MB") == 150_000_000
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError):
        parse_size("lots")


@pytest.mark.parametrize("option", [{"threads": 0}, {"threads": 100_000}, {"window": -1},
                                    {"context": 0}])
def test_out_of_range_engine_options_are_refused(tiny_bundle, option):
    with pytest.raises(ValueError, match=next(iter(option))):
        mlx_flash.load(tiny_bundle, **option)
