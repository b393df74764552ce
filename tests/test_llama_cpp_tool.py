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
