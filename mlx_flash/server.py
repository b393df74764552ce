"""mlx-lm's OpenAI-compatible HTTP server, serving flash bundles.

    python -m mlx_flash.server [--model BUNDLE_OR_SRC] [--port 8080] [any mlx_lm.server flag]

Everything is mlx-lm's server; only model loading differs: `FlashModelProvider` loads through
`mlx_flash.load`, so the FFN weights stay on flash. Without --model it serves the embedded
default model.
"""

from __future__ import annotations

import gc
import os

import mlx.core as mx
from mlx_lm import server as mlx_server


class FlashModelProvider(mlx_server.ModelProvider):
    """mlx-lm's ModelProvider, loading models with `mlx_flash.load`."""

    def __init__(self, cli_args):
        if cli_args.model is None:
            from .loader import default_dtype
            from .paths import resolve_bundle

            cli_args.model = str(resolve_bundle(None, default_dtype()))
        super().__init__(cli_args)

    def _load(self, model_path, adapter_path=None, draft_model_path=None):
        if adapter_path is not None or draft_model_path is not None:
            raise ValueError("mlx_flash.server does not support adapters or draft models")
        from . import load

        self.reset()
        gc.collect()
        mx.clear_cache()
        model, tokenizer = load(model_path, tokenizer_config=self._tokenizer_config)
        if self.cli_args.use_default_chat_template and tokenizer.chat_template is None:
            tokenizer.chat_template = tokenizer.default_chat_template
        self.model_key = (model_path, None, None)
        self.model, self.tokenizer = model, tokenizer
        self.processor = None
        self.draft_model = None
        # The flash engine serves one sequence at a time from its neuron matrix.
        self.is_batchable = False


def main() -> None:
    from huggingface_hub.constants import HF_HUB_CACHE

    # mlx-lm's /v1/models scans the Hugging Face cache and fails when that folder is missing
    os.makedirs(HF_HUB_CACHE, exist_ok=True)
    mlx_server.ModelProvider = FlashModelProvider  # mlx-lm's main() builds its provider by name
    mlx_server.main()


if __name__ == "__main__":
    main()
