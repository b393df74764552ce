"""The first run's disk line: random cold reads measured once per disk, and a token's reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_models import greedy_logits
from tiny_moe import write_tiny_moe

import mlx_flash
from mlx_flash import disk_probe
from mlx_flash.convert import convert
from mlx_flash.flash_io import DEFAULT_MAX_GAP, DEFAULT_MAX_READ
from mlx_flash.memory import expert_budget
from mlx_flash.paths import resolve_model


def random_file(path, size: int) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes())


def test_measure_reads_what_it_says(tmp_path):
    """Every read is whole (its bytes counted) and at least PROBE_MIN_READS are made."""
    f = tmp_path / "data.bin"
    random_file(f, 3 * 2**20 + 123)
    speed = disk_probe.measure(f, 100_000, threads=3, seconds=0.01)
    assert speed.reads >= disk_probe.PROBE_MIN_READS and speed.reads % 3 == 0
    assert speed.read_bytes == 100_000 and speed.threads == 3
    assert speed.bytes_per_second > 0
    # a read larger than the file is cut to the file
    assert disk_probe.measure(f, 2**30, threads=1, seconds=0).read_bytes == f.stat().st_size


def test_gap_is_what_the_disk_moves_while_a_read_waits():
    speed = disk_probe.DiskSpeed(1 << 20, 1000, 1.0, 4, 100e-6)  # 1 GB/s, 0.1 ms a read
    assert speed.gap_bytes == int(100e-6 * speed.bytes_per_second)
    slow = disk_probe.DiskSpeed(1 << 20, 10, 0.5, 4, 100e-6)  # 21 MB/s: the page cache's
    assert slow.gap_bytes == DEFAULT_MAX_GAP
    fast = disk_probe.DiskSpeed(1 << 20, 5000, 1.0, 8, 1e-3)  # 5 GB/s, 1 ms: capped
    assert fast.gap_bytes == disk_probe.MAX_GAP


def test_disk_speed_is_measured_once_and_survives_a_broken_store(tmp_path):
    f = tmp_path / "data.bin"
    random_file(f, 2**20)
    store = tmp_path / "home" / "disks.json"
    first, measured = disk_probe.disk_speed(f, 65536, 2, store)
    assert measured and store.exists()
    again, measured = disk_probe.disk_speed(f, 65536, 2, store)
    assert not measured and again == first
    # another read size is another figure; the first one stays
    _, measured = disk_probe.disk_speed(f, 4096, 2, store)
    assert measured and len(json.loads(store.read_text())) == 2
    for broken in ("{not json", "[1, 2]", json.dumps({next(iter(json.loads(
            store.read_text()))): {"bogus": 1}})):
        store.write_text(broken)
        _, measured = disk_probe.disk_speed(f, 65536, 2, store)
        assert measured
        assert isinstance(json.loads(store.read_text()), dict)
    assert not [p for p in store.parent.iterdir() if p.name.startswith(".")]  # no leftovers


@pytest.fixture(scope="module")
def moe_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    src = root / "qwen3"
    write_tiny_moe(src, "qwen3_moe", 4)
    return src, convert(src, root / "qwen3.flash", dtype=None, progress=False).path


@pytest.mark.parametrize("where", ["bundle", "source"])
def test_expert_token_reads_and_line(moe_bundle, where, tmp_path, monkeypatch):
    """An expert engine's token: k experts in every MoE layer, of the records it reads, from
    the file it reads them from (the bundle's, or the model folder's own)."""
    monkeypatch.setenv("MLX_FLASH_HOME", str(tmp_path / "home"))
    path = moe_bundle[1] if where == "bundle" else moe_bundle[0]
    budget = expert_budget(resolve_model(path), 4, 256, 2)
    model, _ = mlx_flash.load(path, memory_budget=budget, context=256)
    engine = model.flash
    config = engine.bundle.config
    reads = disk_probe.token_reads(engine)
    layers = config["num_hidden_layers"]
    assert reads.records == config["num_experts_per_tok"] * layers
    assert reads.record_bytes == engine.family.record_bytes
    file = disk_probe.record_file(engine)
    assert file.exists() and (file.parent == path if where == "bundle" else file.parent == path)
    line, measured = disk_probe.tune_reads(engine, threads=2)
    assert measured and line.startswith("disk: ") and "measured now" in line
    assert f"{reads.records // layers} experts x {layers} layers" in line
    line, measured = disk_probe.tune_reads(engine, threads=2)
    assert not measured and "measured on the first run" in line
    size = min(max(reads.record_bytes, DEFAULT_MAX_READ), disk_probe.PROBE_MAX_READ)
    speed, _ = disk_probe.disk_speed(file, size, 2, tmp_path / "home" / "disks.json")
    assert all(r.max_gap == speed.gap_bytes for r in engine.readers.values())
    # the gap changes how records are read, never what is computed: the widest gap decodes
    # what the page cache's default does
    for r in engine.readers.values():
        r.set_max_gap(disk_probe.MAX_GAP)
    wide = greedy_logits(model, [5, 6, 7, 8], 12)
    default, _ = mlx_flash.load(path, memory_budget=budget, context=256)
    np.testing.assert_array_equal(wide, greedy_logits(default, [5, 6, 7, 8], 12))
    assert (tmp_path / "home" / "disks.json").is_file()


def test_dense_token_reads(tiny_bundle, tmp_path, monkeypatch):
    """A dense engine's token with nothing cached: every neuron of every layer."""
    monkeypatch.setenv("MLX_FLASH_HOME", str(tmp_path / "home"))
    model, _ = mlx_flash.load(tiny_bundle, memory_budget="off", context=64)
    engine = model.flash
    fam = engine.families["neuron"]
    reads = disk_probe.token_reads(engine)
    assert reads.bytes == fam.count * engine.n_layers * fam.record_bytes
    assert disk_probe.record_file(engine) == tiny_bundle / fam.file
    assert "before selection" in disk_probe.tune_reads(engine, threads=1)[0]


def test_io_group(tmp_path):
    v1 = tmp_path / "v1"
    v1.write_text("12:memory:/a\n7:blkio:/bench_1\n1:name=systemd:/x\n")
    assert disk_probe.io_group(v1) == "/bench_1"
    v2 = tmp_path / "v2"
    v2.write_text("0::/user.slice/throttled\n")
    assert disk_probe.io_group(v2) == "/user.slice/throttled"
    assert disk_probe.io_group(tmp_path / "missing") == ""


def test_cold_load_prints_the_disk_once(tiny_bundle, tmp_path, monkeypatch, capsys):
    """A cold load (reads reach the disk) measures the disk on its first run, says so on
    stderr, and fits the reads' gap to it; the next cold load is quiet; a warm one never
    measures."""
    monkeypatch.setenv("MLX_FLASH_HOME", str(tmp_path / "home"))
    mlx_flash.load(tiny_bundle, memory_budget="off", context=64, cold=False)
    assert not (tmp_path / "home" / "disks.json").exists()
    model, _ = mlx_flash.load(tiny_bundle, memory_budget="off", context=64, cold=True)
    err = capsys.readouterr().err
    assert err.startswith("disk: ") and "measured now" in err and len(err.splitlines()) == 1
    speed = next(iter(json.loads((tmp_path / "home" / "disks.json").read_text()).values()))
    gap = disk_probe.DiskSpeed(**speed).gap_bytes
    assert all(r.max_gap == gap for r in model.flash.readers.values())
    mlx_flash.load(tiny_bundle, memory_budget="off", context=64, cold=True)
    assert capsys.readouterr().err == ""
