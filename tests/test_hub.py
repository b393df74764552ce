"""Models named by their Hugging Face Hub id (org/name, org/name@revision, org/repo:Q4_K_M),
resolved as mlx-lm and llama.cpp resolve them, from a Hub cache written here on disk as
huggingface_hub writes it (blobs, snapshots of links to them, refs). Offline: no test touches
the network (HF_HUB_OFFLINE=1; the unreachable Hub is a closed port on this machine)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_models import greedy_logits, write_llama_gguf
from tiny_moe import mlx_lm_model, write_tiny_moe

from mlx_flash.hub import (
    MLX_LM_ALLOW_PATTERNS,
    is_hub_id,
    parse_hub_id,
    pick_gguf,
    resolve_hub_model,
)
from mlx_flash.paths import resolve_bundle

ROOT = Path(__file__).parent.parent
REPO = "mlx-community/tiny-qwen3-moe-4bit"
GGUF_REPO = "org/tiny-GGUF"
COMMIT = "a" * 40
GGUF_COMMIT = "b" * 40
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 40, 41, 42, 43]


def add_to_cache(hub: Path, repo: str, files: list[Path], commit: str) -> Path:
    """`files` as the snapshot `commit` of `repo` in the Hub cache `hub`, the default
    branch's (refs/main), laid out as huggingface_hub lays it out; returns the snapshot."""
    storage = hub / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    for f in files:
        data = f.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """HF_HOME with a cache (hub/) of two models: REPO, a 4-bit qwen3_moe mlx-lm folder, and
    GGUF_REPO, a tiny llama in two quantizations, Q8_0 and Q4_0."""
    src = tmp_path_factory.mktemp("hub_src")
    home = tmp_path_factory.mktemp("hf_home")
    write_tiny_moe(src / "moe", "qwen3_moe", bits=4)
    add_to_cache(home / "hub", REPO, sorted((src / "moe").iterdir()), COMMIT)
    ggufs = []
    for i, qtype in enumerate(("Q8_0", "Q4_0")):
        ggufs.append(src / f"tiny-{qtype}.gguf")
        write_llama_gguf(ggufs[-1], qtype, seed=i)
    add_to_cache(home / "hub", GGUF_REPO, ggufs, GGUF_COMMIT)
    return home


def hub_env(hf_home: Path, flash_home: Path, offline: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HF_ENDPOINT")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1" if offline else "0",
               MLX_FLASH_HOME=str(flash_home))
    return env


@pytest.fixture
def offline(hf_home, tmp_path, monkeypatch) -> Path:
    """This process offline on `hf_home`'s cache, with an empty MLX_FLASH_HOME. huggingface_hub
    reads HF_HOME and HF_HUB_OFFLINE into its constants when imported, and looks at those
    constants on each call: they are set too."""
    from huggingface_hub import constants

    for name, value in hub_env(hf_home, tmp_path / "flash_home").items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home / "hub"


def snapshot(hub: Path, repo: str, commit: str) -> Path:
    return hub / ("models--" + repo.replace("/", "--")) / "snapshots" / commit


def test_the_files_fetched_are_mlx_lm_s():
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    assert MLX_LM_ALLOW_PATTERNS == DEFAULT_ALLOW_PATTERNS


def test_what_reads_as_a_hub_id(tmp_path, monkeypatch):
    for name, repo, revision, tag in (
            ("org/name", "org/name", None, None),
            ("mlx-community/Qwen3-30B-A3B-4bit", "mlx-community/Qwen3-30B-A3B-4bit", None, None),
            ("org/name@v1.0", "org/name", "v1.0", None),
            (f"org/name@{COMMIT}", "org/name", COMMIT, None),
            ("org/name-GGUF:Q4_K_M", "org/name-GGUF", None, "Q4_K_M"),
            ("org/name-GGUF@main:q8_0", "org/name-GGUF", "main", "q8_0")):
        hub = parse_hub_id(name)
        assert (hub.repo, hub.revision, hub.tag) == (repo, revision, tag), name
        assert is_hub_id(name) and str(hub) == name
    for name in ("name", "a/b/c", "./org/name", "/org/name", "~/org/name", "org/na--me",
                 "org/name.git", "org/.name", "org/name:", "org/name@", "org/na me"):
        assert not is_hub_id(name), name
    assert not is_hub_id(Path("org/name"))  # a Path is a path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_hub_id("org/name")  # an existing path is a path


