"""Reads that lie, and bundles altered where only a binding check can tell.

Reads (issue 23, item 3): `os.preadv` reporting success with other bytes than the file's
(random bytes, nothing written, the bytes of another place, random bytes over a short count)
or returning short at any call (tests/test_faults.py's `Faulty`), at every read site of both
engines. Every read is checked against its record's CRC32, so the request during which it
happens ends in an error or gives the right text, no cache row is left unlike the file, and the
next request answers as a fresh model does.

Bundles (item 9): what the records' own CRC32s cannot tell, and the manifest's seal of each
segment's checksums (`tables`) and the resident file's CRC32 can: a record altered together
with its checksum, a relabelled dtype or two layers' segments swapped in a re-signed manifest,
bytes flipped in resident.safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from test_faults import SITES, Faulty, assert_caches_equal_file, logits_of, site_model
from tiny_models import greedy_logits

from mlx_flash import flash_io
from mlx_flash.api import load
from mlx_flash.bundle import EXPERTS, Bundle
from mlx_flash.bundle_writer import write_manifest
from mlx_flash.convert import convert
from mlx_flash.errors import BundleError
from mlx_flash.flash_io import FlashReader
from mlx_flash.memory import expert_budget
from mlx_flash.neuron_matrix import NeuronMatrix

MOE_TINY = Path(__file__).parent / "data" / "moe-tiny"  # trained: 16 experts, top-4, float16
KINDS = ("short", *Faulty.LYING)


def inject(model, answer, fresh, kind: str, at: int, monkeypatch, counting,
           check_caches) -> tuple[bool, str | None]:
    """One request with os.preadv faulty at call `at`: it ends in a BundleError (a lying read
    caught) or gives the fresh model's answer; afterwards every cache row equals the file and
    the next request answers as the fresh model. (Whether it raised, and the thread the
    fault happened in: None if the request made fewer calls.)"""
    faulty = Faulty(kind, at)
    monkeypatch.setattr(os, "preadv", faulty)
    try:
        got = answer(model)
    except BundleError as e:
        assert kind in Faulty.LYING, f"{kind} at {at}: {e}"
        assert "does not match its checksum" in str(e)
        raised = True
    else:
        np.testing.assert_array_equal(got, fresh, err_msg=f"{kind} at {at}: wrong answer")
        raised = False
    monkeypatch.setattr(os, "preadv", counting)
    check_caches(model)
    np.testing.assert_array_equal(answer(model), fresh, err_msg=f"after {kind} at {at}")
    return raised, faulty.thread


class Recording(Faulty):
    """os.preadv as it is, noting the thread of each call."""

    def __init__(self):
        super().__init__("none")
        self.threads: list[str] = []

    def __call__(self, fd: int, buffers: list, offset: int) -> int:
        self.threads.append(threading.current_thread().name)
        return super().__call__(fd, buffers, offset)


def fault_calls(model, answer, monkeypatch, rng: np.random.Generator, count: int,
                background: bool) -> tuple[list[int], Recording]:
    """`count` call numbers of a request (the model's caches as the last one left them) to
    fault at: most while decoding, and with `background`, half among the reads made in the
    background (one read thread: the read runs in the thread that reads ahead); and the
    recording os.preadv now installed."""
    recording = Recording()
    monkeypatch.setattr(os, "preadv", recording)
    answer(model)
    total = recording.calls
    ats = rng.integers(total // 4, total, size=count) + 1
    if background:
        ahead = [i + 1 for i, t in enumerate(recording.threads) if t.startswith("flash-ahead")]
        assert ahead, "nothing was read in the background"
        ats[::2] = rng.choice(ahead, size=len(ats[::2]))
    return [int(a) for a in ats], recording


def count_mismatches(monkeypatch) -> list[int]:
    """[how many checks have found records unlike their checksums], counting from now (a
    read ahead in the background that fails is dropped, its layer reading for itself: the
    request raises nothing)."""
    seen = [0]
    real = flash_io.RecordChecker.check

    def check(self, *args, **kwargs) -> None:
        try:
            real(self, *args, **kwargs)
        except BundleError:
            seen[0] += 1
            raise

    monkeypatch.setattr(flash_io.RecordChecker, "check", check)
    return seen


def emptied_then_answered(model) -> np.ndarray:
    """The model's answer, its caches emptied first: the lookahead reads only into free rows,
    and a cache the last request filled has none, so every request starts with them all free
    (and makes the same reads: the fault's call numbers hold)."""
    for cache in model.flash.caches.values():
        cache.evict(cache.neuron_at[:cache.size].copy(), counted=False)
    return logits_of(model)


@pytest.mark.parametrize("site", SITES)
def test_lying_and_short_reads_never_poison_dense_answers(calibrated, site, monkeypatch):
    background = site in ("ahead", "lookahead")
    model, fresh, _, _ = site_model(calibrated, site, monkeypatch, threads=1 if background else 8)
    rng = np.random.default_rng(len(site))
    mismatches, caught, threads = count_mismatches(monkeypatch), {}, []
    answer = emptied_then_answered if site == "lookahead" else logits_of
    for kind in KINDS:
        ats, recording = fault_calls(model, answer, monkeypatch, rng, 4, background)
        before = mismatches[0]
        for at in ats:
            _, thread = inject(model, answer, fresh, kind, at, monkeypatch, recording,
                               lambda m: assert_caches_equal_file(m.flash))
            threads.append(thread)
        caught[kind] = mismatches[0] - before
    assert all(t is not None for t in threads)  # every fault happened
    assert caught["garbage"] > 0 and caught["shifted"] > 0  # and the check saw them
    if background:
        assert any(t.startswith("flash-ahead") for t in threads)


@pytest.fixture(scope="module")
def moe_tiny(tmp_path_factory) -> Path:
    return convert(MOE_TINY, tmp_path_factory.mktemp("moe") / "moe-tiny.flash", dtype=None,
                   progress=False).path


def slots_budget(path: Path, slots: int) -> int:
    return expert_budget(Bundle.open(path), 4, 2048, slots)


def assert_experts_equal_file(model) -> int:
    """Every expert slot the engine holds equals its record in the file; how many."""
    engine = model.flash
    held_total = 0
    for layer, cache in engine.caches.items():
        held = np.sort(cache.neuron_at[:cache.size])
        fresh = NeuronMatrix(engine.family, max(1, len(held)))
        reader = FlashReader(engine.bundle.path / engine.family.file)
        reader.read_records(engine.family, layer, held, np.arange(len(held)), fresh)
        reader.close()
        for name, rows in cache.matrix.rows.items():
            np.testing.assert_array_equal(rows[cache.slot_of[held]], fresh.rows[name][
                :len(held)], err_msg=f"expert slots of layer {layer}, {name}")
        held_total += len(held)
    return held_total


@pytest.mark.parametrize("variant", ["caches", "lookahead"])
def test_lying_reads_never_poison_the_expert_caches(moe_tiny, monkeypatch, variant):
    """The trained fixture with 8 expert slots of 16 per layer (top-4: the caches evict): a
    read that reports success with other bytes than the file's, at any call (the expert
    caches, prefill's groups, the next layer's experts read ahead), is caught or harmless;
    no slot is left unlike the file, and the next request's greedy text equals a fresh
    model's."""
    options = {"memory_budget": slots_budget(moe_tiny, 8), "lookahead": variant == "lookahead"}
    fresh_model, tok = load(moe_tiny, **options)
    prompt = tok.encode("The history of the city")

    def answer(model) -> np.ndarray:
        return greedy_logits(model, prompt, 12)

    fresh = answer(fresh_model)
    counting = Faulty("none")
    monkeypatch.setattr(os, "preadv", counting)
    model, _ = load(moe_tiny, **options)
    # the lookahead's prefetch area borrows its slots from the caches (one from each layer)
    assert not model.flash.plan.whole and max(c.capacity for c in model.flash.caches.values()) \
        == 8 - (variant == "lookahead")
    np.testing.assert_array_equal(answer(model), fresh)
    assert model.flash.cache_stats().evictions > 0
    if variant == "lookahead":
        assert model.flash.read_ahead > 0
    rng = np.random.default_rng(7)
    mismatches, caught, threads = count_mismatches(monkeypatch), {}, []
    for kind in KINDS:
        ats, recording = fault_calls(model, answer, monkeypatch, rng, 5,
                                     variant == "lookahead")
        before = mismatches[0]
        for at in ats:
            _, thread = inject(model, answer, fresh, kind, at, monkeypatch, recording,
                               assert_experts_equal_file)
            threads.append(thread)
        caught[kind] = mismatches[0] - before
    happened = [t for t in threads if t is not None]
    if variant == "lookahead":  # reads ahead stop when their layer comes, so how many calls a
        # request makes varies with timing: a call number drawn from one may not come again
        assert len(happened) >= len(threads) // 2
    else:
        assert len(happened) == len(threads)
    assert caught["garbage"] > 0 and caught["shifted"] > 0
    assert assert_experts_equal_file(model) > 0
    if variant == "lookahead":
        assert any(t.startswith("flash-ahead") for t in happened)


# ------------------------------------------------------------------ item 9: altered bundles


def copy_of(path: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(path, out)
    return out


def resign(path: Path, change) -> None:
    """Edit the manifest and seal it anew (a consistent manifest: only the bytes can tell)."""
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    write_manifest(path, manifest)


def generate_fails(path: Path, match: str) -> None:
    """Loading `path` with 8 expert slots and answering one request fails with `match`."""
    with pytest.raises(BundleError, match=match):
        model, tok = load(path, memory_budget=slots_budget(path, 8))
        greedy_logits(model, tok.encode("The history of the city"), 4)


def test_new_bundles_seal_their_checksums_and_the_resident_file(moe_tiny, calibrated):
    for path in (moe_tiny, calibrated["hybrid"], calibrated["teal"]):
        bundle = Bundle.open(path)
        checker = flash_io.RecordChecker(bundle)
        for fam in bundle.families.values():  # calibration's families too
            assert fam.checksums == "crc32" and len(fam.tables) == fam.layers
            for layer in range(fam.layers):
                checker.table(fam, layer)  # each matches its seal
        resident = bundle.manifest["resident"]["file"]
        assert bundle.manifest["files"][resident]["crc32"] == zlib.crc32(
            (path / resident).read_bytes())


def test_a_record_altered_with_its_checksum_is_caught(moe_tiny, tmp_path):
    path = copy_of(moe_tiny, tmp_path)
    fam = Bundle.open(path).families[EXPERTS]
    offset, length = fam.segments[2]
    with open(path / fam.file, "r+b") as f:
        record = bytearray(os.pread(f.fileno(), fam.record_bytes, offset + 5 * fam.record_bytes))
        record[1000] ^= 0x10
        os.pwrite(f.fileno(), bytes(record), offset + 5 * fam.record_bytes)
        os.pwrite(f.fileno(), np.uint32(zlib.crc32(record)).astype("<u4").tobytes(),
                  offset + length + 4 * 5)  # its CRC32 rewritten to match
    Bundle.open(path)  # sizes unchanged, and each record matches its checksum
    generate_fails(path, r"checksums of experts\[2\] are not those the manifest was sealed")


def test_a_relabelled_dtype_in_a_resigned_manifest_is_caught(moe_tiny, tmp_path):
    path = copy_of(moe_tiny, tmp_path)

    def relabel(m) -> None:  # float16 records read as bfloat16: same sizes, other numbers
        fam = m["ffn"]["families"][EXPERTS]
        assert fam["dtype"] == "float16"
        fam["dtype"] = "bfloat16"
        for part in fam["parts"]:
            part["dtype"] = "bfloat16"

    resign(path, relabel)
    generate_fails(path, r"checksums of experts\[\d\] are not those the manifest was sealed")


def test_swapped_segments_in_a_resigned_manifest_are_caught(moe_tiny, tmp_path):
    path = copy_of(moe_tiny, tmp_path)

    def swap(m) -> None:
        segments = m["ffn"]["families"][EXPERTS]["segments"]
        segments[1], segments[3] = segments[3], segments[1]

    resign(path, swap)
    generate_fails(path, r"checksums of experts\[[13]\] are not those the manifest was sealed")


def test_flipped_resident_bytes_are_caught_at_load(moe_tiny, tmp_path):
    path = copy_of(moe_tiny, tmp_path)
    resident = path / Bundle.open(path).manifest["resident"]["file"]
    data = bytearray(resident.read_bytes())
    data[-100] ^= 0x01  # inside a tensor's data: the header still checks out
    resident.write_bytes(bytes(data))
    Bundle.open(path)
    generate_fails(path, "resident.safetensors is damaged: its CRC32 does not match")


def test_bundles_without_seals_still_open_and_check_their_records(moe_tiny, tmp_path):
    """Bundles written before seals (no `tables`, no file CRC32): their records are still
    checked against their CRC32s; what only a seal tells is not caught."""
    path = copy_of(moe_tiny, tmp_path)

    def unseal(m) -> None:
        del m["ffn"]["families"][EXPERTS]["tables"]
        for entry in m["files"].values():
            entry.pop("crc32", None)

    resign(path, unseal)
    model, tok = load(path, memory_budget=slots_budget(path, 8))
    prompt = tok.encode("The history of the city")
    fresh, _ = load(moe_tiny, memory_budget=slots_budget(moe_tiny, 8))
    np.testing.assert_array_equal(greedy_logits(model, prompt, 4),
                                  greedy_logits(fresh, prompt, 4))
    fam = Bundle.open(path).families[EXPERTS]
    with open(path / fam.file, "r+b") as f:  # every record of layer 0 altered
        offset, length = fam.segments[0]
        os.pwrite(f.fileno(), bytes(length), offset)
    generate_fails(path, r"record \d+ of experts\[0\] does not match its checksum")


def test_a_malformed_seal_is_refused(moe_tiny, tmp_path):
    path = copy_of(moe_tiny, tmp_path)
    resign(path, lambda m: m["ffn"]["families"][EXPERTS].update(tables=["00"]))
    with pytest.raises(BundleError, match="tables must be one sha256 per segment"):
        Bundle.open(path)


def test_the_seal_is_the_one_the_format_documents(moe_tiny):
    """docs/FORMAT.md's definition of `tables`, computed by hand."""
    import hashlib

    manifest = json.loads((moe_tiny / "manifest.json").read_text())
    entry = manifest["ffn"]["families"][EXPERTS]
    layout = {k: v for k, v in entry.items() if k not in ("file", "segments", "tables")}
    offset, length = entry["segments"][1]
    with open(moe_tiny / entry["file"], "rb") as f:
        table = os.pread(f.fileno(), 4 * entry["count"], offset + length)
    key = json.dumps({"family": EXPERTS, "layer": 1, "layout": layout}, sort_keys=True,
                     separators=(",", ":"))
    assert entry["tables"][1] == hashlib.sha256(key.encode() + b"\0" + table).hexdigest()
