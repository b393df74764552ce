"""Eviction policies: which records a full cache gives up for the ones a token needs.

A cache (mlx_flash.neuron_cache.NeuronCache) holds, per layer, up to `capacity` of a record
family's `count` records; what a token needs and the cache lacks is read from flash, and the
policy picks which residents make room. One interface serves both engines:

    policy = POLICIES[name](count, capacity)
    policy.expire(resident, t)            # before token t's reads: residents to drop although
                                          # no room is needed (the sliding window's; else
                                          # none); the cache keeps those token t needs
    policy.victims(resident, n, t, keep)  # then: at most n of `resident` to evict for room,
                                          # never one of `keep` (what token t needs) nor one
                                          # token t already used
    policy.touch(ids, t)                  # then: token t used `ids`, all resident

The dense engine's caches use `Window`, the paper's sliding window (LLM in a flash, section
3.1). For a Mixture-of-Experts layer (records = experts, each token needs its router's top-k)
the choice decides how many bytes each token reads, so the policies here are compared on real
routing traces against Belady's MIN (the offline optimum: evict the expert whose next use is
farthest away), docs/MOE.md.

A trace is a list over tokens of sorted int arrays: the experts one layer used at each token.
`simulate` replays a trace through a policy the way the cache drives it; `belady_hits` gives
the optimum hits for the same trace and capacity. NumPy only; every call is O(count).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

import numpy as np

Trace = Sequence[np.ndarray]


class Policy:
    """Base class: bookkeeping of last use, and the choice of the n lowest-scored residents.

    Subclasses define `score` (lower = evict first); ties go to the least recently used, then
    the lower id, so every policy is deterministic.
    """

    name = "base"

    @classmethod
    def state_bytes(cls, count: int) -> int:
        """At most how much memory one instance holds for `count` experts (the memory plan
        counts it): the per-expert arrays."""
        return 4 * 8 * count

    def __init__(self, count: int, capacity: int) -> None:
        if capacity < 1 or count < 1:
            raise ValueError(f"need count >= 1 and capacity >= 1, got {count}, {capacity}")
        self.count = count
        self.capacity = capacity
        self.last = np.full(count, -1, dtype=np.int64)  # token of last use, -1 = never

    def touch(self, ids: np.ndarray, t: int) -> None:
        """Token t used `ids` (all resident now)."""
        self.last[ids] = t

    def score(self, cand: np.ndarray, t: int) -> np.ndarray:
        """Eviction priority of the candidate experts at token t: the lowest go first."""
        raise NotImplementedError

    def victims(self, resident: np.ndarray, n: int, t: int, keep: np.ndarray) -> np.ndarray:
        """Up to n records of `resident` to evict so that token t's missing records fit.

        Never one of `keep` (what token t needs) nor one token t used already (a read ahead
        for it); fewer than n when fewer are evictable: what then finds no room is read past
        the cache (an expert cache is sized so that a token's top-k always fit).
        """
        resident = np.asarray(resident, dtype=np.int64)
        cand = resident[~np.isin(resident, keep) & (self.last[resident] < t)]
        if n <= 0:
            return cand[:0]
        order = np.lexsort((cand, self.last[cand], self.score(cand, t)))
        return cand[order[:n]]

    def expire(self, resident: np.ndarray, t: int) -> np.ndarray:
        """Residents to drop before token t although no room is needed (none by default)."""
        return np.asarray(resident, dtype=np.int64)[:0]


class LRU(Policy):
    """Least recently used: consecutive tokens share experts (routing has some locality)."""

    name = "lru"

    def score(self, cand: np.ndarray, t: int) -> np.ndarray:
        return self.last[cand]


class LFU(Policy):
    """Least frequently used, counting every past token: bets on a stable popularity skew."""

    name = "lfu"

    def __init__(self, count: int, capacity: int) -> None:
        super().__init__(count, capacity)
        self.uses = np.zeros(count, dtype=np.int64)

    def touch(self, ids: np.ndarray, t: int) -> None:
        super().touch(ids, t)
        self.uses[ids] += 1

    def score(self, cand: np.ndarray, t: int) -> np.ndarray:
        return self.uses[cand]


class Window(Policy):
    """The paper's sliding window (LLM in a flash, section 3.1): keep what the last `window`
    tokens used, the current one included.

    Before token t reads, records no token of t-window+1 .. t-1 used are dropped (`expire`),
    which frees memory but can only lose hits at a fixed capacity; when the window holds more
    than the capacity, the least recently used make room. The dense engine's caches use it
    (a cache that holds every record of its layer never drops any); for experts, at equal
    occupancy it is LRU, and its point is the smaller mean occupancy.
    """

    name = "window"

    @classmethod
    def state_bytes(cls, count: int) -> int:
        return 8 * count  # the last use of each record

    def __init__(self, count: int, capacity: int, window: int = 5) -> None:
        super().__init__(count, capacity)
        if window < 1:  # a window of 0 tokens would drop what the token being read needs
            raise ValueError(f"a window keeps the last window >= 1 tokens, not {window}")
        self.window = window

    def score(self, cand: np.ndarray, t: int) -> np.ndarray:
        return self.last[cand]

    def expire(self, resident: np.ndarray, t: int) -> np.ndarray:
        resident = np.asarray(resident, dtype=np.int64)
        return resident[self.last[resident] <= t - self.window]


class LRFU(Policy):
    """Decayed frequency (LRFU, Lee et al. 1999): score = sum over past uses of decay^age.

    One knob between the two signals a router gives: decay -> 0 is LRU (only the last use
    counts), decay -> 1 is LFU (every use counts forever). MoE routing has both a popularity
    skew that lasts and short bursts of reuse, so an intermediate decay can beat either end.
    The default (0.995, a memory of a few hundred tokens) was the best of 0.5..0.995 on the
    fixture's routing of training text; there it is LFU with a slow drift (docs/MOE.md).
    Stored as (score at last use, last use), decayed lazily when compared.
    """

    name = "lrfu"

    def __init__(self, count: int, capacity: int, decay: float = 0.995) -> None:
        super().__init__(count, capacity)
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.crf = np.zeros(count, dtype=np.float64)

    def current(self, ids: np.ndarray, t: int) -> np.ndarray:
        """The experts' scores as of token t."""
        age = np.where(self.last[ids] < 0, 0, t - self.last[ids])
        return self.crf[ids] * self.decay ** age

    def touch(self, ids: np.ndarray, t: int) -> None:
        self.crf[ids] = self.current(ids, t) + 1.0
        super().touch(ids, t)

    def score(self, cand: np.ndarray, t: int) -> np.ndarray:
        return self.current(cand, t)


class Markov(Policy):
    """Evict the experts least likely to be needed soon, given what the current token uses.

    Routing of consecutive tokens is correlated beyond "the same experts again": the experts
    token t uses predict which ones tokens t+1.. will use (in the byte-level fixture, the
    current byte's class predicts the next byte's). The policy counts, online, how often
    expert b is used d = 1..`horizon` tokens after expert a (weighted gamma^(d-1)), and at
    eviction time scores each candidate by its estimated chance of following the experts of
    `keep` (the current token's), smoothed towards its overall frequency so that it starts
    as LFU. count x count counters: 128 KiB per layer for 128 experts. The default horizon
    (4) was the best of 1, 2, 4, 8 on the first (top-2) fixture's routing of training text;
    on the current (top-4) fixture's, 1-2 are 0.1 point better (docs/MOE.md).
    """

    name = "markov"

    @classmethod
    def state_bytes(cls, count: int) -> int:
        return super().state_bytes(count) + 8 * count * count

    def __init__(self, count: int, capacity: int, horizon: int = 4, gamma: float = 0.7) -> None:
        super().__init__(count, capacity)
        self.gamma = gamma
        self.follows = np.zeros((count, count), dtype=np.float64)
        self.uses = np.zeros(count, dtype=np.float64)
        self.recent: deque[np.ndarray] = deque(maxlen=horizon)
        self.keep = np.zeros(0, dtype=np.int64)

    def touch(self, ids: np.ndarray, t: int) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        for d, before in enumerate(reversed(self.recent)):
            self.follows[np.ix_(before, ids)] += self.gamma ** d
        self.uses[ids] += 1
        self.recent.append(ids)
        super().touch(ids, t)

    def victims(self, resident: np.ndarray, n: int, t: int, keep: np.ndarray) -> np.ndarray:
        self.keep = np.asarray(keep, dtype=np.int64)
        return super().victims(resident, n, t, keep)

    def score(self, cand: np.ndarray, t: int) -> np.ndarray:
        prior = (self.uses[cand] + 1) / (self.uses.sum() + self.count)
        now = self.keep
        return ((self.follows[np.ix_(now, cand)].sum(axis=0) + prior * len(now))
                / (self.uses[now].sum() + len(now)))


class Context(Markov):
    """Markov, sharpened by the exact expert sets of the last tokens as a context.

    Summing pairwise counts (Markov) blurs what the current token's experts say together: at
    byte level the whole top-k set nearly identifies the byte, and with the set before it, the
    pair of bytes, whose successors are far more predictable than any single expert's. So this
    keeps, online, for each context (the sets of the last 1..`order` tokens, as seen) how
    often it occurred and how often each expert was used 1..`horizon` tokens after it
    (weighted gamma^(d-1)), and scores a candidate by interpolating upwards: Markov's
    estimate, then the order-1 context's counts smoothed towards it with weight `c`, then
    order 2's towards that, stopping at the first context never seen. Memory: one count
    vector per context, the `max_contexts` most recently seen (a long generation would
    otherwise grow the table by up to `order` vectors a token, without bound), plus Markov's
    counters. The default order (2) was the best of 1, 2, 3 on the fixture's routing of
    training text (its table capped); on held-out text it is the best policy measured at
    every capacity above top-k (docs/MOE.md).
    """

    name = "context"
    MAX_CONTEXTS = 1024
    CONTEXT_BYTES = 512  # a table entry beside its counts: key, list, dict slot (measured ~400)

    @classmethod
    def state_bytes(cls, count: int) -> int:
        return super().state_bytes(count) + cls.MAX_CONTEXTS * (8 * count + cls.CONTEXT_BYTES)

    def __init__(self, count: int, capacity: int, horizon: int = 4, gamma: float = 0.7,
                 order: int = 2, c: float = 2.0, max_contexts: int = MAX_CONTEXTS) -> None:
        super().__init__(count, capacity, horizon, gamma)
        if order < 1 or max_contexts < 1:
            raise ValueError(f"order and max_contexts must be >= 1, got {order}, {max_contexts}")
        self.order = order
        self.c = c
        self.max_contexts = max_contexts
        # context -> [occurrences, counts], least recently seen first
        self.table: OrderedDict[tuple[bytes, ...], list] = OrderedDict()
        self.sets: deque[bytes] = deque(maxlen=order)  # the last tokens' sets, as keys
        self.contexts: deque[list[tuple[bytes, ...]]] = deque(maxlen=horizon)

    @staticmethod
    def _orders(sets: list[bytes]) -> list[tuple[bytes, ...]]:
        """The contexts of the last 1, 2, .. sets (most recent last in `sets`)."""
        return [tuple(sets[len(sets) - o:]) for o in range(1, len(sets) + 1)]

    def touch(self, ids: np.ndarray, t: int) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        for d, keys in enumerate(reversed(self.contexts)):
            for key in keys:
                entry = self.table.get(key)
                if entry is None:
                    if len(self.table) >= self.max_contexts:  # forget the least recent
                        self.table.popitem(last=False)
                    entry = self.table[key] = [0, np.zeros(self.count, dtype=np.float64)]
                else:
                    self.table.move_to_end(key)
                entry[1][ids] += self.gamma ** d
                entry[0] += d == 0
        super().touch(ids, t)
        self.sets.append(np.sort(ids).tobytes())
        self.contexts.append(self._orders(list(self.sets)))

    def score(self, cand: np.ndarray, t: int) -> np.ndarray:
        est = super().score(cand, t)
        sets = list(self.sets)[max(0, len(self.sets) - self.order + 1):] if self.order > 1 else []
        for key in self._orders([*sets, np.sort(self.keep).tobytes()]):
            entry = self.table.get(key)
            if entry is None:
                break
            est = (entry[1][cand] + self.c * est) / (entry[0] + self.c)
        return est


POLICIES: dict[str, type[Policy]] = {
    "lru": LRU, "lfu": LFU, "window": Window, "lrfu": LRFU, "markov": Markov,
    "context": Context}
DEFAULT_POLICY = "context"


def _check_trace(trace: Trace, capacity: int) -> None:
    for t, ids in enumerate(trace):
        if len(ids) > capacity:
            raise ValueError(f"token {t} needs {len(ids)} experts, more than capacity {capacity}")


def simulate_detail(trace: Trace, capacity: int, policy_cls: type[Policy] | str,
                    count: int | None = None, **kw: Any) -> dict[str, float]:
    """Replay `trace` through a policy as the engine drives it; hits, misses, occupancy.

    Per token: `expire` drops what it names; the needed experts already resident are hits; the
    rest are read (misses), first into free slots, then into slots the policy's `victims`
    frees; then `touch`. The cache starts empty, so first uses count as misses. Occupancy is
    counted at the end of each token.
    """
    _check_trace(trace, capacity)
    if isinstance(policy_cls, str):
        policy_cls = POLICIES[policy_cls]
    if count is None:
        count = 1 + max((int(ids.max()) for ids in trace if len(ids)), default=0)
    policy = policy_cls(count, capacity, **kw)
    resident = np.zeros(count, dtype=bool)
    hits = misses = 0
    occupancy = 0
    for t, ids in enumerate(trace):
        ids = np.asarray(ids, dtype=np.int64)
        stale = policy.expire(np.flatnonzero(resident), t)
        resident[stale[~np.isin(stale, ids)]] = False  # what token t needs stays
        present = resident[ids]
        hits += int(present.sum())
        missing = ids[~present]
        misses += len(missing)
        short = len(missing) - (capacity - int(resident.sum()))
        if short > 0:
            out = policy.victims(np.flatnonzero(resident), short, t, ids)
            if len(out) != short or resident[out].sum() != short or np.isin(out, ids).any():
                raise AssertionError(f"{policy.name} chose bad victims {out} at token {t}")
            resident[out] = False
        resident[missing] = True
        policy.touch(ids, t)
        occupancy += int(resident.sum())
    total = hits + misses
    return {"hits": hits, "misses": misses, "hit_rate": hits / total if total else 1.0,
            "mean_resident": occupancy / max(1, len(trace))}


def simulate(trace: Trace, capacity: int, policy_cls: type[Policy] | str, **kw: Any) -> float:
    """Hit rate of a policy on one layer's trace (hits / routings, cold misses included)."""
    return simulate_detail(trace, capacity, policy_cls, **kw)["hit_rate"]


def belady_hits(trace: Trace, capacity: int) -> int:
    """Hits of Belady's MIN on `trace`: the most any policy can get at this capacity.

    On a miss with the slots full, evict the resident (not needed by this token) whose next
    use is farthest in the future. Demand reads only, cache empty at the start, all of a
    token's experts resident together (so capacity >= top-k).
    """
    _check_trace(trace, capacity)
    trace = [np.asarray(ids, dtype=np.int64) for ids in trace]
    count = 1 + max((int(ids.max()) for ids in trace if len(ids)), default=0)
    never = len(trace)
    nxt = np.full(count, never, dtype=np.int64)
    following = [None] * len(trace)  # following[t][e]: the first token after t that uses e
    for t in range(len(trace) - 1, -1, -1):
        following[t] = nxt.copy()
        nxt[trace[t]] = t
    resident = np.zeros(count, dtype=bool)
    hits = 0
    for t, ids in enumerate(trace):
        present = resident[ids]
        hits += int(present.sum())
        missing = ids[~present]
        short = len(missing) - (capacity - int(resident.sum()))
        if short > 0:
            cand = np.flatnonzero(resident)
            cand = cand[~np.isin(cand, ids)]
            far = cand[np.argsort(-following[t][cand], kind="stable")[:short]]
            resident[far] = False
        resident[missing] = True
    return hits


def belady_hit_rate(trace: Trace, capacity: int) -> float:
    total = sum(len(ids) for ids in trace)
    return belady_hits(trace, capacity) / total if total else 1.0
