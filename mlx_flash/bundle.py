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
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

FORMAT = "mlx_flash.bundle"
VERSION = 3
READS = (2, 3)  # versions this reader opens: 2 had float records only, offsets in elements
ALIGNMENT = 4096
MANIFEST = "manifest.json"
RESIDENT_FILE = "resident.safetensors"
FFN_FILE = "ffn.bin"
TOKENIZER_DIR = "tokenizer"

DTYPES: dict[str, mx.Dtype] = {
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
    "float32": mx.float32,
}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "uint32": 4}
PART_DTYPES: dict[str, mx.Dtype] = {**DTYPES, "uint32": mx.uint32}


class BundleError(Exception):
    """A bundle is missing, incomplete, altered, or of an unsupported version."""


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
        return d

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> RecordFamily:
        dtype = str(d["dtype"])
        if "stride" in d:  # version 2: float parts of the family's dtype, offsets in elements
            size = ITEMSIZE[dtype]
            return cls(name, str(d["file"]), int(d["count"]), int(d["stride"]) * size, dtype,
                       tuple(RecordPart(str(p["name"]), int(p["offset"]) * size,
                                        int(p["length"]), dtype) for p in d["parts"]),
                       tuple((int(o), int(n)) for o, n in d["segments"]))
        return cls(
            name=name,
            file=str(d["file"]),
            count=int(d["count"]),
            record_bytes=int(d["record_bytes"]),
            dtype=dtype,
            parts=tuple(RecordPart(str(p["name"]), int(p["offset"]), int(p["length"]),
                                   str(p["dtype"])) for p in d["parts"]),
            segments=tuple((int(o), int(n)) for o, n in d["segments"]),
            quantization={k: Quantization(int(q["bits"]), int(q["group_size"]))
                          for k, q in d.get("quantization", {}).items()},
        )


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


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _manifest_digest(manifest: dict[str, Any]) -> str:
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
        self.families = {
            name: RecordFamily.from_json(name, d)
            for name, d in manifest["ffn"]["families"].items()
        }

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
        """Bytes of the FFN's neuron records (alignment padding excluded)."""
        return sum(n for _, n in self.families["neuron"].segments)

    @property
    def selection(self) -> dict[str, Any]:
        """Calibrated selection modes: {"default": name or None, "modes": {name: {...}}}."""
        return self.manifest.get("selection") or {"default": None, "modes": {}}

    def load_resident(self) -> dict[str, mx.array]:
        return mx.load(str(self.resident_path))

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = False) -> Bundle:
        """Validate and open the bundle at `path`; `verify` also checks every file's sha256."""
        root = Path(path)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"{root} is not a flash bundle (no {MANIFEST})")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{manifest_path} is not valid JSON: {e}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"{manifest_path} is not an mlx_flash bundle manifest")
        version = manifest.get("version")
        if version not in READS:
            raise BundleError(
                f"bundle format version {version!r} is not supported (this mlx_flash reads "
                f"versions {', '.join(map(str, READS))}); convert the model again"
            )
        if manifest.get("manifest_sha256") != _manifest_digest(manifest):
            raise BundleError(f"{manifest_path} was altered: its checksum does not match")
        try:
            bundle = cls(root, manifest)
            bundle._validate(verify)
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{manifest_path} is malformed: {type(e).__name__}: {e}") from None
        return bundle

    def _validate(self, verify: bool) -> None:
        m = self.manifest
        if m["dtype"] not in DTYPES:
            raise BundleError(f"unsupported bundle dtype {m['dtype']!r}")
        files: dict[str, Any] = m["files"]
        for name, info in files.items():
            path = _safe_member(self.path, name)
            if not path.is_file():
                raise BundleError(f"bundle file {name} is missing")
            size = path.stat().st_size
            if size != int(info["bytes"]):
                what = "truncated" if size < int(info["bytes"]) else "larger than recorded"
                raise BundleError(
                    f"bundle file {name} is {what}: {size} bytes, manifest says {info['bytes']}"
                )
            if verify and sha256_file(path) != info["sha256"]:
                raise BundleError(f"bundle file {name} is corrupt: sha256 does not match")
        for name in referenced_files(m):
            if name not in files:
                raise BundleError(f"manifest does not list {name} among its files")
        _safe_member(self.path, m["tokenizer"]["dir"])
        if "neuron" not in self.families:
            raise BundleError("bundle has no neuron records")
        n_layers = int(self.config["num_hidden_layers"])
        align = int(m["ffn"]["alignment"])
        for fam in self.families.values():
            file_size = int(files[fam.file]["bytes"])
            if fam.dtype not in DTYPES or fam.count <= 0 or fam.record_bytes <= 0:
                raise BundleError(f"record family {fam.name!r} has an invalid layout")
            for p in fam.parts:
                if p.dtype not in PART_DTYPES or p.offset < 0 or p.length <= 0 \
                        or p.offset + p.nbytes > fam.record_bytes:
                    raise BundleError(f"record part {fam.name}.{p.name} lies outside its record")
            for t, q in fam.quantization.items():
                p = fam.part(t)
                if p.dtype != "uint32" or q.bits not in (2, 3, 4, 5, 6, 8) \
                        or fam.part(quantized_parts(t)[1]).length * q.group_size \
                        != p.length * 32 // q.bits:
                    raise BundleError(f"quantized part {fam.name}.{t} is inconsistent")
            if fam.layers != n_layers:
                raise BundleError(
                    f"record family {fam.name!r} has {fam.layers} segments for {n_layers} layers"
                )
            for layer, (offset, length) in enumerate(fam.segments):
                if offset % align or length != fam.count * fam.record_bytes:
                    raise BundleError(f"segment {fam.name}[{layer}] is misaligned or mis-sized")
                if offset + length > file_size:
                    raise BundleError(f"segment {fam.name}[{layer}] runs past the end of "
                                      f"{fam.file}")


