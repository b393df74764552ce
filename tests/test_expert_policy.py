"""Expert-cache policies: Belady is optimal, policies keep their contract, and on the trained MoE
fixture's held-out routing the default policy gets >= 90% of Belady's hits at capacity 2 x top-k."""

from __future__ import annotations

import sys
from collections import OrderedDict
from functools import cache
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from mlx_flash.eviction import (
    DEFAULT_POLICY,
    LRU,
    POLICIES,
    belady_hit_rate,
    belady_hits,
    simulate,
    simulate_detail,
)

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "moe-tiny"


def random_trace(rng: np.random.Generator, tokens: int, count: int, k: int,
                 skew: float = 1.0) -> list[np.ndarray]:
    """Top-k draws without replacement from a Zipf-like popularity (skew 0 = uniform)."""
    p = 1.0 / np.arange(1, count + 1) ** skew
    p = rng.permutation(p / p.sum())
    return [np.sort(rng.choice(count, size=k, replace=False, p=p)) for _ in range(tokens)]


def brute_force_hits(trace: list[np.ndarray], capacity: int) -> int:
    """Most hits over every demand-paging schedule: exhaustive over each eviction choice."""
    steps = [tuple(int(i) for i in ids) for ids in trace]

    @cache
    def best(t: int, cache: frozenset) -> int:
        if t == len(steps):
            return 0
        ids = steps[t]
        hits = sum(i in cache for i in ids)
        missing = [i for i in ids if i not in cache]
        short = len(missing) - (capacity - len(cache))
        if short <= 0:
            return hits + best(t + 1, cache | frozenset(missing))
        cand = sorted(cache - set(ids))
        return hits + max(best(t + 1, (cache - frozenset(out)) | frozenset(missing))
                          for out in combinations(cand, short))

    return best(0, frozenset())


@pytest.mark.parametrize("seed", range(40))
def test_belady_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    count, k = int(rng.integers(3, 7)), int(rng.integers(1, 3))
    capacity = int(rng.integers(max(2, k), 4))
    trace = random_trace(rng, 8, count, k, skew=float(rng.uniform(0, 1.5)))
    assert belady_hits(trace, capacity) == brute_force_hits(trace, capacity)


@pytest.mark.parametrize("seed", range(6))
def test_belady_bounds_every_policy(seed):
    rng = np.random.default_rng(100 + seed)
    count, k = 32, 4
    trace = random_trace(rng, 300, count, k, skew=0.8)
    for capacity in (4, 6, 8, 16, 32):
        opt = belady_hit_rate(trace, capacity)
        for name in POLICIES:
            assert simulate(trace, capacity, name) <= opt + 1e-12, (name, capacity)
    assert belady_hit_rate(trace, count) == pytest.approx(
        1 - len(np.unique(np.concatenate(trace))) / (len(trace) * k))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_victims_contract(name):
    rng = np.random.default_rng(7)
    count, capacity = 16, 6
    policy = POLICIES[name](count, capacity)
    for t in range(200):
        ids = np.sort(rng.choice(count, size=3, replace=False))
        policy.touch(ids, t)
        resident = np.sort(rng.choice(count, size=capacity, replace=False))
        keep = np.sort(rng.choice(count, size=3, replace=False))
        free = int((~np.isin(resident, keep)).sum())
        for n in range(free + 3):  # past `free`: every evictable one, never more
            out = policy.victims(resident, n, t + 1, keep)
            assert len(out) == min(n, free) == len(np.unique(out))
            assert np.isin(out, resident).all() and not np.isin(out, keep).any()


