"""Mixture-of-Experts models: converted to expert records, served from flash, exact.

Every supported architecture, float and 4-bit, as a tiny random model built with mlx-lm's own
classes: greedy decoding through mlx_flash gives mlx-lm's logits bit for bit on the same
weights, whatever the budget (every expert held, a few slots per layer that evict, the naive
engine that reads every token's experts anew), prompts larger than the cache included."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import greedy_logits
from tiny_moe import CONFIGS, mlx_lm_model, write_hf_experts, write_tiny_moe

from mlx_flash.api import load
from mlx_flash.bundle import EXPERTS, Bundle
from mlx_flash.bundle_writer import write_manifest
from mlx_flash.convert import convert
from mlx_flash.errors import BudgetError, BundleError
from mlx_flash.eviction import DEFAULT_POLICY
from mlx_flash.expert_index import SourceModel
from mlx_flash.memory import expert_budget
from mlx_flash.paths import resolve_model
from mlx_flash.piece_io import PieceReader

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 40, 41, 42, 43]
STEPS = 32


@pytest.fixture(scope="session")
def moe_models(tmp_path_factory) -> dict[tuple[str, int | None], tuple[Path, Path, np.ndarray]]:
    """(model type, bits) -> (mlx-lm folder, bundle, mlx-lm's greedy logits)."""
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for model_type in CONFIGS:
        for bits in (None, 4):
            src = root / f"{model_type}-{bits}"
            write_tiny_moe(src, model_type, bits)
            reference = greedy_logits(mlx_lm_model(src), PROMPT, STEPS)
            bundle = convert(src, root / f"{model_type}-{bits}.flash", dtype=None,
                             progress=False)
            out[(model_type, bits)] = src, bundle.path, reference
    return out


def slots_budget(path: Path, slots: int, policy: str = DEFAULT_POLICY) -> int:
    """The budget giving each MoE layer `slots` expert slots, for a bundle or (streamed from
    its own files) a model folder."""
    return expert_budget(resolve_model(path), 4, 2048, slots, policy)


# where the experts are read from: the bundle's records, the mlx-lm folder's own files, or
# a GGUF file's (of other random weights: its own mlx-lm reference)
SOURCES = ["bundle", "source", "gguf"]
GGUF_ARCHS = {"qwen3_moe": "qwen3moe", "mixtral": "mixtral"}
GGUF_TYPES = {None: "F32", 4: "Q4_0"}


@pytest.fixture(scope="session")
def gguf_models(tmp_path_factory):
    """(model type, bits) -> (a GGUF of that model, mlx-lm's greedy logits on its weights as
    stored), written on first use."""
    from test_moe_gguf import mlx_lm_of_stored
    from tiny_moe_gguf import write_moe_gguf

    from mlx_flash.sources import open_source

    root = tmp_path_factory.mktemp("moe-gguf")
    cache: dict[tuple[str, int | None], tuple[Path, np.ndarray]] = {}

    def get(model_type: str, bits: int | None) -> tuple[Path, np.ndarray]:
        if model_type not in GGUF_ARCHS:
            pytest.skip(f"no GGUF {model_type}")
        if (model_type, bits) not in cache:
            path = root / f"{model_type}-{bits}.gguf"
            write_moe_gguf(path, GGUF_ARCHS[model_type], GGUF_TYPES[bits])
            cache[model_type, bits] = path, greedy_logits(
                mlx_lm_of_stored(open_source(path)), PROMPT, STEPS)
        return cache[model_type, bits]

    return get


def model_of(moe_models, gguf_models, read_from: str, model_type: str, bits: int | None
             ) -> tuple[Path, np.ndarray]:
    """(what to load, mlx-lm's greedy logits) for the experts read from `read_from`."""
    if read_from == "gguf":
        return gguf_models(model_type, bits)
    src, path, reference = moe_models[(model_type, bits)]
    return (src if read_from == "source" else path), reference


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("read_from", SOURCES)
def test_greedy_equals_mlx_lm_at_every_budget(moe_models, gguf_models, model_type, bits,
                                              read_from):
    path, reference = model_of(moe_models, gguf_models, read_from, model_type, bits)
    for budget, lookahead, policy in (
            (None, False, "context"), ("off", False, "context"), ("auto", False, "context"),
            (3, False, "context"), (3, False, "markov"), (3, False, "lru"), (3, False, "lrfu"),
            (3, False, "window"), (4, True, "lfu")):
        if isinstance(budget, int):
            budget = slots_budget(path, budget, policy)
        model, _ = load(path, memory_budget=budget, lookahead=lookahead, expert_policy=policy)
        got = greedy_logits(model, PROMPT, STEPS)
        assert np.array_equal(got, reference), (budget, float(np.abs(got - reference).max()))
        engine = model.flash
        assert engine.stats.decode.tokens == STEPS
        assert isinstance(engine.bundle, SourceModel) == (read_from != "bundle")
        if budget == "off":  # naive: every token reads its experts anew
            assert engine.cache_stats().hits == 0
            assert engine.stats.decode.records_read == STEPS * engine.plan.layers * 2
        elif budget is None or budget == "auto":  # held whole: nothing read after loading
            assert engine.plan.whole and engine.stats.decode.bytes == 0
        elif not lookahead:
            assert engine.cache_stats().evictions > 0  # 3 of 8 slots: the cache evicted
        if lookahead:  # the next layer's router guessed some of its experts
            ahead = engine.lookahead_stats
            assert ahead.needed > 0 and ahead.found > 0 and 0 <= ahead.unused <= engine.read_ahead


def test_hugging_face_names_convert_to_the_same_model(moe_models, tmp_path):
    for model_type in ("qwen3_moe", "mixtral"):
        src, _, reference = moe_models[(model_type, None)]
        hf = tmp_path / model_type
        write_hf_experts(src, hf)
        assert any(".experts.3." in k for k in mx.load(str(hf / "model.safetensors")))
        bundle = convert(hf, tmp_path / f"{model_type}.flash", dtype=None, progress=False)
        model, _ = load(bundle.path, memory_budget=slots_budget(bundle.path, 2))
        assert np.array_equal(greedy_logits(model, PROMPT, STEPS), reference)
        # streamed from the folder's own files: each expert's tensors are its pieces
        model, _ = load(hf, memory_budget=slots_budget(hf, 2))
        assert isinstance(model.flash.bundle, SourceModel)
        assert np.array_equal(greedy_logits(model, PROMPT, STEPS), reference)


def test_expert_records_are_whole_pages_of_stored_bits(moe_models):
    src, path, _ = moe_models[("qwen3_moe", 4)]
    bundle = Bundle.open(path)
    fam = bundle.families[EXPERTS]
    assert fam.record_bytes % 4096 == 0 and fam.count == 8
    assert set(fam.quantization) == {"gate", "up", "down"}
    weights = mx.load(str(src / "model.safetensors"))
    stored = weights["model.layers.1.mlp.switch_mlp.down_proj.weight"]  # [E, d, n·bits/32]
    offset, _ = fam.segments[1]
    part = fam.part("down")
    with open(bundle.path / fam.file, "rb") as f:
        f.seek(offset + 5 * fam.record_bytes + part.offset)
        record = np.frombuffer(f.read(part.nbytes), dtype=np.uint32)
    assert np.array_equal(record, np.array(stored[5]).reshape(-1))  # bit for bit


def test_expert_matrix_is_never_reallocated(moe_models):
    _, path, _ = moe_models[("mixtral", None)]
    model, _ = load(path, memory_budget=slots_budget(path, 2))
    caches = model.flash.caches
    before = {layer: c.matrix.buffer_address("gate") for layer, c in caches.items()}
    greedy_logits(model, PROMPT, STEPS)
    assert sum(c.stats.evictions for c in caches.values()) > 0
    assert before == {layer: c.matrix.buffer_address("gate") for layer, c in caches.items()}


def test_stream_generate_unchanged(moe_models):
    from mlx_lm import generate

    src, path, _ = moe_models[("qwen2_moe", None)]
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(src)
    expected = generate(mlx_lm_model(src), tokenizer, "the cat", max_tokens=12)
    model, tok = load(path, memory_budget=slots_budget(path, 2))
    assert generate(model, tok, "the cat", max_tokens=12) == expected


def test_budget_below_the_minimum_names_it(moe_models):
    _, path, _ = moe_models[("olmoe", 4)]
    with pytest.raises(BudgetError, match="below the minimum .* the 2 experts a token routes"):
        load(path, memory_budget=slots_budget(path, 2) - 1)


def test_expert_records_not_matching_the_model_are_refused(moe_models, tmp_path):
    import shutil

    _, path, _ = moe_models[("qwen3_moe", None)]
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["config"]["num_experts"] = 16  # the records hold 8
    write_manifest(bad, manifest)  # sealed anew: a consistent manifest, wrong records
    with pytest.raises(BundleError, match="expert records do not match"):
        load(bad)


def test_unsupported_moe_architecture_names_the_supported(tmp_path):
    from mlx_flash.arch import UnsupportedModel
    from mlx_flash.arch.moe import check_moe_config

    with pytest.raises(UnsupportedModel, match="qwen3_moe"):
        check_moe_config({"model_type": "gpt_oss", "hidden_size": 64})
    from mlx_flash.arch import get_architecture

    with pytest.raises(UnsupportedModel, match="Mixture-of-Experts: deepseek_v2, .*qwen3_moe"):
        get_architecture({"model_type": "gpt_oss", "hidden_size": 64})


def test_evaluate_reports_mlx_lm_perplexity(moe_models):
    from mlx_flash.calibrate import text_tokens
    from mlx_flash.evaluate import evaluate, perplexity
    from mlx_flash.loader import bundle_tokenizer

    src, path, _ = moe_models[("deepseek_v2", 4)]
    data = Path(__file__).parent / "data" / "wikitext-2-valid-tail.txt"
    r = evaluate(path, data, tokens=300, ctx=100, progress=False)
    ids = text_tokens(bundle_tokenizer(Bundle.open(path)), data)[-301:]
    assert r["mode"] == "experts" and r["tokens"] == 300
    assert r["ppl_sparse"] == perplexity(mlx_lm_model(src), ids, 100, "", False)


def test_server_serves_an_moe_model(moe_models):
    from test_server import chat, post, start

    _, path, _ = moe_models[("qwen3_moe", 4)]
    proc, base = start("--model", str(path), "--max-kv-size", "200", "--memory-budget",
                       str(slots_budget(path, 3)))
    try:
        status, reply = post(base, chat(temperature=0.0))
        assert status == 200 and reply["usage"]["completion_tokens"] >= 1, reply
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bfloat16_scales_are_widened_on_admission(tmp_path):
    """A 4-bit source with bfloat16 scales, streamed on MLX's CPU backend: the slots hold
    float32 scales (converted as each expert is read), the experts multiply where they lie,
    and greedy output is mlx-lm's."""
    src = tmp_path / "bf16-4bit"
    write_tiny_moe(src, "qwen3_moe", bits=4, dtype=mx.bfloat16)
    model, _ = load(src, memory_budget=slots_budget(src, 3))
    engine = model.flash
    if not mx.metal.is_available():
        assert engine.family.part("gate.scales").dtype == "float32" and engine._in_place
        assert engine.plan.work >= engine.bundle.stage_bytes > 0
    assert np.array_equal(greedy_logits(model, PROMPT, 8),
                          greedy_logits(mlx_lm_model(src), PROMPT, 8))


def test_a_bfloat16_source_keeps_its_dtype(tmp_path):
    src = tmp_path / "bf16"
    write_tiny_moe(src, "olmoe", dtype=mx.bfloat16)
    bundle = convert(src, tmp_path / "bf16.flash", dtype=None, progress=False)
    assert bundle.dtype == "bfloat16" and bundle.families[EXPERTS].part("gate").dtype == "bfloat16"
    model, _ = load(bundle.path, memory_budget=slots_budget(bundle.path, 3))
    assert np.array_equal(greedy_logits(model, PROMPT, 8),
                          greedy_logits(mlx_lm_model(src), PROMPT, 8))


def test_trained_fixture_equals_mlx_lm(tmp_path):
    """The trained fixture (tests/data/moe-tiny: real routing, float16, top-4) under a budget
    of 8 of its 16 experts per layer (2 x top-k): evicting by the default policy, exact."""
    src = Path(__file__).parent / "data" / "moe-tiny"
    bundle = convert(src, tmp_path / "moe-tiny.flash", dtype=None, progress=False)
    assert bundle.dtype == "float16"
    want = None
    for path in (bundle.path, src):  # the bundle's records, then the folder's own files
        model, tok = load(path, memory_budget=slots_budget(path, 8))
        prompt = tok.encode("The history of the city")
        got = greedy_logits(model, prompt, STEPS)
        want = greedy_logits(mlx_lm_model(src), prompt, STEPS) if want is None else want
        assert np.array_equal(got, want)
        stats = model.flash.cache_stats()
        assert stats.evictions > 0 and 0 < stats.hit_rate < 1


def engine_read_ahead(model) -> bool:
    return model.flash.read_ahead > 0


@pytest.mark.parametrize("kind", ["eio", "eof", "short"])
@pytest.mark.parametrize("lookahead", [False, True])
@pytest.mark.parametrize("read_from", SOURCES)
def test_read_faults_never_poison_the_expert_caches(moe_models, gguf_models, monkeypatch, kind,
                                                    lookahead, read_from):
    """A read that fails (EIO, an end of file) mid-generation surfaces as an error, leaves no
    expert slot unlike the file, and the next generation on the same model equals mlx-lm's;
    legal short reads are completed."""
    import os

    from test_faults import Faulty

    path, reference = model_of(moe_models, gguf_models, read_from, "qwen3_moe", 4)
    model, _ = load(path, memory_budget=slots_budget(path, 3), lookahead=lookahead)
    faulty = Faulty(kind, at=7)
    monkeypatch.setattr(os, "preadv", faulty)
    try:
        got = greedy_logits(model, PROMPT, STEPS)
    except (OSError, BundleError):
        assert kind != "short"
    else:  # short reads complete; a read ahead that failed leaves the layer to read itself
        assert kind == "short" or lookahead and engine_read_ahead(model)
        assert np.array_equal(got, reference)
    monkeypatch.setattr(os, "preadv", faulty.real)
    assert_slots_equal_the_file(model.flash, path)
    assert np.array_equal(greedy_logits(model, PROMPT, STEPS), reference)


def assert_slots_equal_the_file(engine, path: Path) -> None:
    """Every expert slot of every cache holds its expert's bytes as the file has them (the
    bundle's records, or a source's pieces as they are read)."""
    from mlx_flash.flash_io import FlashReader
    from mlx_flash.neuron_matrix import NeuronMatrix

    for layer, cache in engine.caches.items():
        held = np.sort(cache.neuron_at[:cache.size])
        fresh = NeuronMatrix(engine.family, max(1, len(held)))
        reader = PieceReader(engine.bundle) if isinstance(engine.bundle, SourceModel) \
            else FlashReader(path / engine.family.file)
        reader.read_records(engine.family, layer, held, np.arange(len(held)), fresh)
        for name, rows in cache.matrix.rows.items():
            assert np.array_equal(rows[cache.slot_of[held]], fresh.rows[name][:len(held)])


@pytest.mark.parametrize("change", [{"num_experts": 10**9}, {"num_experts_per_tok": 9},
                                    {"num_experts": 0}, {"moe_intermediate_size": 10**12}])
def test_hostile_moe_configs_are_refused(moe_models, tmp_path, change):
    """Sizes no real model has are refused before anything is sized by them."""
    import shutil

    from mlx_flash.arch import UnsupportedModel

    src, _, _ = moe_models[("qwen3_moe", None)]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises((UnsupportedModel, ValueError)):
        convert(bad, tmp_path / "out", dtype=None, progress=False)
    assert not (tmp_path / "out").exists()