def test_the_gguf_file_a_tag_picks_is_llama_cpp_s():
    files = ["README.md", "m-Q8_0.gguf", "m-Q4_K_S.gguf", "m-Q4_K_M.gguf", "mmproj-F16.gguf",
             "m-BF16.gguf", "m-F16.gguf", "m-IQ4_XS.gguf"]
    assert pick_gguf(files, None) == "m-Q4_K_M.gguf"  # llama.cpp's default
    assert pick_gguf([f for f in files if "Q4_K_M" not in f], None) == "m-Q8_0.gguf"
    assert pick_gguf(["b-Q5_K_M.gguf", "mmproj-F16.gguf", "a-Q6_K.gguf"], None) == "a-Q6_K.gguf"
    assert pick_gguf(files, "q4_k_s") == "m-Q4_K_S.gguf"  # any case
    assert pick_gguf(files, "F16") == "m-F16.gguf"  # a whole tag: not BF16's end
    assert pick_gguf(files, "IQ4_XS") == "m-IQ4_XS.gguf"
    for missing in ("Q4_K", "Q5_0", "Q4_XS"):
        assert pick_gguf(files, missing) is None
    assert pick_gguf(["README.md", "mmproj-Q8_0.gguf"], None) is None
    split = ["Q8_0/m-Q8_0-00002-of-00002.gguf", "Q8_0/m-Q8_0-00001-of-00002.gguf"]
    assert pick_gguf(split, "Q8_0") == split[1]  # a split file's first part


def test_org_name_is_mlx_lm_s_model(offline, tmp_path):
    import mlx_lm.utils

    import mlx_flash

    folder = snapshot(offline, REPO, COMMIT)
    assert resolve_hub_model(REPO) == folder == Path(mlx_lm.utils._download(REPO))
    for name in (f"{REPO}@main", f"{REPO}@{COMMIT}"):
        assert resolve_hub_model(name) == folder
    model, _ = mlx_flash.load(REPO)
    want = greedy_logits(mlx_lm_model(folder), PROMPT, 16)
    assert np.array_equal(greedy_logits(model, PROMPT, 16), want)
    # an MoE folder's experts are read from its own files: only their index is written,
    # named after the model
    assert not (tmp_path / "flash_home" / "bundles").exists()
    indexes = list((tmp_path / "flash_home" / "indexes").iterdir())
    assert len(indexes) == 1 and indexes[0].name.startswith("tiny-qwen3-moe-4bit-")
    # converted (asked for) once into MLX_FLASH_HOME, named after the model; the same files
    # (the same commit, named by a revision or as a path) are the same bundle
    resolve_bundle(REPO, progress=False)
    bundles = list((tmp_path / "flash_home" / "bundles").iterdir())
    assert len(bundles) == 1 and bundles[0].name.startswith("tiny-qwen3-moe-4bit-kept-")
    for name in (f"{REPO}@{COMMIT}", str(folder)):
        assert resolve_bundle(name, progress=False) == bundles[0]


