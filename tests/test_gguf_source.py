"""GGUF MoE models streamed from the GGUF file itself (issue 21): an index of each expert's
GGML blocks, converted on admission into exactly the bytes a converted bundle holds, the
resident weights and tokenizer from the GGUF; nothing under MLX_FLASH_HOME but the index and
the tokenizer. Greedy decoding at every budget, policy, with lookahead and after read faults:
tests/test_moe.py (its "gguf" source)."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from test_moe_gguf import BIG_BLOCKS, PROMPT, mlx_lm_of_stored
from tiny_models import CHAT_TEMPLATE, greedy_logits
from tiny_moe_gguf import write_moe_gguf

from mlx_flash.api import load
from mlx_flash.bundle import EXPERTS, Bundle
from mlx_flash.convert import convert
from mlx_flash.errors import BundleError
from mlx_flash.flash_io import FlashReader
from mlx_flash.gguf_index import GGUFSourceModel
from mlx_flash.memory import expert_budget
from mlx_flash.neuron_matrix import NeuronMatrix
from mlx_flash.paths import home, index_path, resolve_model
from mlx_flash.piece_io import PieceReader
from mlx_flash.sources import open_source

STEPS = 8


def read_all(reader, fam, layer: int, order: np.ndarray) -> NeuronMatrix:
    """Every expert of `layer` read into the slots, expert e into slot order[e]."""
    matrix = NeuronMatrix(fam, fam.count)
    reader.read_records(fam, layer, np.arange(fam.count), order, matrix)
    return matrix


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"])
@pytest.mark.parametrize("arch", ["qwen3moe", "mixtral"])
def test_slots_hold_the_converted_bundles_bytes(tmp_path, arch, qtype):
    """Each expert's GGML blocks, converted on admission, are the bytes `convert` writes into
    the bundle's record: Q4_0/Q4_1/Q8_0 packed words, scales and biases; other types
    dequantized to the slots' dtype."""
    path = tmp_path / f"{qtype}.gguf"
    write_moe_gguf(path, arch, qtype, **(BIG_BLOCKS if qtype == "BF16" else {}))
    source = resolve_model(path, progress=False)
    assert isinstance(source, GGUFSourceModel) and source.indexed
    bundle = convert(path, tmp_path / "b.flash", dtype=None, progress=False)
    fam, bfam = source.families[EXPERTS], bundle.families[EXPERTS]
    assert (fam.dtype, fam.parts, fam.record_bytes, fam.quantization) \
        == (bfam.dtype, bfam.parts, bfam.record_bytes, bfam.quantization)
    assert source.config == bundle.config  # the resident modules quantized alike
    order = np.random.default_rng(0).permutation(fam.count)
    for layer in source.pieces:
        ours = read_all(PieceReader(source, threads=2), fam, layer, order)
        theirs = read_all(FlashReader(bundle.path / bfam.file), bfam, layer, order)
        for name, rows in theirs.rows.items():
            assert np.array_equal(ours.rows[name], rows), (layer, name)
    resident = Bundle.open(bundle.path).load_resident()
    mine = source.load_resident()
    assert mine.keys() == resident.keys()
    for k, a in resident.items():
        assert mine[k].dtype == a.dtype and mx.array_equal(mine[k], a).item(), k


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random blocks: NaN scales, inf
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "IQ4_NL"])
def test_other_ggml_types_are_dequantized_on_admission(tmp_path, qtype):
    """Types kept as no MLX quantization (random blocks: gguf-py cannot write them) fill the
    slots with what `convert` stores: `get_weight`'s floats in the slots' dtype (float16)."""
    path = tmp_path / "k.gguf"
    write_moe_gguf(path, "qwen3moe", qtype, **BIG_BLOCKS)
    source = resolve_model(path, progress=False)
    fam = source.families[EXPERTS]
    assert fam.dtype == "float16" and not fam.quantization
    gguf = open_source(path)
    for layer in source.pieces:
        matrix = read_all(PieceReader(source), fam, layer, np.arange(fam.count))
        for t in ("gate", "up", "down"):
            name = f"model.layers.{layer}.mlp.switch_mlp.{t}_proj.weight"
            want = np.array(gguf.get_weight(name).astype(mx.float16).view(mx.uint8))
            assert np.array_equal(matrix.rows[t], want.reshape(fam.count, -1)), (layer, t)
    assert source.stage_bytes > 0


def test_a_gguf_streams_its_experts_with_nothing_but_an_index(tmp_path):
    """Loaded without a dtype, a GGUF MoE model streams its experts from the file: mlx-lm's
    greedy logits on its weights, its tokenizer written once beside the index, no bundle;
    a dtype asked for converts."""
    path = tmp_path / "moe.gguf"
    write_moe_gguf(path, "qwen3moe", "Q8_0")
    reference = greedy_logits(mlx_lm_of_stored(open_source(path)), PROMPT, STEPS)
    before = path.read_bytes()
    budget = expert_budget(resolve_model(path, progress=False), 4, 2048, 3)
    model, tok = load(path, memory_budget=budget)
    assert isinstance(model.flash.bundle, GGUFSourceModel)
    assert np.array_equal(greedy_logits(model, PROMPT, STEPS), reference)
    assert model.flash.stats.decode.bytes > 0
    assert tok.decode(tok.encode("the cat")) == "the cat"
    tokenizer = index_path(path).with_name(index_path(path).stem + "-tokenizer")
    assert (tokenizer / "tokenizer_config.json").is_file()
    assert path.read_bytes() == before
    assert not any((home() / "bundles").glob("moe-*"))
    written = sum(f.stat().st_size for f in [index_path(path), *tokenizer.rglob("*")]
                  if f.is_file())
    assert written < 0.1 * model.flash.bundle.ffn_bytes
    assert isinstance(resolve_model(path, dtype="float32", progress=False), Bundle)


