"""The benchmarks' harness (tools/benchlib.py): cgroup paths and files, the worker protocol,
rounds and medians, tables (that the benchmarks import neither each other nor tests/:
test_layers.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

import benchlib  # noqa: E402

V1 = """12:hugetlb:/
9:name=systemd:/user.slice/session-1.scope
4:memory:/process_api/df3b
3:cpu,cpuacct:/
7:blkio:/jobs/7
0::/
"""


def test_own_cgroups_from_proc_self_cgroup() -> None:
    own = benchlib.own_cgroups(V1)
    assert own["memory"] == "/process_api/df3b" and own["blkio"] == "/jobs/7"
    assert own["cpu"] == own["cpuacct"] == "/"  # a hierarchy of two controllers
    assert own["name=systemd"] == "/user.slice/session-1.scope" and own[""] == "/"
    assert benchlib.own_cgroups("0::/user.slice/job.scope\n") == {"": "/user.slice/job.scope"}


def test_cgroup_base_v1_then_v2(tmp_path: Path) -> None:
    own = benchlib.own_cgroups(V1)
    with pytest.raises(OSError, match="no memory cgroup hierarchy"):
        benchlib.cgroup_base("memory", own, tmp_path)
    (tmp_path / "cgroup.controllers").write_text("cpu io memory\n")
    assert benchlib.cgroup_base("memory", own, tmp_path) == (tmp_path, 2)
    (tmp_path / "memory").mkdir()
    assert benchlib.cgroup_base("memory", own, tmp_path) == (
        tmp_path / "memory" / "process_api" / "df3b", 1)
    assert benchlib.cgroup_base("blkio", own, tmp_path) == (tmp_path, 2)  # no v1 blkio here


def test_engine_cgroup_in_a_fake_hierarchy(tmp_path: Path) -> None:
    """v1: the memory cgroup made under the process's own, its limit written, the command
    moved into it; without a hierarchy, an error and the command as it is."""
    proc = tmp_path / "cgroup"
    proc.write_text(V1)
    (tmp_path / "memory" / "process_api" / "df3b").mkdir(parents=True)
    group = benchlib.EngineCgroup("engine", 1 << 30, root=tmp_path, proc=proc)
    assert group.error is None and group.version == 1
    assert group.path == tmp_path / "memory" / "process_api" / "df3b" / "engine"
    assert (group.path / "memory.limit_in_bytes").read_text() == str(1 << 30)
    cmd = group.command(["python", "-c", "pass"])
    assert cmd[:2] == ["/bin/sh", "-c"] and cmd[-3:] == ["python", "-c", "pass"]
    assert str(group.path / "cgroup.procs") in cmd[2]
    (group.path / "memory.limit_in_bytes").unlink()  # a real cgroup's files go with it
    path = group.path
    group.close()
    assert not path.exists() and group.path is None
    none = benchlib.EngineCgroup("engine", None, root=tmp_path / "nowhere", proc=proc)
    assert none.error and none.command(["x"]) == ["x"] and none.peak() is None


def test_engine_cgroup_read_limit(tmp_path: Path, monkeypatch) -> None:
    """--read-mbps's hook: v1 blkio's throttle (a cgroup of its own, under the process's own
    blkio cgroup), v2 io.max (the memory cgroup's folder), on the disk of the folders."""
    monkeypatch.setattr(benchlib, "block_device", lambda path: "8:0")
    proc = tmp_path / "cgroup"
    proc.write_text(V1)
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    (v1 / "memory" / "process_api" / "df3b").mkdir(parents=True)
    (v1 / "blkio" / "jobs" / "7").mkdir(parents=True)
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("io memory\n")
    for root, files in ((v1, {"blkio/jobs/7/e/blkio.throttle.read_bps_device": "8:0 5000000",
                              "memory/process_api/df3b/e/memory.limit_in_bytes": "4096"}),
                        (v2, {"e/io.max": "8:0 rbps=5000000", "e/memory.max": "4096",
                              "e/memory.swap.max": "0"})):
        group = benchlib.EngineCgroup("e", 4096, read_bps=5_000_000, folders=[tmp_path],
                                      root=root, proc=proc)
        assert group.error is None
        for name, value in files.items():
            assert (root / name).read_text() == value
            (root / name).unlink()
        assert all(str(f / "cgroup.procs") in group.command(["x"])[2] for f in group.folders)
        assert len(group.folders) == (2 if root == v1 else 1)
        group.close()
        assert not (root / next(iter(files))).parent.exists()


def test_memory_cgroup_limits_and_measures() -> None:
    """A real memory cgroup (where this process may make one): its peak, and the kernel's OOM
    kill at its limit."""
    group = benchlib.EngineCgroup(f"mlx_flash_test_{id(object())}", 256 * 2**20)
    if group.error:
        pytest.skip(f"no memory cgroup here: {group.error}")
    try:
        ok = subprocess.run(group.command([sys.executable, "-c", "x = bytearray(32 << 20)"]))
        assert ok.returncode == 0 and group.peak() >= 32 << 20
        big = subprocess.run(group.command([sys.executable, "-c",
                                            "x = bytearray(1 << 30); x[::4096] = b'1' * "
                                            "len(x[::4096])"]), capture_output=True)
        assert big.returncode == -9 and group.oom_kills() >= 1
    finally:
        path = group.path
        group.close()
    assert not path.exists()


WORKER = """import json, sys
spec = json.loads(sys.argv[2])
if spec["engine"] == "bad":
    raise SystemExit("bad engine: it fails")
print("noise")
print(json.dumps({"engine": spec["engine"], "ms_per_token": spec["ms"]}))
"""


def test_run_worker_protocol(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    row = benchlib.run_worker(script, {"engine": "e", "ms": 2.5}, [tmp_path])
    assert row["status"] == "ok" and row["ms_per_token"] == 2.5 and row["engine"] == "e"
    assert "cgroup_peak_bytes" in row and "cgroup_error" in row
    bad = benchlib.run_worker(script, {"engine": "bad"}, [tmp_path])
    assert bad["status"] == "failed" and bad["error"] == "bad engine: it fails"
    with pytest.raises(SystemExit, match="bad failed:\nbad engine"):
        benchlib.run_worker(script, {"engine": "bad"}, [], check=True)


def test_interleaved_rounds_and_median_row(capsys) -> None:
    ms = {("a", 0): 3.0, ("a", 1): 1.0, ("a", 2): 2.0, ("b", 0): 5.0}
    calls = []

    def run(case: str) -> dict:
        i = sum(c == case for c in calls)
        calls.append(case)
        if case == "b" and i == 1:
            return {"status": "failed", "error": "boom"}
        return {"status": "ok", "ms_per_token": ms[(case, i)], "model_rss_bytes": 10 * i,
                "cgroup_peak_bytes": None if i == 2 else 100 + i}

    got = benchlib.interleaved(["a", "b"], 3, run, lambda c, r: f"{c}: {r['status']}")
    assert calls == ["a", "b", "a", "b", "a"]  # interleaved; b not run again once failed
    assert capsys.readouterr().out.splitlines()[:3] == ["  [1/3] a: ok", "  [1/3] b: ok",
                                                        "  [2/3] a: ok"]
    row = benchlib.median_row(got["a"])
    assert row["ms_per_token"] == 2.0 and row["ms_per_token_rounds"] == [3.0, 1.0, 2.0]
    assert row["model_rss_bytes"] == 20 and row["cgroup_peak_bytes"] == 101  # the largest
    two = benchlib.median_row(got["a"][:2])  # even: the lower median
    assert two["ms_per_token"] == 1.0 and two["cgroup_peak_bytes"] == 101
    assert benchlib.median_row([{"ms_per_token": 1.0, "model_rss_bytes": 1}])[
        "cgroup_peak_bytes"] is None


def test_md_table_and_num() -> None:
    assert benchlib.md_table(["engine", "ms/token", "note"],
                             [["flash", benchlib.num(12.345), ""],
                              ["naive", benchlib.num(None), benchlib.num(0.25, 1, ".0%")]]) == [
        "| engine | ms/token | note |", "|---|---|---|", "| flash | 12.3 | |",
        "| naive | – | 25% |"]


def test_read_mbps_parses_default_numbers_and_off() -> None:
    import argparse

    assert benchlib.read_mbps("default") == benchlib.DEFAULT_READ_MBPS
    assert benchlib.read_mbps(" Default ") == benchlib.DEFAULT_READ_MBPS
    assert benchlib.read_mbps("30") == 30.0 and benchlib.read_mbps("2.5") == 2.5
    for off in (None, "", "0", "off", "none"):
        assert benchlib.read_mbps(off) is None
    for bad in ("fast", "-5", "nan", "inf"):
        with pytest.raises(argparse.ArgumentTypeError, match="read-mbps"):
            benchlib.read_mbps(bad)
    assert benchlib.read_bps(12.0) == 12_000_000 and benchlib.read_bps(None) is None
    parser = argparse.ArgumentParser()
    parser.add_argument("--read-mbps", type=benchlib.read_mbps)
    assert parser.parse_args(["--read-mbps", "default"]).read_mbps == benchlib.DEFAULT_READ_MBPS


def test_drop_page_cache_takes_a_file_or_a_folder(tmp_path: Path) -> None:
    import os

    path = tmp_path / "sub" / "data.bin"
    path.parent.mkdir()
    with open(path, "wb") as f:
        f.write(os.urandom(4 << 20))
        os.fsync(f.fileno())  # dirty pages are not dropped, only clean ones
    for target in (path, tmp_path):
        with open(path, "rb") as f:
            f.read()  # now cached
        assert cached_share(path) > 0.9
        benchlib.drop_page_cache(target)
        assert cached_share(path) < 0.5, target  # most pages forgotten


def cached_share(path: Path) -> float:
    """The share of a file's pages in the page cache (mincore(2) on a private mapping, whose
    untouched pages are the cache's)."""
    import ctypes
    import ctypes.util
    import mmap

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    size, page = path.stat().st_size, mmap.PAGESIZE
    vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        view = ctypes.c_char.from_buffer(m)
        failed = libc.mincore(ctypes.c_void_p(ctypes.addressof(view)), ctypes.c_size_t(size),
                              vec)
        del view
        m.close()
    if failed:
        pytest.skip("mincore(2) failed")
    return sum(v & 1 for v in vec) / len(vec)