def test_a_gguf_repo_takes_llama_cpp_s_tags(offline):
    folder = snapshot(offline, GGUF_REPO, GGUF_COMMIT)
    for name, file in ((f"{GGUF_REPO}:Q8_0", "tiny-Q8_0.gguf"),
                       (f"{GGUF_REPO}:q4_0", "tiny-Q4_0.gguf"),
                       (f"{GGUF_REPO}@{GGUF_COMMIT}:Q4_0", "tiny-Q4_0.gguf"),
                       (GGUF_REPO, "tiny-Q8_0.gguf")):  # no Q4_K_M: Q8_0, as llama.cpp
        assert resolve_hub_model(name) == folder / file, name
    bundle = resolve_bundle(f"{GGUF_REPO}:Q4_0", progress=False)
    assert bundle.name.startswith("tiny-Q4_0-kept-")  # the file's name, not its blob's
    assert resolve_bundle(str(folder / "tiny-Q4_0.gguf"), progress=False) == bundle
    with pytest.raises(FileNotFoundError) as e:
        resolve_hub_model(f"{GGUF_REPO}:Q4_K_M")
    assert str(e.value) == (f"{GGUF_REPO}:Q4_K_M: {GGUF_REPO} has no GGUF file for Q4_K_M in "
                            "the Hugging Face cache (HF_HUB_OFFLINE=1); its GGUF files: "
                            "tiny-Q4_0.gguf, tiny-Q8_0.gguf")


def test_an_unknown_name_is_one_line_naming_both_readings(offline):
    import mlx_flash

    for name in ("nobody/nothing", "nobody/nothing:Q4_0", f"{REPO}@v9", f"{GGUF_REPO}@v9:Q8_0"):
        with pytest.raises(FileNotFoundError) as e:
            mlx_flash.load(name)
        assert str(e.value) == (f"{name} is not a file or folder, and not a model in the "
                                f"Hugging Face cache ({offline}) (HF_HUB_OFFLINE=1: nothing is "
                                "downloaded)")
    with pytest.raises(FileNotFoundError, match=r"^nothing/here does not exist \(give a "):
        resolve_bundle("nothing/here/")


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)


def test_generate_names_the_model_as_mlx_lm(hf_home, tmp_path):
    env = hub_env(hf_home, tmp_path / "flash_home")
    args = ["generate", "--model", REPO, "--prompt", "hi", "--max-tokens", "8", "--temp", "0"]
    flash = run("-m", "mlx_flash", *args, env=env)
    assert flash.returncode == 0, flash.stderr
    lm = run("-m", "mlx_lm", *args, env=env)
    assert lm.returncode == 0, lm.stderr
    text = lm.stdout.split("=" * 10 + "\n")[1]  # ==========\ntext\n==========\nPrompt: ...
    assert flash.stdout == text and text.strip()
    missing = run("-m", "mlx_flash", "generate", "--model", "nobody/nothing", env=env)
    assert missing.returncode == 1
    assert missing.stderr == (f"error: nobody/nothing is not a file or folder, and not a model "
                              f"in the Hugging Face cache ({hf_home / 'hub'}) (HF_HUB_OFFLINE=1: "
                              "nothing is downloaded)\n")


def test_an_unreachable_hub_falls_back_on_the_cache(hf_home, tmp_path):
    """Online, but the Hub does not answer (a closed port here): as mlx-lm, the cache."""
    env = hub_env(hf_home, tmp_path / "flash_home", offline=False)
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_DISABLE_TELEMETRY="1")
    code = ("import sys; from mlx_flash.hub import resolve_hub_model as r\n"
            "print(r(sys.argv[1]))\n"
            "print(r(sys.argv[2]))\n"
            "try:\n    r('nobody/nothing')\nexcept FileNotFoundError as e:\n    print(e)\n")
    out = run("-c", code, REPO, f"{GGUF_REPO}:Q4_0", env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == [str(snapshot(hf_home / "hub", REPO, COMMIT)),
                         str(snapshot(hf_home / "hub", GGUF_REPO, GGUF_COMMIT) / "tiny-Q4_0.gguf")]
    assert len(lines) == 3 and lines[2].startswith(
        f"nobody/nothing is not a file or folder, and not a model in the Hugging Face cache "
        f"({hf_home / 'hub'}), and the Hugging Face Hub did not answer: ")
