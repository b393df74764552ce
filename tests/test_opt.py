"""Our OPT against transformers' OPTForCausalLM (torch CPU), on tiny random configs."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from tiny_models import write_hf_opt

import mlx_flash
from mlx_flash.convert import convert

torch = pytest.importorskip("torch", reason="torch (CPU) is the OPT reference; make test "
                            "installs it")

# float32 end to end; the two implementations differ only in summation order
MAX_ABS_DIFF = 1e-4

VARIANTS = {
    "pre-norm (OPT-125m and larger)": {"pre_norm": True},
    "post-norm with projections (OPT-350m)": {"pre_norm": False, "project": True},
}


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def opt_pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("opt") / "hf"
    reference = write_hf_opt(folder, **VARIANTS[request.param])
    bundle = convert(folder, folder.parent / "bundle", dtype="float32", progress=False)
    model, tokenizer = mlx_flash.load(bundle.path)
    return reference, model, tokenizer


def test_logits_match_transformers(opt_pair):
    reference, model, _ = opt_pair
    ids = np.random.default_rng(0).integers(3, 260, size=(2, 17))
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    got = np.array(model(mx.array(ids)))
    diff = np.abs(got - expected).max()
    assert diff < MAX_ABS_DIFF, diff
    assert np.abs(expected).max() > 0.1  # the comparison is not of near-zero outputs


def test_greedy_generation_matches_transformers(opt_pair):
    """Decoding with the KV cache (positions offset by the cache) gives transformers' tokens."""
    reference, model, _ = opt_pair
    prompt = [2, 40, 99, 7, 120]
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                      min_new_tokens=12)[0, len(prompt):].tolist()
    got = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=12)]
    assert got == expected


def test_ffn_records_hold_fc1_bias_and_fc2_column(opt_pair):
    reference, model, _ = opt_pair
    fam = model.flash.families["neuron"]
    names = [p.name for p in fam.parts]
    assert names == ["up", "down", "up_bias"] and fam.record_bytes % 16 == 0
    layer = reference.model.decoder.layers[1]
    d = layer.fc1.weight.shape[1]
    offset, length = fam.segments[1]
    raw = np.fromfile(model.flash.reader_for("neuron").path, dtype=np.float32, count=length // 4,
                      offset=offset).reshape(fam.count, fam.record_bytes // 4)
    np.testing.assert_array_equal(raw[:, :d], layer.fc1.weight.detach().numpy())
    np.testing.assert_array_equal(raw[:, d:2 * d], layer.fc2.weight.detach().numpy().T)
    np.testing.assert_array_equal(raw[:, 2 * d], layer.fc1.bias.detach().numpy())


def test_opt_bundle_generates_text(opt_pair):
    from mlx_lm import generate

    _, model, tokenizer = opt_pair
    text = generate(model, tokenizer, "the theme", max_tokens=8)
    assert isinstance(text, str) and model.flash.stats.decode.tokens >= 7


def test_positions_past_the_learned_table_are_refused(opt_pair):
    """OPT's positions are a learned table: a longer sequence is an error, not a gather of the
    memory past the table (which MLX does not check)."""
    _, model, _ = opt_pair
    learned = model.args.max_position_embeddings
    mx.eval(model(mx.zeros((1, learned), dtype=mx.int32)))
    with pytest.raises(ValueError, match=f"positions for {learned} tokens"):
        model(mx.zeros((1, learned + 1), dtype=mx.int32))
