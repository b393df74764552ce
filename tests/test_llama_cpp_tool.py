"""tools/llama_cpp.py (llama.cpp for the benchmarks, issue #20): its command line and cache,
without building llama.cpp or touching the network (a finished build is faked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

import llama_cpp  # noqa: E402


def run_tool(*args: str, home: Path, path_env: str | None = None):
    env = dict(os.environ, MLX_FLASH_HOME=str(home))
    if path_env is not None:
        env["PATH"] = path_env
    return subprocess.run([sys.executable, str(TOOLS / "llama_cpp.py"), *args], env=env,
                          capture_output=True, text=True, timeout=60)


def fake_build(home: Path, tools=("llama-bench", "llama-completion")) -> Path:
    root = home / "llama.cpp" / llama_cpp.VERSION
    (root / "build" / "bin").mkdir(parents=True)
    for name in tools:
        exe = root / "build" / "bin" / name
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    record = {"version": llama_cpp.VERSION, "tools": {n: f"build/bin/{n}" for n in tools},
              "flags": llama_cpp.cmake_flags()}
    (root / "build.json").write_text(json.dumps(record))
    return root


def test_path_when_nothing_is_built_exits_1_with_one_line(tmp_path: Path) -> None:
    done = run_tool("path", home=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not built" in lines[0] and "llama_cpp.py build" in lines[0]
    assert str(tmp_path) in lines[0]


def test_cache_path_honours_mlx_flash_home(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLX_FLASH_HOME", str(tmp_path / "h"))
    assert llama_cpp.build_dir() == tmp_path / "h" / "llama.cpp" / llama_cpp.VERSION
    from mlx_flash.paths import home  # the rule the tool repeats

    assert llama_cpp.home() == home()
    monkeypatch.delenv("MLX_FLASH_HOME")
    assert llama_cpp.build_dir("1.0") == home() / "llama.cpp" / "1.0"
    assert llama_cpp.home() == Path.home() / ".cache" / "mlx_flash"


def test_a_finished_build_is_found_and_a_half_finished_one_is_not(tmp_path: Path,
                                                                  monkeypatch) -> None:
    monkeypatch.setenv("MLX_FLASH_HOME", str(tmp_path))
    root = fake_build(tmp_path)
    bench = root / "build" / "bin" / "llama-bench"
    assert llama_cpp.binary("llama-bench") == bench
    assert llama_cpp.binary("llama-simple") is None  # not among the tools built
    done = run_tool("path", home=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == str(bench)
    done = run_tool("path", "llama-completion", home=tmp_path)
    assert done.returncode == 0 and Path(done.stdout.strip()).name == "llama-completion"
    done = run_tool("path", "llama-simple", home=tmp_path)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert "no llama-simple" in done.stderr
    record = json.loads((root / "build.json").read_text())
    (root / "build.json").write_text(json.dumps({**record, "flags": ["-DGGML_NATIVE=ON"]}))
    assert llama_cpp.binary("llama-bench") is None  # built by another recipe: not reused
    done = run_tool("path", home=tmp_path)
    assert done.returncode == 1 and "with the current options" in done.stderr
    (root / "build.json").unlink()  # a build killed before its record: not a build
    assert llama_cpp.binary("llama-bench") is None
    assert run_tool("path", home=tmp_path).returncode == 1
    (root / "build.json").write_text("{trunc")
    assert llama_cpp.binary("llama-bench") is None


def test_build_without_cmake_says_so_in_one_line(tmp_path: Path) -> None:
    bare = tmp_path / "bin"  # a PATH with a compiler but no cmake
    bare.mkdir()
    for tool in ("g++", "c++"):
        found = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True,
                               text=True).stdout.strip()
        if found:
            (bare / tool).symlink_to(found)
    done = run_tool("build", home=tmp_path / "home", path_env=str(bare))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cmake" in lines[0] and "not found" in lines[0]
    assert not (tmp_path / "home").exists()  # nothing downloaded, nothing created


def test_targets_come_from_the_tree(tmp_path: Path) -> None:
    def tree(*targets: str) -> Path:
        src = tmp_path / "-".join(targets)
        for i, name in enumerate(targets):
            (src / "tools" / str(i)).mkdir(parents=True)
            (src / "tools" / str(i) / "CMakeLists.txt").write_text(f"set(TARGET {name})\n")
        return src

    new = tree("llama-bench-impl", "llama-bench", "llama-completion", "llama-cli")
    assert llama_cpp.choose_targets(llama_cpp.defined_targets(new)) == [
        "llama-bench", "llama-completion"]
    old = tree("llama-bench", "llama-cli", "llama-simple")  # before llama-completion
    assert llama_cpp.choose_targets(llama_cpp.defined_targets(old)) == [
        "llama-bench", "llama-cli", "llama-simple"]
    with pytest.raises(llama_cpp.BuildError, match="no llama-bench"):
        llama_cpp.choose_targets(llama_cpp.defined_targets(tree("llama-simple")))


def test_cpu_flags_enable_what_the_cpu_has_but_amx() -> None:
    flags = llama_cpp.cpu_flags("processor: 0\nflags\t\t: fpu sse4_2 avx avx2 fma f16c bmi2 "
                                "avx512f avx512cd avx512vl avx512dq avx512_vnni amx_tile "
                                "amx_int8 amx_bf16\n")
    assert "-DGGML_NATIVE=OFF" in flags and "-DGGML_AVX2=ON" in flags
    assert "-DGGML_AVX512=OFF" in flags  # avx512bw is missing
    assert "-DGGML_AVX512_VNNI=ON" in flags and "-DGGML_AVX_VNNI=OFF" in flags
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(flags)
    assert llama_cpp.cpu_flags("processor: 0\n") == ["-DGGML_NATIVE=ON"]


# ----------------------------------------------------------------------------- llama-greedy

GREEDY_PROMPT = [5, 9, 100, 7, 3, 42]
GREEDY_TOKENS = 12


@pytest.fixture(scope="module")
def greedy_home(tmp_path_factory) -> Path:
    """A cache folder whose llama.cpp build is the user's real one (~/.cache/mlx_flash: the
    tests' own MLX_FLASH_HOME is empty), linked in, so that llama-greedy compiles (seconds)
    into the tests' folder, not the user's; skips when llama.cpp is not built there."""
    real = Path.home() / ".cache" / "mlx_flash" / "llama.cpp" / llama_cpp.VERSION
    home = tmp_path_factory.mktemp("llama_home")
    root = home / "llama.cpp" / llama_cpp.VERSION
    root.mkdir(parents=True)
    for name in ("src", "build"):
        if (real / name).is_dir():
            (root / name).symlink_to(real / name)
    if (real / "build.json").is_file():
        (root / "build.json").write_text((real / "build.json").read_text())
    saved = os.environ["MLX_FLASH_HOME"]
    os.environ["MLX_FLASH_HOME"] = str(home)
    try:
        if llama_cpp.greedy_binary() is None:
            pytest.skip(f"llama.cpp {llama_cpp.VERSION} is not built in {real} (python "
                        "tools/llama_cpp.py build: ~10 minutes) or llama-greedy did not compile")
    finally:
        os.environ["MLX_FLASH_HOME"] = saved
    return home


@pytest.fixture
def built_greedy(greedy_home: Path, monkeypatch) -> Path:
    monkeypatch.setenv("MLX_FLASH_HOME", str(greedy_home))
    return llama_cpp.greedy_path()


def mlx_lm_greedy(config: dict, weights: dict, prompt: list[int], steps: int,
                  dtype=None) -> list[int]:
    """mlx-lm's own llama on the float weights the GGUF was written from (each rounded to
    `dtype` first, as the file stores it), greedy."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes
    from tiny_models import greedy_logits

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.load_weights([(k, mx.array(v if dtype is None or v.ndim < 2 else v.astype(dtype)))
                        for k, v in weights.items()])
    return [int(t) for t in greedy_logits(model, prompt, steps).argmax(axis=-1)]


