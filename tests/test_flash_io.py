"""FlashReader: coalesced positional reads scattered straight into the neuron matrix."""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_flash import flash_io
from mlx_flash.bundle import RecordFamily, RecordPart
from mlx_flash.errors import BundleError
from mlx_flash.flash_io import FlashReader, coalesce
from mlx_flash.neuron_matrix import NeuronMatrix

COUNT, D = 64, 8
# an OPT-like record: up row, down column, one bias, padding to 24 elements
FAMILY = RecordFamily("neuron", "ffn.bin", COUNT, 24 * 4, "float32",
                      (RecordPart("up", 0, D, "float32"), RecordPart("down", 4 * D, D, "float32"),
                       RecordPart("up_bias", 8 * D, 1, "float32")), ((4096, COUNT * 24 * 4),))


@pytest.fixture(scope="module")
def segment(tmp_path_factory):
    """A file with 4096 junk bytes, then COUNT records whose values encode (record, element)."""
    records = np.arange(COUNT)[:, None] * 1000.0 + np.arange(24)[None, :]
    path = tmp_path_factory.mktemp("io") / "ffn.bin"
    with open(path, "wb") as f:
        f.write(b"\xff" * 4096)
        f.write(records.astype(np.float32).tobytes())
    return path, records.astype(np.float32)


def test_coalesce():
    assert coalesce(np.array([], dtype=np.int64)) == []
    assert coalesce(np.array([3])) == [(0, 1)]
    assert coalesce(np.array([1, 2, 3, 7, 8, 10])) == [(0, 3), (3, 2), (5, 1)]
    ids = np.array([1, 2, 3, 7, 8, 10])
    # records of 100 bytes, 40 wanted from each: gaps of 60 between neighbours, 360 over 7-3
    assert coalesce(ids, 100, 40, max_gap=59) == [(k, 1) for k in range(6)]
    assert coalesce(ids, 100, 40, max_gap=160) == [(0, 3), (3, 3)]
    assert coalesce(ids, 100, 40, max_gap=360) == [(0, 6)]
    # cut at every max_read bytes from the first record (records start at 0, 100, 200, 600,
    # 700 and 900 bytes past it)
    assert coalesce(ids, 100, 40, max_gap=360, max_read=500) == [(0, 3), (3, 3)]
    assert coalesce(ids, 100, 40, max_gap=360, max_read=150) == [(0, 2), (2, 1), (3, 2), (5, 1)]
    assert coalesce(np.arange(10), 100, 100, max_read=300) == [(0, 3), (3, 3), (6, 3), (9, 1)]


PART_SETS = [None, ("up",), ("down",), ("up", "down"), ("down", "up_bias")]


