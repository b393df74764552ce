"""mlx_flash: run language models larger than memory with MLX by keeping attention and
embeddings resident and streaming FFN neurons from flash (Alizadeh et al., "LLM in a flash",
arXiv 2312.11514)."""

__version__ = "0.1.0"

from .loader import load  # noqa: E402

__all__ = ["load", "__version__"]
