"""A Mixture-of-Experts model's routed experts read from the model's own safetensors files,
in place: no converted copy (docs/MOE.md, "Streaming from the source").

The first use of an mlx-lm folder (float or quantized: `switch_mlp.{gate,up,down}_proj`
stacked `[E, out, in]`, each expert's slice contiguous) or a Hugging Face folder (one tensor
per expert, `experts.E.gate_proj.weight`, Mixtral's w1/w3/w2) writes only an index: for each
routed layer, each part of an expert (gate, up, down; quantized: packed words, scales,
biases) and each expert, where its bytes lie (file, offset, length) and their dtype
(docs/FORMAT.md, "The expert index"). `SourceModel` then stands where a `Bundle` stands for
the loader and the expert engine: an expert family laid out as the slots hold it (`Bundle`'s
`RecordFamily`, no file of its own), the resident weights loaded from the source as mlx-lm
loads them, the tokenizer read in the folder. `mlx_flash.piece_io.PieceReader` reads the
pieces into the slots, converting on admission what the compute needs in another dtype.

The index is rebuilt when a source file changes: its size, its mtime, or the sha256 of its
safetensors header (names, dtypes, shapes, offsets). The experts' bytes themselves carry no
checksum of ours: `verify` hashes every file (sha256), against the Hub's own name for it
where the file is a Hugging Face cache blob.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .arch.moe import (
    MOE_TYPES,
    TENSORS,
    build_model,
    check_moe_config,
    expert_layout,
    routed_layers,
)
from .bundle import (
    EXPERTS,
    ITEMSIZE,
    Quantization,
    RecordFamily,
    check_safetensors,
    quantized_parts,
    read_json,
    sha256_file,
)
from .errors import BundleError, SourceError, UnsupportedModel

FORMAT = "mlx_flash.expert_index"
VERSION = 1
SOURCE_FILE = "<source>"  # the expert family's file: the source's own files, per piece
# safetensors dtypes an expert piece may have, by our names
DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "U32": "uint32"}
# Hugging Face names one tensor per expert; Mixtral calls the projections w1, w3, w2
HF_PROJ = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}
_HEX64 = re.compile(r"[0-9a-f]{64}")


def weight_files(folder: Path) -> list[Path]:
    """The folder's weights as mlx-lm finds them (`model*.safetensors`), else every
    `*.safetensors` (as `convert` reads a Hugging Face folder)."""
    files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if not files:
        raise SourceError(f"{folder} has no *.safetensors weights")
    return files


def read_header(path: Path) -> tuple[dict[str, Any], int, str]:
    """(the safetensors header, where its data starts, the sha256 of the header's bytes),
    the file checked first (`check_safetensors`)."""
    try:
        check_safetensors(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            raw = f.read(n)
    except (ValueError, OSError) as e:
        raise SourceError(f"cannot read {path}: {e}") from None
    header = json.loads(raw)
    header.pop("__metadata__", None)
    return header, 8 + n, hashlib.sha256(raw).hexdigest()


def file_identity(path: Path, header_sha256: str) -> dict[str, Any]:
    st = path.stat()
    return {"name": path.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "header_sha256": header_sha256}


def hub_sha256(path: Path) -> str | None:
    """The sha256 the Hugging Face Hub names a cached file by (a snapshot's link to a blob
    named by its content's sha256: large files), else None."""
    if path.is_symlink():
        target = path.resolve()
        if target.parent.name == "blobs" and _HEX64.fullmatch(target.name):
            return target.name
    return None


def _expert_names(names: set[str], path: str, t: str, count: int) -> list[str]:
    """The tensors holding routed tensor `t` of the SwitchGLU at `path`: one stacked
    `[E, out, in]` (mlx-lm) or one per expert (Hugging Face)."""
    stacked = f"{path}.{t}_proj.weight"
    if stacked in names:
        return [stacked]
    owner = path.rsplit(".", 1)[0]
    for hf in HF_PROJ[t]:
        per = [f"{owner}.experts.{e}.{hf}.weight" for e in range(count)]
        if all(n in names for n in per):
            return per
    raise SourceError(f"the source lacks the {t} matrices of {path}'s experts ({stacked} or "
                      f"{owner}.experts.E.{t}_proj.weight)")


def routed_experts(config: dict[str, Any], where: object) -> dict[int, Any]:
    """The model's routed MoE layers (`routed_layers`), or SourceError naming `where`."""
    routed = routed_layers(build_model(config))
    if not routed:
        raise SourceError(f"{where}: no routed experts")
    return routed


def build_index(folder: Path, config: dict[str, Any], files: list[Path]) -> dict[str, Any]:
    """The index of `folder`'s experts (docs/FORMAT.md): reads only the files' headers."""
    where: dict[str, tuple[int, dict[str, Any], int]] = {}  # tensor -> (file, entry, data start)
    identities = []
    for i, f in enumerate(files):
        header, start, digest = read_header(f)
        identities.append(file_identity(f, digest))
        for name, entry in header.items():
            where[name] = (i, entry, start)
    count = int(config[MOE_TYPES[config["model_type"]]])
    routed = routed_experts(config, folder)
    layers: dict[str, Any] = {}
    quantization: dict[str, dict[str, int]] = {}
    experts: list[str] = []
    for layer, r in sorted(routed.items()):
        entry: dict[str, Any] = {}
        for t in TENSORS:
            tensors = _expert_names(set(where), r.path, t, count)
            experts += tensors
            base = [n.removesuffix(".weight") for n in tensors]
            quantized = f"{base[0]}.scales" in where
            if quantized:
                experts += [f"{b}.{s}" for b in base for s in ("scales", "biases")]
            rows, cols = r.shapes[t]
            for part, suffix in zip(quantized_parts(t) if quantized else (t,),
                                    ("weight", "scales", "biases"), strict=False):
                file_of, offset_of, sizes, dtypes, shapes = [], [], set(), set(), set()
                for b in base:
                    i, e, start = where[f"{b}.{suffix}"]
                    begin, end = e["data_offsets"]
                    shape = tuple(e["shape"])
                    if len(base) == 1:  # stacked: each expert's slice, contiguous
                        if not shape or shape[0] != count or (end - begin) % count:
                            raise SourceError(f"{b}.{suffix} {shape} does not stack {count} "
                                              "experts")
                        size, shape = (end - begin) // count, shape[1:]
                        file_of += [i] * count
                        offset_of += [start + begin + e_ * size for e_ in range(count)]
                    else:
                        size = end - begin
                        file_of.append(i)
                        offset_of.append(start + begin)
                    sizes.add(size)
                    dtypes.add(e["dtype"])
                    shapes.add(shape)
                if len(sizes) != 1 or len(dtypes) != 1 or len(shapes) != 1:
                    raise SourceError(f"{folder}: layer {layer}'s {part} experts differ in "
                                      "size, dtype or shape")
                dtype = DTYPE_NAMES.get(dtypes.pop())
                shape = shapes.pop()
                if dtype is None or (dtype == "uint32") != (part == t and quantized):
                    raise SourceError(f"{folder}: layer {layer}'s {part} experts are of a "
                                      "dtype mlx_flash does not stream (convert the model)")
                if quantized and part == t:
                    bits = shape[-1] * 32 // cols
                    scales = where[f"{base[0]}.scales"][1]["shape"][-1]
                    q = {"bits": bits, "group_size": cols // max(1, scales)}
                    if shape != (rows, cols * bits // 32) or cols % max(1, scales) \
                            or quantization.setdefault(t, q) != q:
                        raise SourceError(f"{folder}: layer {layer}'s {t} experts are not "
                                          "quantized as the others (convert the model)")
                elif not quantized and shape != (rows, cols):
                    raise SourceError(f"{folder}: layer {layer}'s {t} experts have shape "
                                      f"{shape}, the model expects {(rows, cols)}")
                entry[part] = {"dtype": dtype, "bytes": sizes.pop(), "shape": list(shape),
                               "file": file_of, "offset": offset_of}
        layers[str(layer)] = entry
    return {"format": FORMAT, "version": VERSION, "source": str(folder.resolve()),
            "config_sha256": config_digest(config), "files": identities, "count": count,
            "quantization": quantization,
            "layers": layers, "expert_tensors": sorted(experts)}


def config_digest(config: dict[str, Any]) -> str:
    """The sha256 of the model config as read (which layers route, how many experts)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def index_is_fresh(index: Any, folder: Path, config: dict[str, Any], files: list[Path],
           digest: Any = None) -> bool:
    """Whether `index` (a JSON value, maybe damaged) describes these very files, read with
    this config. `digest(file)`: the sha256 of its header (default: safetensors')."""
    digest = digest or (lambda f: read_header(f)[2])
    try:
        if index.get("format") != FORMAT or index.get("version") != VERSION \
                or index.get("source") != str(folder.resolve()) \
                or index.get("config_sha256") != config_digest(config) \
                or not isinstance(index.get("layers"), dict) or not index["layers"] \
                or [f["name"] for f in index["files"]] != [f.name for f in files]:
            return False
        for f, known in zip(files, index["files"], strict=True):
            st = f.stat()
            if (st.st_size, st.st_mtime_ns) != (known["bytes"], known["mtime_ns"]) \
                    or digest(f) != known["header_sha256"]:
                return False
        return True
    except (AttributeError, KeyError, TypeError, ValueError, OSError, SourceError):
        return False


def write_index(path: Path, index: dict[str, Any]) -> None:
    """Write atomically: a reader finds the old index or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(index, separators=(",", ":")))
    os.replace(tmp, path)


def open_index(index_path: Path, fresh: Any, build: Any, name: str, progress: bool
               ) -> tuple[dict[str, Any], bool]:
    """(the index at `index_path` if `fresh(it)`, else `build()` written there; whether it
    was built now)."""
    index = None
    if index_path.is_file():
        try:
            index = read_json(index_path, SourceError)
        except SourceError:
            index = None
    if fresh(index):
        return index, False
    if progress:
        import sys

        print(f"mlx_flash: first use of {name}: indexing its experts into {index_path} (they "
              "are read from its own files)", file=sys.stderr)
    index = build()
    try:
        write_index(index_path, index)
    except OSError as e:
        raise BundleError(f"cannot write the expert index {index_path}: {e.strerror or e}; set "
                          "MLX_FLASH_HOME to a writable folder") from None
    return index, True


def source_dtype(config: dict[str, Any], index: dict[str, Any]) -> str:
    """The float dtype of the slots, as `convert` chooses a bundle's: quantized experts on
    MLX's CPU backend float32 (their products compute in float32 there: scales and biases
    widened on admission let them multiply where the slots hold them), else the source's."""
    first = index["layers"][min(index["layers"], key=int)]
    if index["quantization"] and not mx.metal.is_available():
        return "float32"
    return first["gate.scales" if "gate.scales" in first else "gate"]["dtype"]


class SourceModel:
    """An MoE model folder whose experts are streamed from its own files: what the loader and
    the expert engine ask of a `Bundle`, with `pieces` for `PieceReader`."""

    kind = "source"
    selection = {"default": None, "modes": {}}

    def __init__(self, folder: Path, index_path: Path, progress: bool = False):
        self.path = folder
        self.index_path = index_path
        config = read_json(folder / "config.json", SourceError)
        if not isinstance(config, dict):
            raise SourceError(f"{folder / 'config.json'} is not a JSON object")
        gen = folder / "generation_config.json"
        if gen.is_file():  # as mlx-lm's load_config
            generation = read_json(gen, SourceError)
            if isinstance(generation, dict) and generation.get("eos_token_id"):
                config["eos_token_id"] = generation["eos_token_id"]
        if config.get("quantization_config") and not config.get("quantization"):
            raise SourceError(f"{folder}: its quantization_config is a quantization "
                              "mlx_flash does not read (mlx-lm folders' own only)")
        check_moe_config(config)
        self.config = config
        self.files = weight_files(folder)
        self.index, self.indexed = open_index(
            index_path, lambda index: index_is_fresh(index, folder, config, self.files),
            lambda: build_index(folder, config, self.files), folder.name, progress)
        self.dtype = source_dtype(config, self.index)
        self._lay_out()

    def _lay_out(self) -> None:
        """The expert family (as the slots hold it) and the pieces, from the index."""
        index, config, folder = self.index, self.config, self.path
        quantization = {t: Quantization(q["bits"], q["group_size"])
                        for t, q in index["quantization"].items()}
        first = index["layers"][min(index["layers"], key=int)]
        shapes = {t: self._shape(first, t, quantization) for t in TENSORS}
        parts, record_bytes = expert_layout(shapes, self.dtype, quantization)
        count = int(index["count"])
        n_layers = int(config["num_hidden_layers"])
        segments = tuple((0, count * record_bytes) if str(i) in index["layers"] else (0, 0)
                         for i in range(n_layers))
        self.families = {EXPERTS: RecordFamily(EXPERTS, SOURCE_FILE, count, record_bytes,
                                               self.dtype, parts, segments, quantization)}
        # per layer, per part: (file of each expert, offset of each, bytes, stored dtype)
        self.pieces: dict[int, dict[str, tuple[np.ndarray, np.ndarray, int, str]]] = {
            int(layer): {part: (np.asarray(e["file"], dtype=np.int32),
                                np.asarray(e["offset"], dtype=np.int64), int(e["bytes"]),
                                e["dtype"]) for part, e in entry.items()}
            for layer, entry in index["layers"].items()}
        for layer, entry in self.pieces.items():
            for part, (_, _, nbytes, dtype) in entry.items():
                p = self.families[EXPERTS].part(part)
                if dtype in ITEMSIZE and nbytes != p.length * ITEMSIZE[dtype]:
                    raise SourceError(f"{folder}: layer {layer}'s {part} experts hold {nbytes} "
                                      f"bytes, the model's {p.length} elements of {dtype} take "
                                      f"{p.length * ITEMSIZE[dtype]}")

    @staticmethod
    def _shape(entry: dict[str, Any], t: str, quantization: dict[str, Quantization]
               ) -> tuple[int, int]:
        rows, cols = entry[t]["shape"]
        q = quantization.get(t)
        return (rows, cols * 32 // q.bits) if q else (rows, cols)

    @property
    def tokenizer_path(self) -> Path:
        return self.path

    @property
    def ffn_bytes(self) -> int:
        """Bytes of the routed experts, as the source stores them."""
        return sum(nbytes * len(offsets) for entry in self.pieces.values()
                   for _, offsets, nbytes, _ in entry.values())

    @property
    def stage_bytes(self) -> int:
        """Working memory for the pieces converted on admission: those of the experts one
        token routes to (`PieceReader` admits at most that many at a time)."""
        fam = self.families[EXPERTS]
        k = int(self.config["num_experts_per_tok"])
        per_expert = max((sum(nbytes for part, (_, _, nbytes, dtype) in entry.items()
                              if dtype != fam.part(part).dtype)
                          for entry in self.pieces.values()), default=0)
        return k * per_expert

    def _resident_names(self) -> dict[str, tuple[Path, str, list[int]]]:
        experts = set(self.index["expert_tensors"])
        out = {}
        for f in self.files:
            header, _, _ = read_header(f)
            for name, e in header.items():
                if name not in experts:
                    out[name] = (f, e["dtype"], e["shape"])
        return out

    def loaded_resident_bytes(self, itemsize: int) -> int:
        """Memory the resident weights take once loaded: floats in the compute dtype, the
        rest (quantized words) as stored (`memory.loaded_bytes` for a bundle)."""
        from .bundle import SAFETENSORS_ITEMSIZE

        total = 0
        for _, dtype, shape in self._resident_names().values():
            n = math.prod(shape)
            total += n * itemsize if dtype in ("F32", "F16", "BF16") \
                else n * SAFETENSORS_ITEMSIZE[dtype]
        return total

    def load_resident(self) -> dict[str, mx.array]:
        """Every tensor but the routed experts, as mlx-lm loads them (its sanitize applied),
        read lazily: the experts' bytes are never read here."""
        experts = set(self.index["expert_tensors"])
        weights: dict[str, mx.array] = {}
        try:
            for f in self.files:
                weights.update((k, v) for k, v in mx.load(str(f)).items() if k not in experts)
        except (RuntimeError, ValueError) as e:
            raise BundleError(f"cannot read {self.path}: {e}") from None
        try:
            model = build_model(self.config)
        except UnsupportedModel as e:
            raise BundleError(f"{self.path}: {e}") from None
        return model.sanitize(weights) if hasattr(model, "sanitize") else weights

    def verify(self) -> None:
        """Hash every source file (sha256): against the Hub's name for it where it is a
        Hugging Face cache blob, else against the hash recorded at the first verified use
        (recorded now if none was). BundleError naming the first file that differs."""
        changed = False
        for f, known in zip(self.files, self.index["files"], strict=True):
            digest = sha256_file(f)
            expected = hub_sha256(f) or known.get("sha256")
            if expected is not None and digest != expected:
                raise BundleError(f"{f} is corrupt: its sha256 does not match "
                                  f"{'the Hub' if hub_sha256(f) else 'the one recorded'}")
            if known.get("sha256") != digest:
                known["sha256"], changed = digest, True
        if changed:
            write_index(self.index_path, self.index)


def is_streamable(folder: Path) -> bool:
    """Whether `folder` is a model folder whose experts can be streamed in place: a
    config.json naming a supported MoE architecture, and safetensors weights."""
    config = folder / "config.json"
    if not folder.is_dir() or not config.is_file():
        return False
    try:
        value = read_json(config, SourceError)
    except SourceError:
        return False
    return isinstance(value, dict) and value.get("model_type") in MOE_TYPES \
        and any(folder.glob("*.safetensors"))
