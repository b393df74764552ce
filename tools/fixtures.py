"""Fixture builders the tools and the tests share: the byte-level tokenizer every synthetic model
carries (tools/bench_moe.py's scale model, tests/tiny_models.py's tiny ones). Tests import this
module; nothing here imports tests/."""

from __future__ import annotations

from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_vocab() -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary: specials, the 256 byte symbols, a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = SPECIAL + list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe", "in", "Ġa"]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    return tokens, merges


def save_byte_tokenizer(folder: Path) -> int:
    """Write a byte-level tokenizer (tokenizer.json & co.) into `folder`; returns vocab size."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    tokens, merges = byte_vocab()
    backend, _ = convert_gguf_tokenizer("llama", {
        "tokenizer_type": "gpt2", "pre_tokenizer_type": "smollm", "tokens": tokens,
        "token_type": [3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)),
        "merges": merges})
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SPECIAL[1],
                                  eos_token=SPECIAL[2], unk_token=SPECIAL[0],
                                  chat_template=CHAT_TEMPLATE)
    tok.save_pretrained(str(folder))
    return len(tokens)


def add_byte_tokenizer(writer, tokens: list[str], merges: list[str], pre: str, bos: int,
                       eos: int) -> None:
    """The byte-level BPE tokenizer `tokens`/`merges` (byte_vocab's, maybe extended) into a
    gguf-py GGUFWriter, as llama.cpp's converter writes a gpt2-style one (specials typed
    control, no BOS added)."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)