@pytest.mark.parametrize("qtype", ["F32", "F16"])
def test_llama_cpp_row_decodes_mlx_lms_greedy_tokens(tmp_path: Path, qtype: str,
                                                    built_greedy: Path) -> None:
    """llama.cpp (through llama-greedy, in benchlib's cgroups) and mlx-lm, two implementations
    of the same float weights, decode the same greedy tokens, with mmap and without."""
    import benchlib
    import numpy as np
    from tiny_models import write_llama_gguf

    gguf = tmp_path / f"tiny-{qtype}.gguf"
    config, weights = write_llama_gguf(gguf, qtype, seed=3)
    reference = mlx_lm_greedy(config, weights, GREEDY_PROMPT, GREEDY_TOKENS,
                              np.float16 if qtype == "F16" else None)
    assert len(set(reference)) > 1  # a model that says one thing would prove little
    for mmap in (True, False):
        row = benchlib.llama_cpp_row(gguf, GREEDY_PROMPT, GREEDY_TOKENS, mmap=mmap)
        assert row["status"] == "ok", row
        assert row["engine"] == ("llama.cpp" if mmap else "llama.cpp --no-mmap")
        assert row["tokens"] == reference
        assert row["decode_tokens"] == GREEDY_TOKENS - 1 and row["ms_per_token"] > 0
        assert 0 < row["model_rss_bytes"] < row["peak_rss_bytes"]
        assert row["first_token_seconds"] > row["load_seconds"] > 0
        assert row["read_bytes_per_token"] is not None and row["ffn_bytes_per_token"] is None
        if row["cgroup_peak_bytes"] is not None:  # its own peak, not its forking parent's
            assert row["peak_rss_bytes"] < row["cgroup_peak_bytes"] + (64 << 20)
    row = benchlib.llama_cpp_row(gguf, GREEDY_PROMPT, GREEDY_TOKENS, repack=False)
    assert row["status"] == "ok" and row["repack"] is False and row["tokens"] == reference


