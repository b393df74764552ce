"""Models named as mlx-lm and llama.cpp name them on the Hugging Face Hub.

    org/name             an mlx-lm (Hugging Face) model folder: the files mlx-lm fetches
    org/name@revision    the same at a branch, tag or commit
    org/name:Q4_K_M      a repository of GGUF files: the one file of that quantization, picked
                         as llama.cpp's `-hf org/name:Q4_K_M` picks it (no tag: Q4_K_M, else
                         Q8_0, else the first GGUF in name order); without a tag too, a
                         repository of GGUF files and no model*.safetensors

They resolve through huggingface_hub as mlx-lm's do (`snapshot_download` with mlx-lm's
allow_patterns; `hf_hub_download` of the one GGUF file): its cache (HF_HUB_CACHE, default
HF_HOME/hub) is used for the files it holds, what is missing is downloaded when online, and
with HF_HUB_OFFLINE=1 only the cache is read; online, the Hub is asked which files the
revision has (when it does not answer, the cache is read). An existing path is a path.

This module sits low: it imports the standard library, and huggingface_hub when a name is
resolved (never at import), nothing of mlx_flash.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# mlx_lm.utils.DEFAULT_ALLOW_PATTERNS (mlx-lm 0.32; tests/test_hub.py checks they agree): what
# `mlx_lm.load("org/name")` downloads.
MLX_LM_ALLOW_PATTERNS = ["*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken",
                         "tiktoken.model", "*.txt", "*.jsonl", "*.jinja"]
MLX_LM_WEIGHTS = "model*.safetensors"
# llama.cpp's -hf without a tag (common/download.cpp, find_best_model): these, in this order,
# else the first model GGUF.
DEFAULT_GGUF_TAGS = ("Q4_K_M", "Q8_0")
# GGUF files beside the model that are not one (llama.cpp's gguf_filename_is_model)
_NOT_MODEL = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")
_SPLIT = re.compile(r"^(.+)-([0-9]{5})-of-([0-9]{5})$", re.I)
_COMMIT = re.compile(r"[0-9a-f]{40}")
# org/name, then @revision (a git ref: no ':'), then :tag (llama.cpp's quantization tag)
_HUB_ID = re.compile(r"(?P<repo>[\w.-]{1,96}/[\w.-]{1,96})(?:@(?P<revision>[^\s:@]+))?"
                     r"(?::(?P<tag>[\w.-]+))?")


@dataclass(frozen=True)
class HubId:
    repo: str  # org/name
    revision: str | None  # None: the default branch
    tag: str | None  # a GGUF quantization tag (Q4_K_M), or None

    def __str__(self) -> str:
        return (self.repo + (f"@{self.revision}" if self.revision else "")
                + (f":{self.tag}" if self.tag else ""))


def parse_hub_id(name: str) -> HubId | None:
    """`org/name[@revision][:tag]` split, or None for a string that is not one (by the Hub's
    rules for repository ids: huggingface_hub's validate_repo_id)."""
    m = _HUB_ID.fullmatch(name)
    if m is None:
        return None
    repo = m["repo"]
    if "--" in repo or ".." in repo or repo.endswith(".git") or any(
            not (part[0].isalnum() and part[-1].isalnum()) for part in repo.split("/")):
        return None
    return HubId(repo, m["revision"], m["tag"])


def is_hub_id(name: Any) -> bool:
    """Whether `name` (a string: a Path is a path) reads as a Hub model id and not as an
    existing file or folder."""
    return (isinstance(name, str) and parse_hub_id(name) is not None
            and not Path(name).expanduser().exists())


def snapshot_name(path: Path) -> str | None:
    """The repository's name (`name` of org/name) when `path` is a snapshot folder of the Hub's
    cache (.../models--org--name/snapshots/<commit>), else None."""
    repo = path.parent.parent.name
    if path.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.split("--")[-1]
    return None


# ----------------------------------------------------------------------------- GGUF files

def gguf_split(path: str) -> tuple[str, int, int]:
    """(name without .gguf and split suffix, part, parts) of a GGUF file name: llama.cpp's
    `name-00001-of-00003.gguf` for files split in parts."""
    stem = path[:-len(".gguf")] if path.endswith(".gguf") else path
    m = _SPLIT.match(stem)
    return (m[1], int(m[2]), int(m[3])) if m else (stem, 1, 1)


def is_model_gguf(path: str) -> bool:
    return path.endswith(".gguf") and not any(k in path.rsplit("/", 1)[-1] for k in _NOT_MODEL)


def pick_gguf(files: list[str], tag: str | None) -> str | None:
    """The GGUF file of `files` (repository paths) that llama.cpp's `-hf repo:tag` loads: the
    first (in name order) model GGUF whose path holds the tag followed by '.' or '-' (any
    case), the first part of a split one; without a tag, Q4_K_M, else Q8_0, else the first
    model GGUF. None when there is none. One difference: the tag is whole here (F16 does not
    pick a BF16 file, as llama.cpp's substring search can)."""
    models = [f for f in sorted(files) if is_model_gguf(f) and gguf_split(f)[1] == 1]
    for t in [tag] if tag else DEFAULT_GGUF_TAGS:
        pattern = re.compile(r"(?<![a-z0-9])" + re.escape(t) + r"[.-]", re.I)
        found = next((f for f in models if pattern.search(f)), None)
        if found is not None:
            return found
    return models[0] if models and not tag else None


# ----------------------------------------------------------------------------- resolution

def _cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cached_snapshot(hub: HubId) -> Path | None:
    """The cache's snapshot folder of `hub`'s revision (a commit, or a branch or tag through
    refs/), or None: where huggingface_hub looks when offline."""
    from huggingface_hub.file_download import repo_folder_name

    storage = _cache_dir() / repo_folder_name(repo_id=hub.repo, repo_type="model")
    revision = hub.revision or "main"
    commit = revision if _COMMIT.fullmatch(revision) else None
    if commit is None:
        try:
            commit = (storage / "refs" / revision).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
    folder = storage / "snapshots" / commit
    return folder if commit and folder.is_dir() else None


def _cached_files(hub: HubId) -> list[str] | None:
    folder = _cached_snapshot(hub)
    if folder is None:
        return None
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _not_found(name: str, hub: HubId, error: BaseException | None) -> str:
    """The one line for a name that is neither a path nor a model the Hub's cache holds (nor,
    online, one the Hub has: `error` is what asking it raised)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    head = f"{name} is not a file or folder, and not a model"
    cache = f"in the Hugging Face cache ({_cache_dir()})"
    if _offline():
        return f"{head} {cache} (HF_HUB_OFFLINE=1: nothing is downloaded)"
    if isinstance(error, GatedRepoError):
        return (f"{head} {cache}, and {hub.repo} is gated on the Hugging Face Hub: accept its "
                "terms on huggingface.co, then log in (hf auth login)")
    if isinstance(error, RevisionNotFoundError):
        return (f"{head} {cache}, and {hub.repo} has no revision {hub.revision!r} on the "
                "Hugging Face Hub")
    if isinstance(error, RepositoryNotFoundError):
        return (f"{head} {cache} or on the Hugging Face Hub (for a private one, log in: hf "
                "auth login)")
    return f"{head} {cache}, and the Hugging Face Hub did not answer: {_first_line(error)}"


def _fetch(name: str, why: str | None, download: Any, *args: Any, **kwargs: Any) -> Path:
    """huggingface_hub's `download(*args, **kwargs)` (a path), its failures one line; `why`:
    why only the cache is read (None: the Hub is asked)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(download(*args, **kwargs, **({"local_files_only": True} if why else {})))
    except LocalEntryNotFoundError as e:  # offline or unreachable, and not (all) cached
        raise FileNotFoundError(f"{name}: not (wholly) in the Hugging Face cache "
                                f"({_cache_dir()}), and nothing is downloaded "
                                f"({why or _first_line(e)})") from e
    except Exception as e:
        raise OSError(f"{name}: cannot fetch it from the Hugging Face Hub: "
                      f"{_first_line(e)}") from e


def resolve_hub_model(name: str) -> Path:
    """The local path of the Hub model `name` (see the module's doc): a snapshot folder of
    mlx-lm's files, or the one GGUF file of a GGUF repository. Downloads what the cache misses
    unless offline. FileNotFoundError (one line) when neither the cache nor the Hub has it;
    ValueError when `name` is not a Hub id."""
    hub = parse_hub_id(name)
    if hub is None:
        raise ValueError(f"{name!r} is not a Hugging Face model id (org/name[@revision][:tag])")
    files, why = None, "HF_HUB_OFFLINE=1" if _offline() else None
    if why is None:
        from huggingface_hub import HfApi

        try:  # what the repository holds (the call snapshot_download begins with, which fails
            # fast when the Hub is unreachable: list_repo_files retries for 20 s)
            info = HfApi().model_info(hub.repo, revision=hub.revision)
            files = [s.rfilename for s in info.siblings or []]
        except Exception as e:  # unreachable, unknown, gated: the cache may still hold it
            files = _cached_files(hub)
            if files is None:
                raise FileNotFoundError(_not_found(name, hub, e)) from e
            # what the cache holds, without asking again (hf_hub_download retries for 20 s)
            why = f"the Hugging Face Hub did not answer: {_first_line(e)}"
    else:
        files = _cached_files(hub)
        if files is None:
            raise FileNotFoundError(_not_found(name, hub, None))
    weights = any(fnmatch.fnmatch(f, MLX_LM_WEIGHTS) for f in files)
    if hub.tag is None and (weights or not any(is_model_gguf(f) for f in files)):
        from huggingface_hub import snapshot_download

        folder = _fetch(name, why, snapshot_download, hub.repo, revision=hub.revision,
                        allow_patterns=MLX_LM_ALLOW_PATTERNS)
        if not any(folder.glob(MLX_LM_WEIGHTS)):
            raise FileNotFoundError(f"{name}: {folder} has no {MLX_LM_WEIGHTS} (mlx-lm's weights)"
                                    + (f", and nothing is downloaded ({why})" if why else ""))
        return folder
    chosen = pick_gguf(files, hub.tag)
    if chosen is None:
        ggufs = [f for f in files if f.endswith(".gguf")]
        raise FileNotFoundError(
            f"{name}: {hub.repo} has no GGUF file" + (f" for {hub.tag}" if hub.tag else "")
            + (f" in the Hugging Face cache ({why})" if why else "")
            + (f"; its GGUF files: {', '.join(ggufs)}" if ggufs else ""))
    parts = gguf_split(chosen)[2]
    if parts > 1:
        raise ValueError(f"{name}: {chosen} is the first of {parts} parts, and mlx_flash reads "
                         "one GGUF file: join them first (llama-gguf-split --merge)")
    from huggingface_hub import hf_hub_download

    return _fetch(name, why, hf_hub_download, hub.repo, chosen, revision=hub.revision)