def referenced_files(manifest: dict[str, Any]) -> set[str]:
    """Files the manifest's sections name (tokenizer files aside)."""
    names = {manifest["resident"]["file"]}
    names |= {f["file"] for f in manifest["ffn"]["families"].values()}
    selection = manifest.get("selection") or {}
    names |= {m["file"] for m in selection.get("modes", {}).values() if m.get("file")}
    return names


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Seal `manifest` and replace folder/manifest.json with it in one atomic step."""
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    tmp = folder / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)


def file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


class SegmentFile:
    """Appends per-layer record segments to a file, each at an ALIGNMENT-aligned offset."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb")  # noqa: SIM115 (closed by close(), also on errors)

    def write(self, records: mx.array) -> tuple[int, int]:
        """Write `records` (`[count, record_bytes]` uint8); returns (offset, length) in bytes."""
        data = _raw_bytes(records)
        offset = self._f.tell()
        pad = -offset % ALIGNMENT
        self._f.write(b"\0" * pad)
        self._f.write(data)
        return offset + pad, len(data)

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out`, removed on exit unless `publish_dir` moved it."""
    if out.exists():
        raise FileExistsError(f"{out} already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a bundle is an ordinary folder
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, out: Path) -> None:
    """Move a finished staging folder to `out` in one rename (atomic on one filesystem)."""
    try:
        os.rename(tmp, out)
    except OSError:
        if out.exists():
            raise FileExistsError(f"{out} already exists") from None
        raise


class BundleWriter:
    """Writes a bundle into a temporary sibling folder; `commit()` renames it into place.

    Use as a context manager: an exception inside the block removes the temporary folder, so a
    failed conversion never leaves a partial bundle at `out`.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        *,
        architecture: str,
        config: dict[str, Any],
        dtype: str,
        source: dict[str, Any],
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
        self.out = Path(out)
        self._stack = ExitStack()
        self.tmp = self._stack.enter_context(staging_dir(self.out))
        self.tokenizer_dir = self.tmp / TOKENIZER_DIR
        self.tokenizer_dir.mkdir()
        self.architecture, self.config = architecture, config
        self.dtype, self.source = dtype, source
        self._resident: dict[str, mx.array] = {}
        self._ffn = SegmentFile(self.tmp / FFN_FILE)
        self._stack.callback(self._ffn.close)  # before the staging folder is removed
        self._families: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stack.__exit__(exc_type, exc, tb)

    def add_resident(self, name: str, array: mx.array) -> None:
        self._resident[name] = array.astype(DTYPES[self.dtype]) if mx.issubdtype(
            array.dtype, mx.floating) else array

    def add_family(self, name: str, count: int, parts: Iterable[RecordPart], record_bytes: int,
                   quantization: dict[str, Quantization] | None = None) -> None:
        n_layers = int(self.config["num_hidden_layers"])
        self._families[name] = {"count": count, "record_bytes": record_bytes,
                                "parts": tuple(parts), "quantization": quantization or {},
                                "segments": [None] * n_layers}

    def write_segment(self, family: str, layer: int, records: mx.array) -> None:
        """Append a layer's records (`[count, record_bytes]` uint8) at an aligned offset."""
        fam = self._families[family]
        if tuple(records.shape) != (fam["count"], fam["record_bytes"]) \
                or records.dtype != mx.uint8:
            raise ValueError(f"{family}[{layer}] records have shape {records.shape}, "
                             f"expected {(fam['count'], fam['record_bytes'])} bytes")
        fam["segments"][layer] = self._ffn.write(records)

    def commit(self) -> Bundle:
        """Finish every file, write the manifest, and move the bundle into place."""
        self._ffn.close()
        families = {}
        for name, fam in self._families.items():
            missing = [i for i, s in enumerate(fam["segments"]) if s is None]
            if missing:
                raise ValueError(f"record family {name!r} lacks layers {missing}")
            families[name] = RecordFamily(name, FFN_FILE, fam["count"], fam["record_bytes"],
                                          self.dtype, fam["parts"], tuple(fam["segments"]),
                                          fam["quantization"]).to_json()
        mx.save_safetensors(str(self.tmp / RESIDENT_FILE), self._resident,
                            metadata={"format": "mlx"})
        self._resident.clear()
        files = {path.relative_to(self.tmp).as_posix(): file_entry(path)
                 for path in sorted(p for p in self.tmp.rglob("*") if p.is_file())}
        from . import __version__

        manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "created_by": f"mlx_flash {__version__}",
            "architecture": self.architecture,
            "config": self.config,
            "dtype": self.dtype,
            "source": self.source,
            "resident": {"file": RESIDENT_FILE},
            "tokenizer": {"dir": TOKENIZER_DIR},
            "ffn": {"alignment": ALIGNMENT, "families": families},
            "files": files,
        }
        write_manifest(self.tmp, manifest)
        publish_dir(self.tmp, self.out)
        return Bundle.open(self.out)


def _raw_bytes(a: mx.array) -> memoryview:
    """The bytes of an MLX array of any dtype (NumPy has no bfloat16, so view as integers)."""
    if a.dtype in (mx.float16, mx.bfloat16):
        a = a.view(mx.uint16)
    mx.eval(a)
    return memoryview(np.ascontiguousarray(np.array(a, copy=False))).cast("B")


class BundleUpdate:
    """Adds files to an existing bundle and changes its manifest in one atomic step.

    New files are written under fresh names; `commit()` records them, replaces the manifest
    (atomically), then deletes files the new manifest no longer names. Interrupted at any point,
    the bundle stays valid: before the manifest is replaced it is the old bundle (plus unlisted
    files that the next update removes), after, the new one.
    """

    def __init__(self, bundle: Bundle):
        import copy

        self.bundle = bundle
        self.manifest: dict[str, Any] = copy.deepcopy(bundle.manifest)
        self._new: list[Path] = []

    def __enter__(self) -> BundleUpdate:
        for stale in self.bundle.path.glob(".new-*"):  # left by an interrupted update
            stale.unlink()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            for path in self._new:
                path.unlink(missing_ok=True)

    def new_file(self, stem: str, suffix: str) -> tuple[Path, str]:
        """(where to write, name to put in the manifest) for a new bundle file; the file is
        staged under a hidden name and takes its name at commit."""
        import secrets

        name = f"{stem}-{secrets.token_hex(4)}{suffix}"
        staging = self.bundle.path / f".new-{name}"
        self._new.append(staging)
        return staging, name

    def commit(self) -> Bundle:
        root = self.bundle.path
        manifest = self.manifest
        for staging in self._new:
            final = root / staging.name[len(".new-"):]
            with open(staging, "rb+") as f:
                os.fsync(f.fileno())
            os.rename(staging, final)
            manifest["files"][final.name] = file_entry(final)
        keep = referenced_files(manifest)
        dropped = [n for n in manifest["files"]
                   if not n.startswith(TOKENIZER_DIR + "/") and n not in keep]
        for name in dropped:
            del manifest["files"][name]
        write_manifest(root, manifest)
        for name in dropped:
            (root / name).unlink(missing_ok=True)
        return Bundle.open(root)
