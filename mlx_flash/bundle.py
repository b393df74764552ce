"""The flash bundle: one model laid out the way the flash engine reads it.

A bundle is a folder (format documented in docs/FORMAT.md):

    manifest.json           versioned description, checksummed: architecture, config, dtype,
                            every file with its size and sha256, the FFN record layout
    resident.safetensors    weights kept in memory: embeddings, attention, norms, lm_head
    ffn.bin                 FFN records; per (family, layer) one 4096-aligned segment,
                            per neuron one record holding all that neuron's weights
    tokenizer/              tokenizer files as transformers writes them

`BundleWriter` builds one in a temporary sibling folder and renames it into place only when
complete, so a failed conversion leaves nothing behind. `Bundle.open` validates a bundle before
anything reads it and raises `BundleError` with a one-line reason when it is not sound.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from .errors import BundleError

try:  # the CRC32 of writer and readers: zlib's values, with the CPU's CRC instructions
    from zlib_ng.zlib_ng import crc32  # noqa: F401 (docs/FORMAT.md: ~10x zlib 1.2's)
except ImportError:  # pragma: no cover (a dependency; without it, zlib's: slower, the same)
    from zlib import crc32  # noqa: F401

FORMAT = "mlx_flash.bundle"
VERSION = 3
READS = (2, 3)  # versions this reader opens: 2 had float records only, offsets in elements
ALIGNMENT = 4096
MANIFEST = "manifest.json"
RESIDENT_FILE = "resident.safetensors"
FFN_FILE = "ffn.bin"
EXPERTS = "experts"  # the record family of an MoE model's routed experts (mlx_flash.moe)
TOKENIZER_DIR = "tokenizer"

DTYPES: dict[str, mx.Dtype] = {
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
    "float32": mx.float32,
}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "uint32": 4}
PART_DTYPES: dict[str, mx.Dtype] = {**DTYPES, "uint32": mx.uint32}


# Bounds on what a manifest may claim, far past any real model, so that a damaged or hostile
# manifest is refused before anything is sized by it.
MAX_MANIFEST_BYTES = 64 << 20  # the default model's manifest: 3.4 KB (30 layers)
MAX_SIZE = 1 << 48  # bytes, offsets and counts (256 TB)
MAX_RECORD_BYTES = 1 << 30
MAX_ALIGNMENT = 1 << 20
MAX_SAFETENSORS_HEADER = 100 << 20  # as the safetensors library's own limit
CHECKSUM = "crc32"  # per-record checksums (docs/FORMAT.md), stored after each segment


def read_json(path: Path, error: type[Exception], limit: int = MAX_MANIFEST_BYTES) -> Any:
    """The JSON value in `path`, or `error` with a one-line reason when the file cannot be
    read, is larger than `limit` bytes (read no further: a hostile file may be huge), is not
    UTF-8 JSON, or nests deeper than the parser's recursion limit."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise error(f"{path} is larger than {limit >> 20} MB: not a file of ours to read")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError are too
        raise error(f"{path} is not valid JSON: {e}") from None


def whole(value: Any, what: str, low: int = 0, high: int = MAX_SIZE,
          error: type[Exception] = BundleError) -> int:
    """`value` if it is an integer in [low, high] (JSON's 1e9, true or Infinity are not)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        bounds = f"at least {low}" if high >= 1 << 62 else f"from {low} to {high}"
        raise error(f"{what} must be an integer {bounds}, not {value!r:.40}")
    return value


def _of(value: Any, kind: type, what: str) -> Any:
    """`value` if it is a `kind` (dict, list, str), else a BundleError naming `what`."""
    if not isinstance(value, kind):
        raise BundleError(f"manifest: {what} must be a JSON {kind.__name__}, not {value!r:.40}")
    return value


@dataclass(frozen=True)
class RecordPart:
    """One tensor row inside a record: `length` elements of `dtype`, `offset` bytes from the
    record's start."""

    name: str
    offset: int
    length: int
    dtype: str

    @property
    def nbytes(self) -> int:
        return self.length * ITEMSIZE[self.dtype]