def test_llama_cpp_row_says_why_it_did_not_run(tmp_path: Path, monkeypatch,
                                               built_greedy: Path) -> None:
    import benchlib

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file" * 100)
    row = benchlib.llama_cpp_row(junk, [1, 2], 3)
    assert row["status"].startswith("failed: ") and "unable to load" in row["status"]
    assert row["ms_per_token"] is None and row["engine"] == "llama.cpp"
    from tiny_models import write_llama_gguf

    gguf = tmp_path / "tiny.gguf"
    write_llama_gguf(gguf, "F32")
    row = benchlib.llama_cpp_row(gguf, [1, 100000], 3, mmap=False)  # outside the vocabulary
    assert row["status"].startswith("failed: ") and "outside the vocabulary" in row["status"]
    row = benchlib.llama_cpp_row(gguf, [1, 2], 3, ram=4 << 20, mmap=False)
    if row.get("cgroup_error"):
        pytest.skip(f"no memory cgroup here: {row['cgroup_error']}")
    assert row["status"] == "out of memory" and row["cgroup_peak_bytes"] <= 4 << 20
    monkeypatch.setenv("MLX_FLASH_HOME", str(tmp_path / "empty"))
    row = benchlib.llama_cpp_row(gguf, [1, 2], 3)
    assert row["status"] == "not built (python tools/llama_cpp.py build)"


def test_greedy_binary_needs_a_build_and_follows_its_source(tmp_path: Path,
                                                           monkeypatch) -> None:
    monkeypatch.setenv("MLX_FLASH_HOME", str(tmp_path))
    assert llama_cpp.greedy_binary() is None  # nothing built
    fake_build(tmp_path)  # a build record without the static libraries
    assert llama_cpp.greedy_binary() is None
    done = run_tool("path", "llama-greedy", home=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    command = llama_cpp.greedy_command()
    assert str(llama_cpp.GREEDY_SOURCE) in command and "-fopenmp" in command
    assert all(any(arg.endswith(lib) for arg in command) for lib in llama_cpp.GREEDY_LIBS)
