"""MoE experts streamed from the model's own files (issue 21): a Hugging Face hub id runs
with nothing but a small index written under MLX_FLASH_HOME, giving mlx-lm's greedy text; the
index follows the files it describes; `verify` hashes them. Offline: the Hub cache is written
here on disk (tests/test_hub.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from test_hub import add_to_cache
from tiny_models import greedy_logits
from tiny_moe import mlx_lm_model, write_tiny_moe

from mlx_flash.api import load
from mlx_flash.errors import BundleError
from mlx_flash.expert_index import SourceModel
from mlx_flash.memory import expert_budget
from mlx_flash.paths import index_path, resolve_model

ROOT = Path(__file__).parent.parent
REPOS = {None: "org/tiny-qwen3-moe", 4: "org/tiny-qwen3-moe-4bit"}
COMMIT = "c" * 40
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 40, 41, 42, 43]


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """HF_HOME whose hub cache holds a tiny qwen3_moe written by mlx-lm, float32 and 4-bit,
    each under its repo id."""
    src = tmp_path_factory.mktemp("src")
    home = tmp_path_factory.mktemp("hf_home")
    for bits, repo in REPOS.items():
        write_tiny_moe(src / repo, "qwen3_moe", bits=bits)
        add_to_cache(home / "hub", repo, sorted((src / repo).iterdir()), COMMIT)
    return home


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)


def snapshot(hf_home: Path, repo: str) -> Path:
    return hf_home / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / COMMIT


def expert_bytes(folder: Path) -> int:
    return sum(a.nbytes for f in folder.glob("*.safetensors")
               for k, a in mx.load(str(f)).items() if ".switch_mlp." in k)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.mark.parametrize("bits", [None, 4])
def test_a_hub_model_streams_its_experts_from_its_own_files(hf_home, tmp_path, monkeypatch,
                                                            bits):
    """The must-show: `generate --model ORG/NAME` with an empty MLX_FLASH_HOME, offline,
    gives mlx-lm's greedy text on the same folder, with no budget and with one just above the
    minimum; MLX_FLASH_HOME then holds less than 10% of the experts' bytes."""
    repo = REPOS[bits]
    flash_home = tmp_path / "flash_home"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HF_ENDPOINT")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", MLX_FLASH_HOME=str(flash_home),
               PYTHONPATH=str(ROOT))
    args = ["generate", "--model", repo, "--prompt", "the cat sat", "--max-tokens", "16",
            "--temp", "0"]
    lm = run("-m", "mlx_lm", *args, env=env)
    assert lm.returncode == 0, lm.stderr
    text = lm.stdout.split("=" * 10 + "\n")[1]  # ==========\ntext\n==========\nPrompt: ...
    assert text.strip()
    folder = snapshot(hf_home, repo)
    k = json.loads((folder / "config.json").read_text())["num_experts_per_tok"]
    for budget in (None, "minimum"):
        extra = []
        if budget:
            monkeypatch.setenv("MLX_FLASH_HOME", str(flash_home))  # the index just written
            minimum = expert_budget(resolve_model(folder, progress=False), 4, 2048, k)
            extra = ["--memory-budget", str(minimum + 1)]
        flash = run("-m", "mlx_flash", *args, *extra, env=env)
        assert flash.returncode == 0, flash.stderr
        assert flash.stdout == text, (budget, flash.stdout, text)
    assert not (flash_home / "bundles").exists()
    assert len(list((flash_home / "indexes").iterdir())) == 1
    assert folder_bytes(flash_home) < 0.1 * expert_bytes(folder)
    missing = run("-m", "mlx_flash", "generate", "--model", "nobody/nothing", env=env)
    assert missing.returncode == 1
    assert missing.stderr == (f"error: nobody/nothing is not a file or folder, and not a model "
                              f"in the Hugging Face cache ({hf_home / 'hub'}) (HF_HUB_OFFLINE=1: "
                              "nothing is downloaded)\n")


@pytest.fixture
def folder(hf_home, tmp_path) -> Path:
    """A copy of the 4-bit model as a plain folder (files of its own to change)."""
    out = tmp_path / "model"
    out.mkdir()
    for f in snapshot(hf_home, REPOS[4]).iterdir():
        shutil.copyfile(f, out / f.name)
    return out


def test_the_index_follows_the_files(folder):
    first = SourceModel(folder, index_path(folder))
    assert first.indexed and index_path(folder).is_file()
    assert not SourceModel(folder, index_path(folder)).indexed  # unchanged: reused
    weights = folder / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert SourceModel(folder, index_path(folder)).indexed  # a new mtime: indexed anew
    # the same size and mtime, another header (a tensor renamed): indexed anew
    data = bytearray(weights.read_bytes())
    stat = weights.stat()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].replace(b'"lm_head.weight"', b'"lm_head.weighT"')
    weights.write_bytes(bytes(data[:8] + header + data[8 + n:]))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert SourceModel(folder, index_path(folder)).indexed
    index_path(folder).write_text("{not json")  # a damaged index is rebuilt
    assert SourceModel(folder, index_path(folder)).indexed
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rope_theta": 5000.0}))
    assert SourceModel(folder, index_path(folder)).indexed  # another config: indexed anew
    assert not SourceModel(folder, index_path(folder)).indexed


