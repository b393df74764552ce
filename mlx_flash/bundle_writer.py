"""Writing bundles (docs/FORMAT.md): a new one built in a locked staging folder beside its
destination and renamed into place only when complete, so a failed or killed conversion leaves
nothing half-written; an existing one updated (calibration adds selection files) under a lock,
its manifest replaced in one atomic step."""

from __future__ import annotations

import copy
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ._version import __version__
from .bundle import (
    ALIGNMENT,
    CHECKSUM,
    DTYPES,
    FFN_FILE,
    FORMAT,
    MANIFEST,
    RESIDENT_FILE,
    TOKENIZER_DIR,
    VERSION,
    Bundle,
    Quantization,
    RecordFamily,
    RecordPart,
    crc32,
    file_digests,
    manifest_digest,
    read_json,
    referenced_files,
    table_digest,
)
from .errors import BundleError


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Seal `manifest` and replace folder/manifest.json with it in one atomic step."""
    manifest["manifest_sha256"] = manifest_digest(manifest)
    tmp = folder / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    try:  # the rename itself durable; some filesystems cannot sync a folder: best effort
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def file_entry(path: Path) -> dict[str, Any]:
    sha, crc = file_digests(path)
    return {"bytes": path.stat().st_size, "sha256": sha, "crc32": crc}


class SegmentFile:
    """Appends per-layer record segments to a file, each at an ALIGNMENT-aligned offset and
    followed by its records' checksums: one CRC32 per record (of its `record_bytes` bytes,
    padding included), little-endian uint32, in record order (`RecordChecker` reads them)."""

    checksums = CHECKSUM

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb")  # noqa: SIM115 (closed by close(), also on errors)

    def write(self, records: mx.array) -> tuple[int, int]:
        """Write `records` (`[count, record_bytes]` uint8); returns (offset, length) in bytes."""
        data = _raw_bytes(records)
        count, size = records.shape
        offset = self._f.tell()
        pad = -offset % ALIGNMENT
        self._f.write(b"\0" * pad)
        self._f.write(data)
        crcs = [crc32(data[i * size:(i + 1) * size]) for i in range(count)]
        self._f.write(np.array(crcs, dtype="<u4").tobytes())
        return offset + pad, len(data)

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


def seal_tables(folder: Path, families: dict[str, Any], files: Iterable[str]) -> None:
    """Seal the checksums of the families (manifest entries, changed in place) whose records
    lie in `files` (of `folder`, finished) and that have none: each segment's `table_digest`,
    in `tables` (docs/FORMAT.md)."""
    files = set(files)
    for name, entry in families.items():
        fam = RecordFamily.from_json(name, entry)
        if fam.checksums is None or fam.tables is not None or fam.file not in files:
            continue
        tables: list[str | None] = []
        with open(folder / fam.file, "rb") as f:
            for layer, (offset, length) in enumerate(fam.segments):
                if (offset, length) == (0, 0):  # a layer without such records
                    tables.append(None)
                    continue
                raw = os.pread(f.fileno(), 4 * fam.count, offset + length)
                if len(raw) != 4 * fam.count:
                    raise BundleError(f"{fam.file} ends before the checksums of {name}[{layer}]")
                tables.append(table_digest(fam, layer, raw))
        entry["tables"] = tables


# Staging folders are named `.OUT.mlx_flash-staging-XXXXXXXX` beside their destination and
# locked (flock) by the process writing them, from before they take that name until they are
# published or removed: one whose lock is free was left by a process that was killed.
STAGING = "mlx_flash-staging-"


_CREATING = "mlx_flash-new-"


def _lock(path: Path, blocking: bool = True) -> int | None:
    """A descriptor of `path` (a file or folder) holding an exclusive flock on it, or None
    when another holds it and `blocking` is False. The kernel releases the lock when the
    descriptor is closed, or its process ends, however it ends."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_stale_staging(folder: Path) -> list[Path]:
    """Remove the staging folders in `folder` that no live process holds (what killed
    conversions left); returns them. Folders of live conversions are left alone."""
    try:
        stale = [p for p in folder.iterdir() if p.name.startswith(".") and STAGING in p.name]
    except OSError:
        return []
    removed = []
    for path in stale:
        try:
            fd = _lock(path, blocking=False)
        except OSError:  # removed meanwhile, or not a folder we may open
            continue
        if fd is not None:
            try:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            finally:
                os.close(fd)
    return removed


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out`, removed on exit unless `publish_dir` moved it.
    Staging folders that killed processes left beside `out` are removed first."""
    if out.exists():
        raise FileExistsError(f"{out} already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out.parent)
    new = Path(tempfile.mkdtemp(prefix=f".{out.name}.{_CREATING}", dir=out.parent))
    lock = None
    try:
        lock = _lock(new)
        tmp = new.with_name(new.name.replace(_CREATING, STAGING))
        os.rename(new, tmp)  # takes the name stale folders are looked for by, locked
    except BaseException:
        if lock is not None:
            os.close(lock)
        shutil.rmtree(new, ignore_errors=True)
        raise
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a bundle is an ordinary folder
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(lock)


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
                   quantization: dict[str, Quantization] | None = None,
                   every_layer: bool = True) -> None:
        """A record family with a segment in every layer, or (`every_layer` False: routed
        experts, which some layers lack) in those `write_segment` is called for."""
        n_layers = int(self.config["num_hidden_layers"])
        self._families[name] = {"count": count, "record_bytes": record_bytes,
                                "parts": tuple(parts), "quantization": quantization or {},
                                "segments": [None] * n_layers, "every_layer": every_layer}

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
            if not fam["every_layer"]:  # an empty segment: a layer without such records
                fam["segments"] = [s or (0, 0) for s in fam["segments"]]
            elif missing:
                raise ValueError(f"record family {name!r} lacks layers {missing}")
            families[name] = RecordFamily(name, FFN_FILE, fam["count"], fam["record_bytes"],
                                          self.dtype, fam["parts"], tuple(fam["segments"]),
                                          fam["quantization"], self._ffn.checksums).to_json()
        seal_tables(self.tmp, families, [FFN_FILE])
        mx.save_safetensors(str(self.tmp / RESIDENT_FILE), self._resident,
                            metadata={"format": "mlx"})
        self._resident.clear()
        files = {path.relative_to(self.tmp).as_posix(): file_entry(path)
                 for path in sorted(p for p in self.tmp.rglob("*") if p.is_file())}
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


@contextmanager
def bundle_lock(path: Path) -> Iterator[None]:
    """Hold the update lock of the bundle at `path` (an flock on its `.lock` file): updates
    take turns, the next waiting for the current; a killed holder releases it."""
    lock_file = path / LOCK_FILE
    fd = os.open(lock_file, os.O_RDONLY | os.O_CREAT, 0o666)
    os.close(fd)
    fd = _lock(lock_file)
    try:
        yield
    finally:
        os.close(fd)


class BundleUpdate:
    """Adds files to an existing bundle and changes its manifest in one atomic step.

    Updates of one bundle take turns: entering waits for the bundle's lock (`bundle_lock`)
    and then reads the manifest afresh, so that an update committed meanwhile (a concurrent
    calibration) is kept, not overwritten. New files are written under fresh names;
    `commit()` records them, replaces the manifest (atomically), then deletes files the new
    manifest no longer names. Interrupted at any point, the bundle stays valid: before the
    manifest is replaced it is the old bundle (plus unlisted files, which the failed update
    or else the next one removes), after, the new one.
    """

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.manifest: dict[str, Any] = copy.deepcopy(bundle.manifest)
        self._new: list[Path] = []
        self._lock = ExitStack()

    def __enter__(self) -> BundleUpdate:
        self._lock.enter_context(bundle_lock(self.bundle.path))
        try:
            fresh = Bundle.open(self.bundle.path)
            if fresh.config != self.bundle.config \
                    or fresh.families["neuron"] != self.bundle.families["neuron"]:
                raise BundleError(f"{self.bundle.path} was replaced by another model during "
                                  "this update")
            self.bundle, self.manifest = fresh, copy.deepcopy(fresh.manifest)
            self._remove_leftovers()
        except BaseException:
            self._lock.close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                self._remove_leftovers()
        finally:
            self._lock.close()

    def _remove_leftovers(self) -> None:
        """Delete what interrupted updates left: files the manifest on disk does not list
        whose names updates give (run holding the lock: no other update is under way)."""
        root = self.bundle.path
        try:
            listed = set(read_json(root / MANIFEST, BundleError)["files"])
        except (BundleError, KeyError, TypeError):
            return  # no sound manifest to tell leftovers by: remove nothing
        for path in root.iterdir():
            if path.name not in listed and _LEFTOVER.fullmatch(path.name) and path.is_file():
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
        seal_tables(root, manifest["ffn"]["families"],
                    [staging.name[len(".new-"):] for staging in self._new])
        keep = referenced_files(manifest)
        dropped = [n for n in manifest["files"]
                   if not n.startswith(TOKENIZER_DIR + "/") and n not in keep]
        for name in dropped:
            del manifest["files"][name]
        write_manifest(root, manifest)
        for name in dropped:
            (root / name).unlink(missing_ok=True)
        return Bundle.open(root)


def _raw_bytes(a: mx.array) -> memoryview:
    """The bytes of an MLX array of any dtype (NumPy has no bfloat16, so view as integers)."""
    if a.dtype in (mx.float16, mx.bfloat16):
        a = a.view(mx.uint16)
    mx.eval(a)
    return memoryview(np.ascontiguousarray(np.array(a, copy=False))).cast("B")


LOCK_FILE = ".lock"


# What an interrupted update may leave: files staged under hidden names, files renamed to
# names `new_file` gives (STEM-8 hex digits.EXT) before the manifest listed them, a manifest
# being written. Unlisted ones are removed by the next update.
_LEFTOVER = re.compile(r"\.new-.+|.+-[0-9a-f]{8}\.[a-z]+|\." + re.escape(MANIFEST) + r"\.tmp")