@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_records_land_in_their_slots(segment, data):
    """Any sorted set of records, any parts of them, read into any distinct slots (scattered,
    consecutive, or as far apart as the records with the rows between free) with any gap
    allowance and read size, lands exactly where a brute-force copy puts it; nothing else is
    written but, into free rows, the records that belong there; the bytes read are the wanted
    spans plus the gaps merged over, in one call per merged run."""
    path, records = segment
    ids = np.array(sorted(data.draw(st.sets(st.integers(0, COUNT - 1), max_size=COUNT))),
                   dtype=np.int64)
    layout = data.draw(st.sampled_from(["scattered", "consecutive", "free rows"]))
    if layout == "scattered":
        slots = np.array(data.draw(st.permutations(range(COUNT)))[: len(ids)], dtype=np.int64)
    elif layout == "consecutive":
        slots = np.arange(len(ids)) + data.draw(st.integers(0, COUNT - len(ids)))
    else:
        slots = ids - (ids[0] if len(ids) else 0)
    first = int(ids[0]) if len(ids) else 0
    parts = data.draw(st.sampled_from(PART_SETS))
    max_gap = data.draw(st.sampled_from([0, 50, 96, 500, 4096]))
    max_read = data.draw(st.sampled_from([96, 500, 2000]))
    threads = data.draw(st.sampled_from([1, 3]))
    matrix = NeuronMatrix(FAMILY, COUNT)
    for part in matrix.parts.values():
        np.array(part, copy=False)[:] = -1
    reader = FlashReader(path, max_gap=max_gap, max_read=max_read, threads=threads)
    reader.read_records(FAMILY, 0, ids, slots, matrix, parts,
                        into_free_rows=layout == "free rows")
    wanted = [p for p in FAMILY.parts if parts is None or p.name in parts]
    expected = {p.name: np.full((COUNT, p.length), -1, np.float32) for p in FAMILY.parts}
    for i, s in zip(ids, slots, strict=True):
        for p in wanted:
            expected[p.name][s] = records[i, p.offset // 4:p.offset // 4 + p.length]
    for p in FAMILY.parts:
        got = np.array(matrix.parts[p.name])
        if layout == "free rows":  # rows between may hold their own record (row r: first + r)
            own = np.full_like(got, np.nan)
            own[:COUNT - first] = records[first:, p.offset // 4:p.offset // 4 + p.length]
            between = (got != expected[p.name]).any(axis=1)
            np.testing.assert_array_equal(got[between], own[between])
        else:
            np.testing.assert_array_equal(got, expected[p.name])
    start, end = matrix.span([p.name for p in wanted])
    runs = coalesce(ids, FAMILY.record_bytes, end - start, max_gap,
                    max_read if threads > 1 else 0)
    span_bytes = sum((ids[f + n - 1] - ids[f]) * FAMILY.record_bytes + end - start
                     for f, n in runs)
    assert reader.counters.bytes == span_bytes
    assert reader.counters.calls == len(runs)
    assert reader.counters.records == len(ids)


@pytest.mark.parametrize("parts", [("down",), ("up",), ("down", "up_bias"), ("up", "up_bias")])
def test_partial_records(segment, parts):
    """Reading some parts of records: those parts land in their slots (parts inside the span
    that were not asked for are not written), one read per record, only the span's bytes."""
    path, records = segment
    ids, slots = np.array([3, 4, 9]), np.array([7, 0, 2])
    matrix = NeuronMatrix(FAMILY, COUNT)
    reader = FlashReader(path, max_gap=0)
    reader.read_records(FAMILY, 0, ids, slots, matrix, parts)
    for p in FAMILY.parts:
        got = np.array(matrix.parts[p.name])[slots]
        if p.name in parts:
            first = p.offset // 4  # float32 elements
            np.testing.assert_array_equal(got, records[ids, first:first + p.length])
        else:
            assert not got.any()
    start, end = FAMILY.part_span(parts)
    assert reader.counters.calls == len(ids)
    assert reader.counters.bytes == len(ids) * (end - start)


def test_one_read_per_run(segment):
    path, _ = segment
    reader = FlashReader(path, max_gap=0)
    matrix = NeuronMatrix(FAMILY, COUNT)
    ids = np.array([0, 1, 2, 3, 10, 11, 40])
    reader.read_records(FAMILY, 0, ids, np.arange(len(ids)), matrix)
    assert reader.counters.calls == 3


def test_short_reads_are_completed(segment, monkeypatch):
    """The kernel may return fewer bytes than asked; the reader continues where it stopped."""
    path, records = segment
    real = os.preadv

    def stingy(fd, buffers, offset):  # returns at most 100 bytes per call
        total, out = 0, []
        for b in buffers:
            take = min(len(b), 100 - total)
            if take <= 0:
                break
            out.append(memoryview(b)[:take])
            total += take
        return real(fd, out, offset)

    monkeypatch.setattr(flash_io.os, "preadv", stingy)
    matrix = NeuronMatrix(FAMILY, COUNT)
    FlashReader(path).read_records(FAMILY, 0, np.arange(COUNT), np.arange(COUNT), matrix)
    np.testing.assert_array_equal(np.array(matrix.parts["down"]), records[:, D:2 * D])
    np.testing.assert_array_equal(np.array(matrix.parts["up_bias"])[:, 0], records[:, 2 * D])


def test_truncated_file_is_a_bundle_error(segment, tmp_path):
    path, _ = segment
    short = tmp_path / "short.bin"
    short.write_bytes(path.read_bytes()[:4096 + 10 * FAMILY.record_bytes])
    matrix = NeuronMatrix(FAMILY, COUNT)
    with pytest.raises(BundleError, match="truncated"):
        FlashReader(short).read_records(FAMILY, 0, np.arange(20), np.arange(20), matrix)


def test_matrix_memory_is_filled_in_place(segment):
    """Reads write into the same buffers every time: MLX sees them without reallocation."""
    path, records = segment
    matrix = NeuronMatrix(FAMILY, COUNT)
    address = matrix.buffer_address("up")
    up = matrix.parts["up"]
    reader = FlashReader(path)
    for start in (0, 32):
        reader.read_records(FAMILY, 0, np.arange(start, start + 8), np.arange(8), matrix)
        assert mx.array_equal(up[:8], mx.array(records[start:start + 8, :D]))
    assert matrix.buffer_address("up") == address


def test_a_read_claiming_more_than_it_was_asked_is_a_bundle_error(segment, monkeypatch):
    path, _ = segment
    real = os.preadv
    monkeypatch.setattr(flash_io.os, "preadv", lambda fd, b, o: real(fd, b, o) + 1)
    with pytest.raises(BundleError, match="returned 385 bytes for 384 asked"):
        FlashReader(path).read_records(FAMILY, 0, np.arange(4), np.arange(4),
                                       NeuronMatrix(FAMILY, COUNT))


@pytest.mark.parametrize("how", ["by part", "gathered"])
def test_a_record_read_again_is_checked_again(tiny_bundle, monkeypatch, how):
    """A record that passed its check once is checked on every later read too: bytes a read
    got wrong after that (a flaky disk, a stale buffer) are caught, however the CRC32s are
    computed: part by part, or records of small parts gathered whole first."""
    from mlx_flash.bundle import Bundle
    from mlx_flash.flash_io import RecordChecker

    monkeypatch.setattr(flash_io, "GATHER_PIECE", 10**9 if how == "gathered" else 0)
    monkeypatch.setattr(flash_io, "GATHER_BYTES", 1000)  # a few records at a time
    bundle = Bundle.open(tiny_bundle)
    fam = bundle.families["neuron"]
    matrix = NeuronMatrix(fam, fam.count)
    ids = np.arange(fam.count)
    slots = ids[::-1].copy()
    FlashReader(bundle.ffn_path).read_records(fam, 1, ids, slots, matrix)
    checker = RecordChecker(bundle)
    for _ in range(2):
        checker.check("neuron", 1, ids, slots, matrix.rows)
    assert checker.records == 2 * fam.count and checker.seconds > 0
    matrix.rows["down"][slots[17], 3] ^= 0x20  # the next read of record 17 returned this
    with pytest.raises(BundleError, match=r"record 17 of neuron\[1\] does not match"):
        checker.check("neuron", 1, ids, slots, matrix.rows)
    with pytest.raises(BundleError, match=r"record 17 of neuron\[1\] does not match"):
        checker.check("neuron", 1, ids[17:18], slots[17:18], matrix.rows)
    checker.check("neuron", 1, ids[18:], slots[18:], matrix.rows)  # the others are sound