def test_an_index_lists_every_piece_of_every_expert(folder):
    source = SourceModel(folder, index_path(folder))
    weights = mx.load(str(folder / "model.safetensors"))
    stacked = weights["model.layers.1.mlp.switch_mlp.down_proj.scales"]  # [E, d, groups]
    files, offsets, nbytes, dtype = source.pieces[1]["down.scales"]
    assert dtype == "float32" and nbytes == stacked[5].nbytes and list(files) == [0] * 8
    with open(folder / "model.safetensors", "rb") as f:
        f.seek(int(offsets[5]))
        piece = np.frombuffer(f.read(nbytes), dtype=np.float32)
    assert np.array_equal(piece, np.array(stacked[5]).reshape(-1))
    assert list(np.diff(offsets)) == [nbytes] * 7  # stacked: each expert's slice contiguous
    assert source.ffn_bytes == expert_bytes(folder)


def test_verify_hashes_the_source_files(folder, hf_home, monkeypatch, tmp_path):
    model, _ = load(folder, verify=True, memory_budget=None)  # hashes recorded
    index = json.loads(index_path(folder).read_text())
    assert all(len(f["sha256"]) == 64 for f in index["files"])
    weights = folder / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-5] ^= 1  # a byte of the weights, size and mtime kept
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    load(folder, memory_budget=None)  # unverified, the index cannot tell
    with pytest.raises(BundleError, match="sha256 does not match the one recorded"):
        load(folder, verify=True)
    # a Hub cache's file: checked against the Hub's own sha256 (its blob's name)
    hub = tmp_path / "hub"
    shutil.copytree(hf_home / "hub", hub, symlinks=True)
    snap = hub / ("models--" + REPOS[4].replace("/", "--")) / "snapshots" / COMMIT
    load(snap, verify=True, memory_budget=None)
    blob = (snap / "model.safetensors").resolve()
    blob.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 does not match the Hub"):
        load(snap, verify=True, memory_budget=None)


def test_asking_for_a_dtype_converts(folder):
    """A dtype asked for (or `convert`) still makes a bundle: one record per expert."""
    from mlx_flash.bundle import Bundle

    assert isinstance(resolve_model(folder, dtype="float32", progress=False), Bundle)
    assert isinstance(resolve_model(folder, progress=False), SourceModel)


def test_streaming_only_reads(folder):
    """No expert is written anywhere: the source files are opened read-only and unchanged."""
    before = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in folder.iterdir()}
    model, _ = load(folder, memory_budget=expert_budget(resolve_model(folder), 4, 2048, 3))
    greedy_logits(model, PROMPT, 8)
    assert model.flash.stats.decode.bytes > 0
    assert before == {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in folder.iterdir()}
    want = greedy_logits(mlx_lm_model(folder), PROMPT, 8)
    model, _ = load(folder, memory_budget=expert_budget(resolve_model(folder), 4, 2048, 3))
    assert np.array_equal(greedy_logits(model, PROMPT, 8), want)


def test_touching_pieces_are_one_read(folder):
    """An mlx-lm folder stacks each tensor's experts: experts read together whose slices
    touch are one read per tensor part; bytes land as the file holds them."""
    from mlx_flash.bundle import EXPERTS
    from mlx_flash.neuron_matrix import NeuronMatrix
    from mlx_flash.piece_io import PieceReader

    source = SourceModel(folder, index_path(folder))
    fam = source.families[EXPERTS]
    parts = len(fam.parts)  # 9: packed, scales and biases of gate, up and down
    reader = PieceReader(source, threads=4, max_gap=0)  # only pieces that touch merge
    matrix = NeuronMatrix(fam, 8)
    reader.read_records(fam, 0, np.array([3]), np.array([5]), matrix)
    assert reader.counters.calls == parts and reader.counters.records == 1
    reader.read_records(fam, 0, np.arange(8), np.arange(8)[::-1].copy(), matrix)
    # 8 experts: at most one read per part (fewer where whole tensors touch in the file)
    assert reader.counters.calls - parts <= parts
    weights = mx.load(str(folder / "model.safetensors"))
    scales = np.array(weights["model.layers.0.mlp.switch_mlp.up_proj.scales"])
    assert np.array_equal(matrix.rows["up.scales"].view(np.float32)[7 - 2], scales[2].reshape(-1))
    assert reader.counters.bytes == 9 * source.ffn_bytes // 2 // 8  # layer 0's 9 experts' worth


def test_a_source_file_cut_short_is_one_line(folder):
    model, _ = load(folder, memory_budget=expert_budget(resolve_model(folder), 4, 2048, 2))
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    stat = weights.stat()
    # the file ends a byte before the end of layer 1's last down piece
    files, offsets, nbytes, _ = model.flash.bundle.pieces[1]["down"]
    end = int(offsets.max()) + nbytes
    weights.write_bytes(data[:end - 1])
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(BundleError, match="shorter than its expert index says"):
        greedy_logits(model, PROMPT, 32)