def reference_lru_hits(trace: list[np.ndarray], capacity: int) -> int:
    """LRU written the obvious way (ties between experts of one token: lower id first)."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for ids in trace:
        need = [int(i) for i in ids]
        hits += sum(i in cache for i in need)
        for i in need:
            if i not in cache:
                if len(cache) == capacity:
                    victim = next(e for e in cache if e not in need)
                    del cache[victim]
                cache[i] = None
        for i in need:
            cache.move_to_end(i)
    return hits


def reference_lfu_hits(trace: list[np.ndarray], capacity: int) -> int:
    """LFU written the obvious way: fewest uses, then least recent, then lowest id."""
    uses: dict[int, int] = {}
    last: dict[int, int] = {}
    cache: set[int] = set()
    hits = 0
    for t, ids in enumerate(trace):
        need = [int(i) for i in ids]
        hits += sum(i in cache for i in need)
        missing = [i for i in need if i not in cache]
        for _ in range(len(missing) - (capacity - len(cache))):
            victim = min((e for e in cache if e not in need),
                         key=lambda e: (uses.get(e, 0), last.get(e, -1), e))
            cache.remove(victim)
        cache.update(missing)
        for i in need:
            uses[i] = uses.get(i, 0) + 1
            last[i] = t
    return hits


@pytest.mark.parametrize("seed", range(5))
def test_simulate_matches_reference(seed):
    rng = np.random.default_rng(200 + seed)
    trace = random_trace(rng, 400, 24, 3, skew=0.7)
    total = 400 * 3
    for capacity in (3, 5, 9, 24):
        lru = simulate_detail(trace, capacity, LRU)
        assert lru["hits"] + lru["misses"] == total
        assert lru["hits"] == reference_lru_hits(trace, capacity)
        assert simulate(trace, capacity, "lfu") * total == pytest.approx(
            reference_lfu_hits(trace, capacity))
        # the window policy never holds an expert unused for `window` tokens
        w = simulate_detail(trace, capacity, "window", window=2)
        assert w["mean_resident"] <= 2 * 3 and w["hits"] <= lru["hits"]
    # decay -> 0 is LRU (up to ties among experts last used by the same token)
    assert simulate(trace, 5, "lrfu", decay=1e-9) == pytest.approx(
        simulate(trace, 5, "lru"), abs=0.01)


def test_context_learns_what_pairs_cannot():
    """Experts drawn from a second-order chain (the next one a function of the last two, 90%
    of the time): pairwise counts (Markov) cannot tell which expert follows, the order-2
    context can; over four chains it keeps more of what comes next at 4 of 12 slots."""
    hits = {"markov": 0, "context": 0}
    for seed in range(1, 5):
        rng = np.random.default_rng(seed)
        follow = rng.integers(0, 12, size=(12, 12))
        seq = [0, 1]
        for _ in range(1500):
            seq.append(int(follow[seq[-2], seq[-1]]) if rng.random() < 0.9
                       else int(rng.integers(12)))
        trace = [np.array([e]) for e in seq]
        hits["markov"] += simulate_detail(trace, 4, "markov", count=12)["hits"]
        hits["context"] += simulate_detail(trace, 4, "context", count=12, order=2)["hits"]
    assert hits["context"] > 1.03 * hits["markov"], hits


def test_speed():
    """10^4 tokens x 128 experts (top-8) in a few seconds per policy."""
    import time

    rng = np.random.default_rng(3)
    trace = [np.sort(rng.choice(128, size=8, replace=False)) for _ in range(10_000)]
    for name in ["belady", *POLICIES]:
        start = time.perf_counter()
        if name == "belady":
            belady_hits(trace, 32)
        else:
            simulate(trace, 32, name)
        assert time.perf_counter() - start < 10, name


@pytest.fixture(scope="module")
def fixture_traces():
    """Held-out routing of the trained MoE fixture: 600 bytes of the tail, per layer."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from moe_routing import collect_traces, load_fixture

    model, config = load_fixture(FIXTURE)
    text = (DATA / "wikitext-2-valid-tail.txt").read_text()[:600]
    traces, _ = collect_traces(model, text)
    k = config["num_experts_per_tok"]
    assert len(traces) == config["num_hidden_layers"]
    for trace in traces:
        assert len(trace) >= 500 and all(len(ids) == k for ids in trace)
    return traces, k


needs_fixture = pytest.mark.skipif(not (FIXTURE / "model.safetensors").exists(),
                                   reason="no MoE fixture")


@needs_fixture
def test_default_policy_on_fixture(fixture_traces):
    """Per layer, at capacity 2 x top-k on real held-out routing: the default policy gets at
    least LRU's hits, LFU's within 2 points of Belady, and >= 80% of Belady's (measured
    0.83-0.99 per layer on this text; docs/MOE.md has the 16 KiB study)."""
    traces, k = fixture_traces
    for layer, trace in enumerate(traces):
        opt = belady_hit_rate(trace, 2 * k)
        got = simulate(trace, 2 * k, DEFAULT_POLICY)
        assert got >= simulate(trace, 2 * k, "lru") - 1e-12, layer
        assert got >= simulate(trace, 2 * k, "lfu") - 0.02 * opt, layer
        assert got >= 0.8 * opt, (layer, got, opt)


@needs_fixture
def test_default_policy_near_belady_on_fixture(fixture_traces):
    """The issue's acceptance check: the default policy's hit rate (all layers' routings
    together) >= 90% of Belady's at capacity 2 x top-k (measured 0.93 on this text, 0.95 on
    the 16 KiB study)."""
    traces, k = fixture_traces
    got = sum(simulate_detail(tr, 2 * k, DEFAULT_POLICY)["hits"] for tr in traces)
    opt = sum(belady_hits(tr, 2 * k) for tr in traces)
    assert got >= 0.9 * opt, (got, opt)


@needs_fixture
@pytest.mark.xfail(strict=True, reason="not met in layer 1, the fixture's most balanced "
                   "router (0.83 of Belady on this text, 0.86 in the 16 KiB study)")
def test_default_policy_near_belady_in_every_layer(fixture_traces):
    """The stricter reading: >= 90% of Belady's hits at 2 x top-k in each layer."""
    traces, k = fixture_traces
    for layer, trace in enumerate(traces):
        opt = belady_hit_rate(trace, 2 * k)
        got = simulate(trace, 2 * k, DEFAULT_POLICY)
        assert got >= 0.9 * opt, (layer, got, opt)


def test_context_table_is_capped():
    """A long generation never grows the context policy's table past its cap (its memory is
    in the plan: state_bytes)."""
    from mlx_flash.eviction import Context

    rng = np.random.default_rng(0)
    policy = Context(32, 8, max_contexts=50)
    for t in range(3000):
        policy.touch(np.sort(rng.choice(32, 4, replace=False)), t)
        assert len(policy.table) <= 50
