"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) end to end, against mlx-lm."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm import generate, load, stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler

import mlx_flash
from mlx_flash.bundle import Bundle

PROMPT = "The history of the Roman Empire"


@pytest.fixture(scope="module")
def flash(default_bundle):
    return mlx_flash.load(default_bundle, memory_budget="off")


@pytest.fixture(scope="module")
def reference(default_reference):
    return load(str(default_reference))


def greedy_tokens(model, tokenizer, n: int) -> list[int]:
    tokens = []
    for r in stream_generate(model, tokenizer, PROMPT, max_tokens=n):
        tokens.append(r.token)
    return tokens


def test_first_32_greedy_tokens_equal_mlx_lm(flash, reference):
    """Greedy decoding from the bundle gives mlx-lm's tokens on the same float16 weights."""
    got = greedy_tokens(*flash, 32)
    expected = greedy_tokens(*reference, 32)
    assert len(got) == 32 and got == expected
    assert "Roman" in flash[1].decode(got)  # and they are text, not noise


def test_sampling_and_logits_processors_equal_mlx_lm(flash, reference):
    """mlx-lm's sampler and logits processors work unchanged: same seed, same tokens."""
    outs = []
    for model, tokenizer in (flash, reference):
        mx.random.seed(7)
        outs.append(generate(model, tokenizer, PROMPT, max_tokens=16,
                             sampler=make_sampler(temp=0.8, top_p=0.9),
                             logits_processors=make_logits_processors(repetition_penalty=1.3)))
    assert outs[0] == outs[1] and len(outs[0]) > 20


def test_logits_equal_and_qk_layout_independently_checked(flash, default_gguf, default_bundle):
    """Prompt logits equal a model built from MLX's own GGUF loader, which dequantizes in its
    own code and keeps llama.cpp's permuted Q/K rows (so it needs traditional RoPE): a check of
    our reader and of the Q/K un-permutation that does not share their code."""
    from mlx_lm.models import llama

    model, tokenizer = flash
    w = mx.load(str(default_gguf))
    cfg = Bundle.open(default_bundle).config
    ref = llama.Model(llama.ModelArgs.from_dict({**cfg, "rope_traditional": True}))
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    weights = {}
    for key in w:
        base, kind = key.rsplit(".", 1)
        if kind != "weight":
            continue
        value = w[key]
        if f"{base}.scales" in w:
            bits = value.shape[-1] // w[f"{base}.scales"].shape[-1]  # uint32 words per group
            value = mx.dequantize(value, w[f"{base}.scales"], w[f"{base}.biases"], 32, bits)
        if base == "token_embd":
            name = "model.embed_tokens"
        elif base == "output_norm":
            name = "model.norm"
        else:
            _, layer, part = base.split(".")
            name = f"model.layers.{layer}.{names[part]}"
        weights[f"{name}.weight"] = value.astype(mx.float16)
    ref.load_weights(list(weights.items()))
    x = mx.array([tokenizer.encode(PROMPT)])
    a, b = model(x)[0, -1].astype(mx.float32), ref(x)[0, -1].astype(mx.float32)
    assert mx.argmax(a).item() == mx.argmax(b).item()
    # float16 weights that differ in the last bit (MLX dequantizes in float16)
    assert mx.abs(a - b).max().item() < 0.02 * mx.abs(b).max().item()


def test_every_decode_token_reads_the_whole_ffn(flash, default_bundle):
    """The naive engine: each decode token reads every layer's records, no more, no less."""
    model, tokenizer = flash
    bundle = Bundle.open(default_bundle)
    model.flash.stats.reset()
    generate(model, tokenizer, "Hello", max_tokens=5)
    decode = model.flash.stats.decode
    assert decode.tokens >= 4
    assert decode.bytes == decode.tokens * bundle.ffn_bytes


def test_tokenizer_rebuilt_from_gguf(flash, wikitext):
    _, tokenizer = flash
    text = wikitext[:4000]
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_token_ids == {2}
    assert tokenizer.encode("<|im_start|>user")[0] == 1
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                         add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|im_start|>assistant\n") and "SmolLM" in chat
