"""The check every source's tokenizer passes before a bundle (or an mlx-lm folder) is
committed: it loads as the bundle will load it, with mlx-lm's loader, and encodes text. A
tokenizer that does not (a broken tokenizer.json) is refused at conversion, in one line,
rather than in a bundle that cannot load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import SourceError


def check_tokenizer(folder: Path, eos_token_id: Any, what: str) -> None:
    """SourceError unless the tokenizer saved in `folder` loads as mlx_flash's loader loads a
    bundle's (mlx-lm's `load_tokenizer`, no code of its own run) and encodes a text. A
    tokenizer that needs its own Python code (auto_map) is not run here: whoever loads the
    bundle decides whether to trust it."""
    from mlx_lm.utils import load_tokenizer

    settings = folder / "tokenizer_config.json"
    try:
        if settings.is_file() and "auto_map" in settings.read_text(errors="replace"):
            return
        tokenizer = load_tokenizer(folder, {"trust_remote_code": False},
                                   eos_token_ids=eos_token_id)
        tokenizer.encode("Hello, world.")
    except Exception as e:  # tokenizers and transformers raise anything on broken files
        lines = str(e).strip().splitlines()
        raise SourceError(f"{what}: its tokenizer does not load ({type(e).__name__}"
                          + (f": {lines[0][:200]}" if lines else "") + ")") from None