def quantized_parts(tensor: str) -> tuple[str, str, str]:
    """The record parts a quantized tensor is stored in: packed words, scales, biases."""
    return tensor, f"{tensor}.scales", f"{tensor}.biases"


@dataclass(frozen=True)
class Quantization:
    """MLX affine quantization of a part along its row: `w = scales * q + biases` per group of
    `group_size` elements; the packed `q` is the part itself (uint32 words), the scales and
    biases are the parts `<name>.scales` and `<name>.biases`."""

    bits: int
    group_size: int


@dataclass(frozen=True)
class RecordFamily:
    """Records of one kind (e.g. one per FFN neuron), one segment of them per layer.

    Every record of a family has the same layout: `record_bytes` bytes holding the `parts` at
    fixed offsets (the rest is padding). `dtype` is the float dtype of its float parts; a
    tensor listed in `quantization` is stored quantized (three parts: packed, scales, biases).
    """

    name: str
    file: str
    count: int
    record_bytes: int
    dtype: str
    parts: tuple[RecordPart, ...]
    segments: tuple[tuple[int, int], ...]
    quantization: dict[str, Quantization] = field(default_factory=dict)
    checksums: str | None = None  # CHECKSUM: each segment is followed by its records' CRC32s
    # per layer, the seal of its checksums (`table_digest`; None: an empty segment), or None
    tables: tuple[str | None, ...] | None = None

    @property
    def layers(self) -> int:
        return len(self.segments)

    @property
    def tensors(self) -> tuple[str, ...]:
        """The record's tensors (a quantized one's scales and biases are parts of it)."""
        return tuple(p.name for p in self.parts if not p.name.endswith((".scales", ".biases")))

    def expand(self, tensors: Iterable[str]) -> list[str]:
        """The parts that hold `tensors`."""
        out = []
        for t in tensors:
            out += quantized_parts(t) if t in self.quantization else [t]
        return out

    def part(self, name: str) -> RecordPart:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(f"record family {self.name!r} has no part {name!r}")

    def part_span(self, names: Iterable[str]) -> tuple[int, int]:
        """Byte range `[start, end)` of the smallest record range covering parts `names`."""
        ps = [self.part(n) for n in names]
        return min(p.offset for p in ps), max(p.offset + p.nbytes for p in ps)

    def tensor_bytes(self, tensors: Iterable[str]) -> int:
        """Bytes of `tensors` in one record (scales and biases included)."""
        return sum(self.part(p).nbytes for p in self.expand(tensors))

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "file": self.file,
            "count": self.count,
            "record_bytes": self.record_bytes,
            "dtype": self.dtype,
            "parts": [{"name": p.name, "offset": p.offset, "length": p.length,
                       "dtype": p.dtype} for p in self.parts],
            "segments": [list(s) for s in self.segments],
        }
        if self.quantization:
            d["quantization"] = {k: {"bits": q.bits, "group_size": q.group_size}
                                 for k, q in self.quantization.items()}
        if self.checksums:
            d["checksums"] = self.checksums
        if self.tables is not None:
            d["tables"] = list(self.tables)
        return d

    @classmethod
    def from_json(cls, name: str, d: Any) -> RecordFamily:
        """The family manifest entry `d` describes; BundleError when an entry is missing or
        of the wrong type (its consistency is `Bundle.open`'s to check)."""
        what = f"record family {name!r}"
        d = _of(d, dict, what)
        dtype = _of(d["dtype"], str, f"{what} dtype")
        if dtype not in DTYPES:
            raise BundleError(f"{what} has an unknown dtype {dtype!r}")
        stride = "stride" in d  # version 2: float parts of the family's dtype, in elements
        scale = ITEMSIZE[dtype] if stride else 1
        parts = []
        for p in _of(d["parts"], list, f"{what} parts"):
            p = _of(p, dict, f"{what} part")
            part_dtype = dtype if stride else _of(p["dtype"], str, f"{what} part dtype")
            if part_dtype not in PART_DTYPES:
                raise BundleError(f"{what} has a part of unknown dtype {part_dtype!r}")
            parts.append(RecordPart(_of(p["name"], str, f"{what} part name"),
                                    whole(p["offset"], f"{what} part offset") * scale,
                                    whole(p["length"], f"{what} part length", 1), part_dtype))
        segments = []
        for s in _of(d["segments"], list, f"{what} segments"):
            if not isinstance(s, list) or len(s) != 2:
                raise BundleError(f"manifest: a segment of {what} is not [offset, length]")
            segments.append((whole(s[0], f"{what} segment offset"),
                             whole(s[1], f"{what} segment length")))
        quantization = {}
        for t, q in _of(d.get("quantization", {}), dict, f"{what} quantization").items():
            q = _of(q, dict, f"{what} quantization of {t}")
            quantization[t] = Quantization(whole(q["bits"], f"{t} bits", 1, 8),
                                           whole(q["group_size"], f"{t} group size", 1, 1 << 16))
        checksums = d.get("checksums")
        if checksums not in (None, CHECKSUM):
            raise BundleError(f"{what} has checksums of unknown kind {checksums!r}")
        tables = d.get("tables") if checksums else None  # seals of no checksums: nothing
        if tables is not None:
            tables = tuple(_of(tables, list, f"{what} tables"))
            if len(tables) != len(segments) or not all(
                    t is None or isinstance(t, str) and len(t) == 64 for t in tables):
                raise BundleError(f"manifest: {what} tables must be one sha256 per segment")
        return cls(name, _of(d["file"], str, f"{what} file"),
                   whole(d["count"], f"{what} count", 1),
                   whole(d["stride" if stride else "record_bytes"], f"{what} record size", 1,
                         MAX_RECORD_BYTES) * scale,
                   dtype, tuple(parts), tuple(segments), quantization, checksums, tables)


