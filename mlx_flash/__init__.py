"""mlx_flash: run language models larger than memory with MLX by keeping attention and
embeddings resident and streaming FFN neurons from flash (Alizadeh et al., "LLM in a flash",
arXiv 2312.11514)."""

from typing import Any

from ._version import __version__

__all__ = ["load", "__version__"]


def __getattr__(name: str) -> Any:
    # `load` pulls in MLX, mlx-lm and every layer of the package: imported when first used,
    # so that `import mlx_flash.bundle` (a tool reading bundles) does not pay for it
    if name == "load":
        from .api import load

        return load
    raise AttributeError(f"module 'mlx_flash' has no attribute {name!r}")
