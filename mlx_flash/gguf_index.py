"""A GGUF Mixture-of-Experts model (llama.cpp's qwen3moe; Mixtral, a llama with experts)
whose routed experts are read from the GGUF file itself: no converted copy (docs/MOE.md,
"Streaming from the source").

llama.cpp stacks each projection's experts in one tensor (`blk.N.ffn_{gate,up,down}_exps`,
GGUF shape `(in, out, E)`: the expert is the outermost dimension), so each expert's slice of
GGML blocks is contiguous: one piece per tensor and expert, indexed as an mlx-lm folder's
(docs/FORMAT.md, "The expert index"), its `dtype` the GGML type where it is not a float.
`mlx_flash.piece_io.PieceReader` converts a piece on admission as `convert` would: Q4_0, Q4_1
and Q8_0 blocks into MLX's affine quantization (packed words, scales, biases: the bytes a
converted bundle holds), other GGML types dequantized to the slots' dtype. The resident
weights are read from the GGUF at load as `convert` gets them (`GGUFSource.get_weight`); the
tokenizer, which a GGUF holds as metadata only, is written once beside the index.

The index is rebuilt when the file changes: its size, its mtime, or the sha256 of its header
(metadata and tensor table, everything before the tensors' data).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx

from .arch import check_finite, mlx_lm_quantization, resident_arrays
from .arch.moe import MOE_TYPES, TENSORS, build_model, check_moe_config
from .bundle import DTYPES, Quantization
from .errors import BundleError, ConversionError, SourceError
from .expert_index import (
    FORMAT,
    VERSION,
    SourceModel,
    config_digest,
    file_identity,
    index_is_fresh,
    open_index,
    routed_experts,
)
from .sources.gguf import GGUFSource

# GGML types kept as MLX's affine quantization (group size 32), by their bits
QUANTIZED = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
FLOATS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
GROUP_SIZE = 32


def gguf_moe(path: Path) -> GGUFSource | None:
    """`path` opened, if it is a sound GGUF file of a Mixture-of-Experts model we read; else
    None (what is wrong with one is for the converter to say)."""
    try:
        if not path.is_file():
            return None
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return None
        source = GGUFSource(path)
    except (OSError, SourceError):
        return None
    return source if source.experts else None


def header_sha256(source: GGUFSource) -> str:
    """The sha256 of the GGUF's bytes before its tensors' data: metadata and tensor table."""
    t = next(iter(source.tensors.values()))
    with open(source.path, "rb") as f:
        return hashlib.sha256(f.read(t.start - t.offset)).hexdigest()


def build_gguf_index(source: GGUFSource, config: dict[str, Any], digest: str
                     ) -> dict[str, Any]:
    """The index of the GGUF's experts (docs/FORMAT.md): from its header only."""
    name = source.path.name
    count = source.experts
    routed = routed_experts(config, name)
    first = min(routed)
    layers: dict[str, Any] = {}
    quantization: dict[str, dict[str, int]] = {}
    experts: list[str] = []
    for layer, r in sorted(routed.items()):
        entry: dict[str, Any] = {}
        for t in TENSORS:
            tensor = source.tensors.get(f"{r.path}.{t}_proj.weight")
            rows, cols = r.shapes[t]
            if tensor is None or tuple(reversed(tensor.shape)) != (count, rows, cols) \
                    or tensor.n_bytes % count:
                raise SourceError(f"{name}: layer {layer}'s {t} experts are not stacked "
                                  f"[{count}, {rows}, {cols}]")
            experts.append(tensor.name)
            kind = tensor.tensor_type.name
            bits = QUANTIZED.get(kind)
            q = {"bits": bits, "group_size": GROUP_SIZE} if bits else None
            if layer == first and q:
                quantization[t] = q
            elif layer != first and quantization.get(t) != q:
                raise SourceError(f"{name}: layer {layer}'s {t} experts ({kind}) are not "
                                  f"quantized as layer {first}'s (convert the model)")
            size = tensor.n_bytes // count
            entry[t] = {"dtype": FLOATS.get(kind, kind), "bytes": size,
                        "shape": [rows, cols * bits // 32] if bits else [rows, cols],
                        "file": [0] * count,
                        "offset": [tensor.start + e * size for e in range(count)]}
        layers[str(layer)] = entry
    return {"format": FORMAT, "version": VERSION, "source": str(source.path.resolve()),
            "config_sha256": config_digest(config),
            "files": [file_identity(source.path, digest)], "count": count,
            "quantization": quantization, "layers": layers,
            "expert_tensors": sorted(experts)}


class GGUFSourceModel(SourceModel):
    """A GGUF MoE model whose experts are streamed from the file: a `SourceModel` whose
    pieces are GGML blocks, whose resident weights and tokenizer come from `GGUFSource`."""

    def __init__(self, path: Path, index_path: Path, progress: bool = False,
                 source: GGUFSource | None = None):
        self.path, self.index_path = path, index_path
        self.source = source or GGUFSource(path)
        config = dict(self.source.config)
        check_moe_config(config)
        count = int(config[MOE_TYPES[config["model_type"]]])
        if count != self.source.experts:
            raise SourceError(f"{path.name}: {count} experts configured, "
                              f"{self.source.experts} stored")
        self.files = [path]
        digest = header_sha256(self.source)
        self.index, self.indexed = open_index(
            index_path,
            lambda index: index_is_fresh(index, path, config, self.files, lambda f: digest),
            lambda: build_gguf_index(self.source, config, digest), path.name, progress)
        # the resident modules stored as Q4_0/Q4_1/Q8_0 are quantized modules (as convert's)
        quantized = {n.removesuffix(".weight"): Quantization(QUANTIZED[t.tensor_type.name],
                                                             GROUP_SIZE)
                     for n, t in self._resident_tensors().items()
                     if t.tensor_type.name in QUANTIZED}
        if quantized:
            config["quantization"] = mlx_lm_quantization(quantized)
        self.config = config
        # the slots' dtype as `convert` chooses a bundle's
        first = self.index["layers"][min(self.index["layers"], key=int)]["gate"]
        self.dtype = "float32" if self.index["quantization"] and not mx.metal.is_available() \
            else {"float32": "float32", "bfloat16": "bfloat16"}.get(first["dtype"], "float16")
        self._lay_out()
        self._tokenizer_written = not self.indexed

    def _resident_tensors(self) -> dict:
        experts = set(self.index["expert_tensors"])
        return {hf: t for hf, t in self.source.tensors.items()
                if self.source.gguf_names[hf] not in experts}

    @property
    def transient_bytes(self) -> int:
        """The float32 transients of the largest piece's conversion (pieces are converted one
        at a time, after their reads)."""
        return 8 * max(rows * cols for entry in self.index["layers"].values()
                       for rows, cols in map(self._elements, entry.values()))

    @property
    def stage_bytes(self) -> int:
        """The staging of the pieces a token routes to, and one conversion's transients."""
        staged = super().stage_bytes
        return staged + self.transient_bytes if staged else 0

    def _elements(self, entry: dict[str, Any]) -> tuple[int, int]:
        rows, cols = entry["shape"]
        bits = QUANTIZED.get(entry["dtype"])
        return rows, cols * 32 // bits if bits else cols

    @property
    def tokenizer_path(self) -> Path:
        """The tokenizer rebuilt from the GGUF's metadata, written beside the index once (anew
        when the index is)."""
        folder = self.index_path.with_name(self.index_path.stem + "-tokenizer")
        if not self._tokenizer_written or not (folder / "tokenizer_config.json").is_file():
            tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                self.source.save_tokenizer(tmp)
                shutil.rmtree(folder, ignore_errors=True)
                try:
                    os.replace(tmp, folder)
                except OSError:  # another process wrote it meanwhile
                    shutil.rmtree(tmp, ignore_errors=True)
                    if not (folder / "tokenizer_config.json").is_file():
                        raise
            except OSError as e:
                raise BundleError(f"cannot write the tokenizer of {self.path.name} into "
                                  f"{folder}: {e.strerror or e}; set MLX_FLASH_HOME to a "
                                  "writable folder") from None
            self._tokenizer_written = True
        return folder

    def loaded_resident_bytes(self, itemsize: int) -> int:
        """Memory the resident weights take once loaded: floats in the compute dtype,
        Q4_0/Q4_1/Q8_0 as packed words with their scales and biases."""
        total = 0
        for t in self._resident_tensors().values():
            n = math.prod(t.shape)
            bits = QUANTIZED.get(t.tensor_type.name)
            total += n * bits // 8 + 2 * (n // GROUP_SIZE) * itemsize if bits else n * itemsize
        return total

    def load_resident(self) -> dict[str, mx.array]:
        """Every tensor but the routed experts, as `convert` writes them into a bundle: read
        as stored (Q4_0/Q4_1/Q8_0 quantized), floats in the slots' dtype, mlx-lm's sanitize
        applied. The experts' blocks are never read here."""
        target = DTYPES[self.dtype]
        weights: dict[str, mx.array] = {}
        try:  # a mapping of its own, let go once read (its pages leave the process's memory)
            source = GGUFSource(self.path)
            for name in sorted(self._resident_tensors()):
                w = source.get_weight(name)
                check_finite(name, w)
                weights.update((k, a.astype(target) if mx.issubdtype(a.dtype, mx.floating)
                                else a) for k, a in resident_arrays(name, w, {}).items())
        except (SourceError, ConversionError) as e:
            raise BundleError(f"cannot read {self.path}: {e}") from None
        model = build_model(self.config)
        return model.sanitize(weights) if hasattr(model, "sanitize") else weights