def table_digest(family: RecordFamily, layer: int, table: bytes) -> str:
    """The seal of a segment's checksums (`table`: its bytes), in the manifest: it binds each
    record's checksum to its id, its layer and what its bytes mean (docs/FORMAT.md)."""
    layout = {k: v for k, v in family.to_json().items() if k not in ("file", "segments",
                                                                      "tables")}
    key = json.dumps({"family": family.name, "layer": layer, "layout": layout}, sort_keys=True,
                     separators=(",", ":"))
    return hashlib.sha256(key.encode() + b"\0" + bytes(table)).hexdigest()


def layout_parts(parts: Iterable[tuple[str, int, str]], align: int = 16
                 ) -> tuple[tuple[RecordPart, ...], int]:
    """Lay `(name, length, dtype)` parts out one after another, each at an offset that is a
    multiple of its item size; the record is padded to `align` bytes so rows stay aligned."""
    out, offset = [], 0
    for name, length, dtype in parts:
        size = ITEMSIZE[dtype]
        offset = -(-offset // size) * size
        out.append(RecordPart(name, offset, length, dtype))
        offset += length * size
    return tuple(out), -(-offset // align) * align


def sha256_file(path: Path) -> str:
    return file_digests(path, crc=False)[0]


def file_digests(path: Path, chunk: int = 1 << 22, sha: bool = True, crc: bool = True
                 ) -> tuple[str, int]:
    """(sha256 hex, CRC32) of a file's bytes, in one pass (either skipped: "", 0)."""
    h, c = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if sha:
                h.update(block)
            if crc:
                c = crc32(block, c)
    return h.hexdigest() if sha else "", c


def manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _safe_member(root: Path, name: str) -> Path:
    """The path of bundle member `name`, refusing names that leave the bundle folder."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name:
        raise BundleError(f"manifest names a file outside the bundle: {name!r}")
    parts = Path(name).parts
    if any(p in ("..", ".") for p in parts):
        raise BundleError(f"manifest names a file outside the bundle: {name!r}")
    path = root / name
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        raise BundleError(f"manifest names a file outside the bundle: {name!r}") from None
    return path


class Bundle:
    """A validated bundle on disk. Open with `Bundle.open(path)`."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        families = _of(_of(manifest["ffn"], dict, "ffn")["families"], dict, "ffn families")
        self.families = {name: RecordFamily.from_json(name, d) for name, d in families.items()}

    @property
    def architecture(self) -> str:
        return self.manifest["architecture"]

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    def family_path(self, family: str) -> Path:
        return self.path / self.families[family].file

    @property
    def ffn_path(self) -> Path:
        """The file of the neuron records."""
        return self.family_path("neuron")

    @property
    def resident_path(self) -> Path:
        return self.path / self.manifest["resident"]["file"]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest["tokenizer"]["dir"]

    def file_bytes(self, name: str) -> int:
        return int(self.manifest["files"][name]["bytes"])

    @property
    def resident_bytes(self) -> int:
        return self.file_bytes(self.manifest["resident"]["file"])

    @property
    def ffn_bytes(self) -> int:
        """Bytes of the FFN's neuron (or routed experts') records (alignment padding
        excluded)."""
        return sum(n for _, n in (self.families.get("neuron") or self.families[EXPERTS]).segments)

    @property
    def selection(self) -> dict[str, Any]:
        """Calibrated selection modes: {"default": name or None, "modes": {name: {...}}}."""
        return self.manifest.get("selection") or {"default": None, "modes": {}}

    def load_resident(self) -> dict[str, mx.array]:
        """The resident weights, checked first (`check_file`)."""
        self.check_file(self.manifest["resident"]["file"])
        try:  # its header was checked at open: this fails only if the file changed since
            return mx.load(str(self.resident_path))
        except (RuntimeError, ValueError) as e:
            raise BundleError(f"cannot read {self.resident_path}: {e}") from None

    def check_file(self, name: str) -> None:
        """Check bundle file `name` (read whole at load) against its CRC32 in the manifest,
        where it has one (older bundles do not); BundleError if it differs."""
        expected = self.manifest["files"][name].get("crc32")
        if expected is not None and file_digests(self.path / name, sha=False)[1] != expected:
            raise BundleError(f"bundle file {name} is damaged: its CRC32 does not match the "
                              "manifest (convert the model again)")

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = False) -> Bundle:
        """Validate and open the bundle at `path`; `verify` also checks every file's sha256."""
        root = Path(path)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"{root} is not a flash bundle (no {MANIFEST})")
        # An update (BundleUpdate) replaces the manifest in one rename and then deletes the
        # files only the old one named: a file found missing under a manifest that has been
        # replaced meanwhile is checked again under the new one.
        for attempt in range(3):
            before = _identity(manifest_path)
            try:
                return cls._open(root, verify)
            except BundleError:
                if attempt == 2 or _identity(manifest_path) == before:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _open(cls, root: Path, verify: bool) -> Bundle:
        manifest_path = root / MANIFEST
        manifest = read_json(manifest_path, BundleError)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"{manifest_path} is not an mlx_flash bundle manifest")
        version = manifest.get("version")
        if isinstance(version, bool) or version not in READS:
            raise BundleError(
                f"bundle format version {version!r} is not supported (this mlx_flash reads "
                f"versions {', '.join(map(str, READS))}); convert the model again"
            )
        if manifest.get("manifest_sha256") != manifest_digest(manifest):
            raise BundleError(f"{manifest_path} was altered: its checksum does not match")
        try:
            bundle = cls(root, manifest)
            bundle._validate(verify)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
            # what the explicit checks did not foresee is still a one-line error
            raise BundleError(f"{manifest_path} is malformed: {type(e).__name__}: {e}") from None
        return bundle

    def _validate(self, verify: bool) -> None:
        m = self.manifest
        if _of(m["dtype"], str, "dtype") not in DTYPES:
            raise BundleError(f"unsupported bundle dtype {m['dtype']!r}")
        files: dict[str, Any] = _of(m["files"], dict, "files")
        for name, info in files.items():
            expected = whole(_of(info, dict, f"entry of {name}")["bytes"], f"size of {name}")
            if "crc32" in info:
                whole(info["crc32"], f"CRC32 of {name}", 0, 2**32 - 1)
            path = _safe_member(self.path, name)
            if not path.is_file():
                raise BundleError(f"bundle file {name} is missing")
            size = path.stat().st_size
            if size != expected:
                what = "truncated" if size < expected else "larger than recorded"
                raise BundleError(
                    f"bundle file {name} is {what}: {size} bytes, manifest says {expected}")
            if verify and sha256_file(path) != info["sha256"]:
                raise BundleError(f"bundle file {name} is corrupt: sha256 does not match")
        _safe_member(self.path, _of(m["tokenizer"], dict, "tokenizer")["dir"])
        config = _of(m["config"], dict, "config")
        n_layers = whole(config.get("num_hidden_layers"), "config num_hidden_layers", 1)
        self._validate_selection(n_layers)
        for name in referenced_files(m):
            if name not in files:
                raise BundleError(f"manifest does not list {name} among its files")
        if "neuron" not in self.families and EXPERTS not in self.families:
            raise BundleError("bundle has no neuron or expert records")
        align = whole(m["ffn"]["alignment"], "ffn alignment", 1, MAX_ALIGNMENT)
        if align & (align - 1):
            raise BundleError(f"ffn alignment {align} is not a power of two")
        extents: dict[str, list[tuple[int, int, str]]] = {}  # per file: what lies where
        for fam in self.families.values():
            self._validate_family(fam, n_layers, align, files[fam.file]["bytes"], extents)
        for file, spans in extents.items():
            spans.sort()
            for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
                if start < end:
                    raise BundleError(f"segments {a} and {b} overlap in {file}")
        for name in self._safetensors():
            try:
                check_safetensors(self.path / name)
            except ValueError as e:
                raise BundleError(f"bundle file {e}") from None

    @staticmethod
    def _validate_family(fam: RecordFamily, n_layers: int, align: int, file_size: int,
                         extents: dict[str, list[tuple[int, int, str]]]) -> None:
        """Check one record family against its file (`file_size` bytes), recording the byte
        ranges its segments take in `extents`."""
        position = 0
        for p in sorted(fam.parts, key=lambda p: p.offset):
            if p.offset % ITEMSIZE[p.dtype] or p.offset < position \
                    or p.offset + p.nbytes > fam.record_bytes:
                raise BundleError(f"record part {fam.name}.{p.name} lies outside its record, "
                                  "over another part, or off its item size")
            position = p.offset + p.nbytes
        for t, q in fam.quantization.items():
            packed, scales, _ = (fam.part(n) for n in quantized_parts(t))
            if packed.dtype != "uint32" or q.bits not in (2, 3, 4, 5, 6, 8) \
                    or scales.length * q.group_size != packed.length * 32 // q.bits:
                raise BundleError(f"quantized part {fam.name}.{t} is inconsistent")
        if fam.layers != n_layers:
            raise BundleError(
                f"record family {fam.name!r} has {fam.layers} segments for {n_layers} layers")
        table = 4 * fam.count if fam.checksums else 0
        for layer, (offset, length) in enumerate(fam.segments):
            if fam.name == EXPERTS and (offset, length) == (0, 0):
                continue  # a layer without routed experts (its FFN is resident)
            if offset % align or length != fam.count * fam.record_bytes:
                raise BundleError(f"segment {fam.name}[{layer}] is misaligned or mis-sized")
            if offset + length + table > file_size:
                raise BundleError(f"segment {fam.name}[{layer}] runs past the end of {fam.file}")
            extents.setdefault(fam.file, []).append(
                (offset, offset + length + table, f"{fam.name}[{layer}]"))

    def _validate_selection(self, n_layers: int) -> None:
        """The calibrated modes: what `selection.load_mode` reads, of the types it expects."""
        sel = self.manifest.get("selection")
        if sel is None:
            return
        modes = _of(_of(sel, dict, "selection").get("modes", {}), dict, "selection modes")
        if sel.get("default") is not None and sel["default"] not in modes:
            raise BundleError(f"selection default {sel['default']!r} is not a calibrated mode")
        for name, mode in modes.items():
            what = f"selection mode {name!r}"
            if "file" in _of(mode, dict, what):
                _of(mode["file"], str, f"{what} file")
            layers = _of(mode.get("layers"), list, f"{what} layers")
            if len(layers) != n_layers:
                raise BundleError(f"{what} has {len(layers)} layers for {n_layers}")
            for layer in layers:
                for key, value in _of(layer, dict, f"{what} layer").items():
                    if isinstance(value, bool) or not isinstance(value, (int, float)):
                        raise BundleError(f"{what}: {key} must be a number, not {value!r:.40}")
            if mode.get("gate_quantization") is not None:
                q = _of(mode["gate_quantization"], dict, f"{what} gate_quantization")
                whole(q["bits"], f"{what} gate bits", 1, 8)
                whole(q["group_size"], f"{what} gate group size", 1, 1 << 16)

    def _safetensors(self) -> list[str]:
        """The bundle's safetensors files: the resident weights and the selection modes'."""
        return sorted(n for n in referenced_files(self.manifest) if n.endswith(".safetensors"))