def test_the_gguf_index_follows_the_file(tmp_path):
    path = tmp_path / "moe.gguf"
    write_moe_gguf(path, "mixtral", "Q4_0")
    where = index_path(path)
    assert GGUFSourceModel(path, where).indexed and where.is_file()
    assert not GGUFSourceModel(path, where).indexed  # unchanged: reused
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert GGUFSourceModel(path, where).indexed  # a new mtime
    # the same size and mtime, another header (its chat template): indexed anew
    data = path.read_bytes()
    template = CHAT_TEMPLATE.encode()
    assert data.count(template) == 1
    path.write_bytes(data.replace(template, template[:-1] + b" "))
    stat2 = path.stat()
    os.utime(path, ns=(stat2.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert GGUFSourceModel(path, where).indexed
    assert not GGUFSourceModel(path, where).indexed
    where.write_text("{not json")  # a damaged index is rebuilt
    assert GGUFSourceModel(path, where).indexed


def test_verify_hashes_the_gguf(tmp_path):
    path = tmp_path / "moe.gguf"
    write_moe_gguf(path, "qwen3moe", "Q4_1")
    load(path, verify=True, memory_budget=None)  # its sha256 recorded
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(BundleError, match="sha256 does not match the one recorded"):
        load(path, verify=True)


def test_a_dense_gguf_still_converts(default_gguf):
    """Only MoE GGUFs stream: a dense one converts into a bundle, as before."""
    from mlx_flash.gguf_index import gguf_moe

    assert gguf_moe(Path(default_gguf)) is None


def test_generate_on_a_gguf_equals_its_bundle(tmp_path):
    """`generate --model X.gguf` with an empty MLX_FLASH_HOME, offline: the converted
    bundle's greedy text, with a budget just above the minimum too; the home then holds the
    index and the tokenizer, no bundle."""
    import subprocess
    import sys

    path = tmp_path / "moe.gguf"
    write_moe_gguf(path, "mixtral", "Q4_0")
    bundle = convert(path, tmp_path / "moe.flash", dtype=None, progress=False)
    flash_home = tmp_path / "flash_home"
    root = Path(__file__).parent.parent
    env = {**os.environ, "MLX_FLASH_HOME": str(flash_home), "PYTHONPATH": str(root)}

    def generate(model: Path, *extra: str) -> str:
        out = subprocess.run([sys.executable, "-m", "mlx_flash", "generate", "--model",
                              str(model), "--prompt", "the cat sat", "--max-tokens", "12",
                              "--temp", "0", *extra], capture_output=True, text=True,
                             timeout=300, cwd=root, env=env)
        assert out.returncode == 0, out.stderr
        return out.stdout

    want = generate(bundle.path)
    assert want.strip()
    assert generate(path) == want
    source = GGUFSourceModel(path, flash_home / "indexes" / index_path(path).name)
    minimum = expert_budget(source, 4, 2048, 2)
    assert generate(path, "--memory-budget", str(minimum + 1)) == want
    assert not (flash_home / "bundles").exists()
    assert sorted(f.name for f in (flash_home / "indexes").iterdir()) \
        == sorted([index_path(path).name, index_path(path).stem + "-tokenizer"])


def mapped_rss_kib(path: Path) -> int:
    """The kB of `path`'s mappings resident in this process (/proc/self/smaps)."""
    total, ours = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line
            ours = line.endswith(str(path))
        elif ours and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc/self/smaps")
@pytest.mark.parametrize("qtype", ["Q4_1", "F16"])
def test_tensors_read_leave_no_mapped_pages_behind(tmp_path, qtype):
    """Every tensor read out of the GGUF's mapping lets go of the file's pages once converted:
    a model's resident tensors read one after another otherwise held the file's pages beside
    their conversions (~90 MB past the budget at load, the MoE benchmark's GGUF)."""
    path = tmp_path / "m.gguf"
    write_moe_gguf(path, "qwen3moe", qtype, hidden_size=256, experts=4, expert_ffn=512,
                   intermediate_size=512)
    source = open_source(path)
    names = list(source.tensors)
    read = sum(source.tensors[n].n_bytes for n in names)
    for name in names:
        source.get_weight(name)
    # what stays: the header's pages and at most a page or two at each tensor's ends
    assert mapped_rss_kib(path) * 1024 < 0.1 * read + 2 * 4096 * len(names), (
        mapped_rss_kib(path), read)
