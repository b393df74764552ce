"""The bundle format: layout on disk, validation, and clear errors for damaged bundles."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_flash
from mlx_flash.bundle import ALIGNMENT, VERSION, Bundle, manifest_digest
from mlx_flash.errors import BundleError


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


def rewrite_manifest(path: Path, edit, reseal: bool = True) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    if reseal:
        manifest["manifest_sha256"] = manifest_digest(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_layout_matches_the_source_weights(tiny_llama, tiny_bundle):
    """Each neuron record holds gate row i, up row i and down column i, contiguously, in a
    4096-aligned segment per layer; everything else is resident."""
    _, config, weights = tiny_llama
    b = Bundle.open(tiny_bundle, verify=True)
    fam = b.families["neuron"]
    d, n = config["hidden_size"], config["intermediate_size"]
    assert (fam.count, fam.record_bytes, fam.dtype) == (n, 3 * d * 4, "float32")
    raw = np.fromfile(b.ffn_path, dtype=np.float32)
    for layer, (offset, length) in enumerate(fam.segments):
        assert offset % ALIGNMENT == 0 and length == n * 3 * d * 4
        records = raw[offset // 4: (offset + length) // 4].reshape(n, 3 * d)
        p = f"model.layers.{layer}.mlp"
        np.testing.assert_array_equal(records[:, :d], weights[f"{p}.gate_proj.weight"])
        np.testing.assert_array_equal(records[:, d:2 * d], weights[f"{p}.up_proj.weight"])
        np.testing.assert_array_equal(records[:, 2 * d:], weights[f"{p}.down_proj.weight"].T)
    resident = b.load_resident()
    assert not any(".mlp." in k for k in resident)
    np.testing.assert_array_equal(np.array(resident["model.layers.1.self_attn.q_proj.weight"]),
                                  weights["model.layers.1.self_attn.q_proj.weight"])
    assert b.ffn_bytes + b.resident_bytes > 0.99 * sum(w.nbytes for w in weights.values())


def test_manifest_records_files_and_checksums(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["version"] == VERSION
    assert {"ffn.bin", "resident.safetensors", "tokenizer/tokenizer.json"} <= set(
        manifest["files"])
    for name, info in manifest["files"].items():
        assert (tiny_bundle / name).stat().st_size == info["bytes"]
        assert len(info["sha256"]) == 64


def damage_truncated_ffn(path: Path) -> None:
    with open(path / "ffn.bin", "r+b") as f:
        f.truncate((path / "ffn.bin").stat().st_size - 100)


def damage_altered_manifest(path: Path) -> None:
    rewrite_manifest(path, lambda m: m["config"].update(hidden_size=128), reseal=False)


def damage_wrong_version(path: Path) -> None:
    rewrite_manifest(path, lambda m: m.update(version=VERSION + 1))


def damage_file_outside(path: Path) -> None:
    def edit(m):
        m["ffn"]["families"]["neuron"]["file"] = "../ffn.bin"
        m["files"]["../ffn.bin"] = m["files"].pop("ffn.bin")
    shutil.copy(path / "ffn.bin", path.parent / "ffn.bin")
    rewrite_manifest(path, edit)


def damage_missing_file(path: Path) -> None:
    (path / "resident.safetensors").unlink()


def damage_not_json(path: Path) -> None:
    (path / "manifest.json").write_text("{ this is not json")


def damage_inconsistent_layout(path: Path) -> None:
    rewrite_manifest(path, lambda m: m["ffn"]["families"]["neuron"].update(count=7))


def neuron(m: dict) -> dict:
    return m["ffn"]["families"]["neuron"]


def rewrite_resident(path: Path, edit) -> None:
    """Replace resident.safetensors by `edit(its bytes)`, the manifest sealed to match (a
    damaged file that every size check passes)."""
    resident = path / "resident.safetensors"
    resident.write_bytes(edit(resident.read_bytes()))
    rewrite_manifest(path, lambda m: m["files"]["resident.safetensors"].update(
        bytes=resident.stat().st_size))


def damage_part_offset(path: Path) -> None:
    rewrite_manifest(path, lambda m: neuron(m)["parts"][1].update(
        offset=neuron(m)["parts"][1]["offset"] + 2))


# Manifests sealed anew (as a tool or a hostile hand would) whose damage only the checks of
# each entry's type and range find: each was a traceback (issue 13).
SEALED_DAMAGES = {
    "families a list": (lambda m: m["ffn"].update(families=[]), "families must be a JSON dict"),
    "files a list": (lambda m: m.update(files=[]), "files must be a JSON dict"),
    "alignment 0": (lambda m: m["ffn"].update(alignment=0), "alignment must be an integer"),
    "zero heads": (lambda m: m["config"].update(num_attention_heads=0), "num_attention_heads"),
    "count Infinity": (lambda m: neuron(m).update(count=float("inf")), "count must be"),
    "negative segment": (lambda m: neuron(m)["segments"][0].__setitem__(0, -4096),
                         "segment offset must be"),
    "selection a list": (lambda m: m.update(selection=[]), "selection must be a JSON dict"),
}


DAMAGES = {
    **{name: (lambda path, edit=edit: rewrite_manifest(path, edit), message)
       for name, (edit, message) in SEALED_DAMAGES.items()},
    "deeply nested manifest": (lambda path: (path / "manifest.json").write_text(
        "[" * 100_000 + "]" * 100_000), "not valid JSON"),
    "part offset off its item size": (damage_part_offset, "off its item size"),
    "resident header claims 8 GB": (lambda path: rewrite_resident(
        path, lambda b: (8 << 30).to_bytes(8, "little") + b[8:]), "header claims"),
    "resident offsets past the end": (lambda path: rewrite_resident(path, lambda b: b[:-64]),
                                      "runs past the end"),
    "truncated ffn": (damage_truncated_ffn, "truncated"),
    "altered manifest": (damage_altered_manifest, "altered"),
    "wrong version": (damage_wrong_version, "version"),
    "file outside the folder": (damage_file_outside, "outside the bundle"),
    "missing file": (damage_missing_file, "missing"),
    "manifest not JSON": (damage_not_json, "not valid JSON"),
    "inconsistent layout": (damage_inconsistent_layout, "mis-sized"),
}


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_damaged_bundle_is_a_clear_error(bundle_copy, damage):
    apply, message = DAMAGES[damage]
    apply(bundle_copy)
    with pytest.raises(BundleError, match=message):
        mlx_flash.load(bundle_copy)


@pytest.mark.parametrize("damage", ["truncated ffn", "wrong version", "families a list",
                                    "resident header claims 8 GB"])
def test_damaged_bundle_cli_prints_one_line(bundle_copy, damage):
    DAMAGES[damage][0](bundle_copy)
    r = subprocess.run([sys.executable, "-m", "mlx_flash.generate", "--model", str(bundle_copy),
                        "--max-tokens", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_corrupt_bytes_caught_by_verify(bundle_copy):
    with open(bundle_copy / "ffn.bin", "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    Bundle.open(bundle_copy)  # sizes still match: only the checksum tells
    with pytest.raises(BundleError, match="sha256"):
        Bundle.open(bundle_copy, verify=True)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a flash bundle"):
        Bundle.open(tmp_path)


def test_records_read_at_runtime_not_loaded_whole(tiny_bundle):
    """The FFN weights are not in memory: the model's parameters are only the resident part,
    and without caches each forward pass reads the layers' records from ffn.bin."""
    model, _ = mlx_flash.load(tiny_bundle, memory_budget="off")
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(model.parameters()))
    assert not any("gate_proj" in k or "down_proj" in k for k in params)
    b = Bundle.open(tiny_bundle)
    before = model.flash.reader_for("neuron").counters.bytes
    mx.eval(model(mx.array([[5, 6, 7]])))
    assert model.flash.reader_for("neuron").counters.bytes - before == b.ffn_bytes


@pytest.mark.parametrize("mode", ["predictor", "hybrid"])
def test_damaged_selection_file_is_a_clear_error(calibrated, mode, tmp_path):
    """A selection mode's file (its predictor, its thresholds) read at load is checked against
    its CRC32 in the manifest, as the resident weights are: a flipped byte in its data, which
    every header and size check passes, is one line, not a model that selects wrongly."""
    if mode not in calibrated:
        pytest.skip(f"no {mode} calibration here")
    path = tmp_path / "bundle"
    shutil.copytree(calibrated[mode], path)
    name = Bundle.open(path).selection["modes"][mode].get("file")
    if name is None:
        pytest.skip(f"{mode} keeps no file")
    data = bytearray((path / name).read_bytes())
    data[-3] ^= 0x40  # in the last tensor's data
    (path / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{name} is damaged"):
        mlx_flash.load(path, sparsity=mode)