def _identity(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is replaced (inode, mtime, size); None if it is gone."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


# Item sizes of safetensors dtypes (the safetensors format's list).
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2,
                        "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8,
                        "U64": 8, "F64": 8, "C64": 8}


def check_safetensors(path: Path) -> None:
    """Check a safetensors file before MLX reads it: its header fits in the file and is JSON,
    and every tensor's bytes (its dtype times its shape) lie inside the data, apart from the
    others. MLX takes the header at its word: a header claiming 8 GB is allocated, offsets
    past the end surface as raw RuntimeErrors. Raises ValueError with a one-line reason that
    starts with the file's name."""
    name = path.name
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = int.from_bytes(head, "little")
            if len(head) < 8 or n > min(size - 8, MAX_SAFETENSORS_HEADER):
                raise ValueError(f"{name} is not a sound safetensors file: its header claims "
                                 f"{n} bytes of {size}")
            raw = f.read(n)
    except OSError as e:
        raise ValueError(f"{name} cannot be read: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{name} has a safetensors header that is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{name} has a safetensors header that is not a JSON object")
    data = size - 8 - n
    spans = []
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        try:
            itemsize = SAFETENSORS_ITEMSIZE[info["dtype"]]
            shape = [whole(d, "a dimension", error=ValueError) for d in info["shape"]]
            begin, end = (whole(o, "an offset", error=ValueError) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{name}: tensor {tensor!r} is malformed: {e}") from None
        if not begin <= end <= data:
            raise ValueError(f"{name}: tensor {tensor!r} runs past the end of the file")
        if end - begin != math.prod(shape) * itemsize:
            raise ValueError(f"{name}: tensor {tensor!r} holds {end - begin} bytes, its dtype "
                             f"and shape {shape} take {math.prod(shape) * itemsize}")
        spans.append((begin, end, tensor))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise ValueError(f"{name}: tensors {a!r} and {b!r} overlap")


def referenced_files(manifest: dict[str, Any]) -> set[str]:
    """Files the manifest's sections name (tokenizer files aside)."""
    names = {manifest["resident"]["file"]}
    names |= {f["file"] for f in manifest["ffn"]["families"].values()}
    selection = manifest.get("selection") or {}
    names |= {m["file"] for m in selection.get("modes", {}).values() if m.get("file")}
    return names


