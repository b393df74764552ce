"""Hostile and unlucky files (issue 13): configs and GGUF headers that claim more than they
hold are refused within bounded memory, with one-line errors; damaged tensor tables never
convert silently; altered records are caught when read; concurrent and killed writers leave
bundles whole and nothing behind.

The GGUF header fuzzer runs its cases in a worker process under an address-space limit (the
parent restarts it after a crash and kills it after a hang), and checks every outcome: a
one-line error, or a bundle whose weights are the original's.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_models import TINY_LLAMA, write_llama_gguf

import mlx_flash
from mlx_flash.bundle import Bundle
from mlx_flash.bundle_writer import STAGING, BundleUpdate, write_manifest
from mlx_flash.convert import convert
from mlx_flash.errors import BundleError, ConversionError
from mlx_flash.flash_io import RecordChecker
from mlx_flash.sources import SourceError

ROOT = Path(__file__).parent.parent
TESTS = Path(__file__).parent
LIMIT_AS = 4 << 30  # the address-space limit the issue asks for


def limits(memory: int = LIMIT_AS, file_size: int | None = None):
    """A preexec_fn putting a child under an address-space limit (and a file size limit:
    Python ignores SIGXFSZ, so a write past it fails with EFBIG, as on a full disk)."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        if file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    return apply


def run_module(module: str, *args: str, env: dict[str, str] | None = None,
               preexec=None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, preexec_fn=preexec,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed with exit code 1 and one line "error: ..." last, no traceback
    (progress lines may come before it)."""
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error")]
    assert errors == [lines[-1]] and lines[-1].startswith("error: "), r.stderr[-3000:]
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def hf_folder(tiny_llama, tmp_path: Path, **config) -> Path:
    """A copy of the tiny HF llama with `config` entries replaced."""
    folder = tmp_path / "hf"
    shutil.copytree(tiny_llama[0], folder)
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, **config}))
    return folder


# --------------------------------------------------------------------- item 4: bounded memory

@pytest.mark.parametrize("layers", [10**9, 1e9])
def test_config_claiming_a_billion_layers_is_one_line_within_4gb(tiny_llama, tmp_path, layers):
    """The issue's must-show: conversion was killed by the OOM killer at 23 GB."""
    folder = hf_folder(tiny_llama, tmp_path, num_hidden_layers=layers)
    start = time.perf_counter()
    r = run_module("mlx_flash.convert", str(folder), str(tmp_path / "out"), preexec=limits())
    assert_one_line_error(r, "num_hidden_layers")
    assert time.perf_counter() - start < 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_more_layers_than_tensors_is_refused_before_allocating(tiny_llama, tmp_path):
    """Within the sane limit, the number of layers is checked against the weights first."""
    folder = hf_folder(tiny_llama, tmp_path, num_hidden_layers=1000)
    with pytest.raises(ConversionError, match="claims 1000 layers"):
        convert(folder, tmp_path / "out", progress=False)


def test_load_and_generate_refuse_it_too(tiny_llama, tmp_path):
    """`mlx_flash.load` and `generate --model` reach conversion through the cache."""
    folder = hf_folder(tiny_llama, tmp_path, num_hidden_layers=10**9)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        mlx_flash.load(folder)
    r = run_module("mlx_flash.generate", "--model", str(folder), "--max-tokens", "1",
                   preexec=limits())
    assert_one_line_error(r, "num_hidden_layers")


def gguf_fields(path: Path) -> dict[str, tuple[int, int]]:
    """Where each metadata value and tensor-table entry of a (sound) GGUF file lies:
    "KEY" / "KEY#count" (arrays) / "TENSOR.dims" ... -> (byte offset, bytes). Located with
    gguf-py's reader, whose parts are views into the mapped file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    base = reader.data.ctypes.data

    def where(part: np.ndarray) -> tuple[int, int]:
        return part.ctypes.data - base, part.nbytes

    out = {"GGUF.tensor_count": where(reader.fields["GGUF.tensor_count"].parts[0]),
           "GGUF.kv_count": where(reader.fields["GGUF.kv_count"].parts[0])}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[f"{key}#type"] = where(f.parts[2])
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            out[f"{key}#count"] = where(f.parts[4])
        elif f.types[0] == gguf.GGUFValueType.STRING:
            out[f"{key}#length"] = where(f.parts[3])
            out[key] = where(f.parts[4])
        else:
            out[key] = where(f.parts[3])
    for t in reader.tensors:
        for i, part in enumerate(("name_length", "name", "n_dims", "dims", "type", "offset")):
            out[f"{t.name}.{part}"] = where(t.field.parts[i])
    return out


def patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


@pytest.fixture
def deadline():
    """Interrupt an in-process test past 60 s: a hang fails instead of stalling the suite."""
    def expired(signum, frame):
        raise TimeoutError("the test ran past its 60 s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """The tiny llama as a Q8_0 GGUF (norms F32): no other GGML type has Q8_0's bytes per
    weight, so every relabelled type changes a tensor's size."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_llama_gguf(path, "Q8_0")
    return path


GGUF_CASES = {  # field -> value: what the issue found, each a one-line error at once
    "llama.block_count": struct.pack("<I", 2**31 - 1),
    "tokenizer.ggml.tokens#count": struct.pack("<Q", 2**32),
    "tokenizer.ggml.token_type#count": struct.pack("<Q", 2**32),  # gguf-py: 5.8 GB in 150 s
    "tokenizer.ggml.merges#count": struct.pack("<Q", 2**64 - 1),
    "llama.attention.head_count": struct.pack("<I", 0),
    "llama.embedding_length": struct.pack("<I", 0),
    "tokenizer.ggml.eos_token_id": struct.pack("<I", 2**31 - 1),
    "tokenizer.ggml.bos_token_id": struct.pack("<I", 2**31 - 1),
    "llama.attention.layer_norm_rms_epsilon": struct.pack("<f", math.nan),
    "llama.rope.freq_base": struct.pack("<f", math.inf),
    "GGUF.tensor_count": struct.pack("<Q", 2**40),
    "token_embd.weight.type": struct.pack("<I", 1),  # Q8_0 relabelled F16
    "blk.0.ffn_up.weight.offset": struct.pack("<Q", 0),
    "blk.1.attn_norm.weight.dims": struct.pack("<Q", 0),
}


@pytest.mark.parametrize("field", GGUF_CASES)
def test_damaged_gguf_header_is_a_clear_error_at_once(tiny_gguf, tmp_path, field, deadline):
    offset, _ = gguf_fields(tiny_gguf)[field]
    path = tmp_path / "damaged.gguf"
    path.write_bytes(patched(tiny_gguf.read_bytes(), offset, GGUF_CASES[field]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises((SourceError, ConversionError, ValueError)):
        convert(path, tmp_path / "out", dtype=None, progress=False, keep_quantization=True)
    assert time.perf_counter() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KB
    assert not (tmp_path / "out").exists()


def test_truncated_gguf_is_a_clear_error(tiny_gguf, tmp_path, deadline):
    data = tiny_gguf.read_bytes()
    for cut in (0, 3, 8, 23, 24, 100, 5000, 5920, 6000, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut-{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises((SourceError, ConversionError)):
            convert(path, tmp_path / "out", progress=False)


# ------------------------------------------------------------------ the GGUF header fuzzer

FUZZ_CASES = 300
FUZZ_SEED = 13
FUZZ_MEMORY = 3 << 30  # the worker's address-space limit (MLX and transformers: ~1.5 GB)
FUZZ_CASE_SECONDS = 20  # a case taking longer is a hang
INTERESTING = [0, 1, 2, 3, 7, 8, 31, 32, 33, 63, 64, 65, 255, 4096, 2**16, 2**31 - 1, 2**31,
               2**32 - 1, 2**32, 2**40, 2**63 - 1, 2**63, 2**64 - 1]
FLOATS = [math.nan, math.inf, -math.inf, 0.0, -1.0, -0.0, 1e-45, 1e30, 3.4e38]
BAD_HYPERPARAMETERS = ("layer_norm_rms_epsilon", "freq_base")  # NaN, inf or <= 0: an error


def fuzz_cases(original: bytes, fields: dict[str, tuple[int, int]], n: int, seed: int
               ) -> list[dict]:
    """`n` seeded mutations of a GGUF header: {"kind", "what", "offset", "value" (hex) or
    "cut"}. Half rewrite the tensor table (type, shape, offset, name); the rest numeric
    metadata (sizes, counts, float hyper-parameters), random bytes of the header, and
    truncations."""
    rng = random.Random(seed)
    header_end = max(o + size for o, size in fields.values())
    tensor_fields = sorted(k for k in fields if k.endswith(
        (".type", ".dims", ".offset", ".n_dims", ".name", ".name_length")))
    scalar_fields = sorted(k for k in fields if k not in tensor_fields
                           and fields[k][1] in (4, 8) and not k.endswith("#type"))
    cases = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.5:
            kind, what = "tensor table", rng.choice(tensor_fields)
        elif roll < 0.8:
            kind, what = "metadata", rng.choice(scalar_fields)
        elif roll < 0.93:
            kind, what = "bytes", "header"
        else:
            cases.append({"kind": "truncation", "what": "file",
                          "cut": rng.randrange(len(original))})
            continue
        if kind == "bytes":
            offset = rng.randrange(header_end)
            value = bytes([original[offset] ^ (1 << rng.randrange(8))])
        else:
            offset, size = fields[what]
            if what.endswith(".name"):  # one byte of the name, to another name character
                offset += rng.randrange(size)
                value = bytes([rng.choice(b"abfknoqtuvw0123456789._")])
            elif what.endswith(".dims"):  # one of the dimensions
                offset += 8 * rng.randrange(size // 8)
                value = struct.pack("<Q", rng.choice(INTERESTING + [16, 64, 128, 264]))
            elif "epsilon" in what or "freq_base" in what:  # float32
                value = struct.pack("<f", rng.choice(FLOATS))
            else:
                old = int.from_bytes(original[offset:offset + size], "little")
                choices = INTERESTING + [old + 1, old - 1, old * 2, old // 2, old + 32,
                                         old + 4096, rng.randrange(40)]
                value = (rng.choice(choices) % 2 ** (8 * size)).to_bytes(size, "little")
        cases.append({"kind": kind, "what": what, "offset": offset, "value": value.hex()})
    return cases


def fuzz_worker(original_path: str, cases_path: str, first: int, scratch: str) -> None:
    """Run cases `first`... of the fuzzer through `python -m mlx_flash.convert`'s main,
    printing "start I" before and a JSON line after each (run in a child process)."""
    from mlx_flash.convert import main

    original = Path(original_path).read_bytes()
    cases = json.loads(Path(cases_path).read_text())
    work = Path(scratch)
    for i in range(first, len(cases)):
        case = cases[i]
        data = original[:case["cut"]] if "cut" in case else patched(
            original, case["offset"], bytes.fromhex(case["value"]))
        src, out = work / f"case-{i}.gguf", work / f"case-{i}"
        src.write_bytes(data)
        print(f"start {i}", flush=True)
        err, result = io.StringIO(), {"case": i}
        start = time.perf_counter()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                result["rc"] = main([str(src), str(out), "--quiet"])
        except BaseException as e:  # anything main lets out is a traceback for the user
            result["rc"], result["exception"] = -1, f"{type(e).__name__}: {e}"[:500]
        result["seconds"] = time.perf_counter() - start
        result["stderr"] = err.getvalue()[-1000:]
        if result["rc"] == 0:
            manifest = json.loads((out / "manifest.json").read_text())
            result["weights"] = {k: manifest["files"][k]["sha256"]
                                 for k in ("ffn.bin", "resident.safetensors")}
            result["config"] = manifest["config"]
        shutil.rmtree(out, ignore_errors=True)
        src.unlink()
        print(json.dumps(result), flush=True)


def run_fuzzer(original: Path, cases: list[dict], tmp_path: Path) -> dict[int, dict]:
    """Every case's outcome: the worker's JSON, or {"rc": "crash"} / {"rc": "hang"} for a
    case the worker died or stalled on (it is restarted after it)."""
    cases_path = tmp_path / "cases.json"
    cases_path.write_text(json.dumps(cases))
    results: dict[int, dict] = {}
    first = 0
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_hardening as t; "
            "t.fuzz_worker(*sys.argv[1:3], int(sys.argv[3]), sys.argv[4])")
    while first < len(cases):
        scratch = tmp_path / f"work-{first}"
        scratch.mkdir()
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(original), str(cases_path), str(first),
             str(scratch)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            cwd=ROOT, preexec_fn=limits(FUZZ_MEMORY))
        current = None
        timer = threading.Timer(0, lambda: None)
        try:
            while True:
                timer.cancel()  # a case that prints nothing for this long is a hang
                timer = threading.Timer(FUZZ_CASE_SECONDS + 30 * (current is None),
                                        proc.kill)
                timer.start()
                line = proc.stdout.readline()
                if not line:
                    break
                if line.startswith("start "):
                    current = int(line.split()[1])
                elif line.startswith("{"):  # (what else reaches stdout is not ours)
                    results[current] = json.loads(line)
                    current = None
        finally:
            timer.cancel()
            proc.kill()
            proc.wait()
        if current is not None:  # killed by the timer (a hang), or died (a crash)
            hung = proc.returncode == -signal.SIGKILL
            results[current] = {"case": current, "rc": "hang" if hung else "crash",
                                "signal": proc.returncode}
            first = current + 1
        else:
            done = max((i for i in results if i >= first), default=first - 1) + 1
            if done == first:
                raise AssertionError("the fuzz worker died before its first case")
            first = done
    return results


def test_gguf_header_fuzzer(tiny_gguf, tmp_path):
    """300 seeded mutations of a GGUF header: no traceback, crash, hang or memory blow-up;
    each is a one-line error, or converts to the original weights (a damaged tensor table,
    never silently: weights and config both the original's); NaN, infinite or non-positive
    epsilons and RoPE bases are errors."""
    original = tmp_path / "original.gguf"
    shutil.copy(tiny_gguf, original)
    reference = convert(original, tmp_path / "reference", dtype=None, progress=False,
                        keep_quantization=True)
    weights = {k: reference.manifest["files"][k]["sha256"]
               for k in ("ffn.bin", "resident.safetensors")}
    cases = fuzz_cases(original.read_bytes(), gguf_fields(original), FUZZ_CASES, FUZZ_SEED)
    start = time.perf_counter()
    results = run_fuzzer(original, cases, tmp_path)
    elapsed = time.perf_counter() - start
    failures = []
    for i, case in enumerate(cases):
        r = results.get(i, {"rc": "missing"})
        why = None
        if r["rc"] not in (0, 1):
            why = f"{r['rc']}: {r.get('exception') or r.get('signal')}"
        elif r["rc"] == 1:
            lines = r["stderr"].strip().splitlines()
            if len(lines) != 1 or not lines[0].startswith("error: "):
                why = f"not a one-line error: {r['stderr'][-300:]!r}"
        elif r["weights"] != weights:
            why = "converted into other weights"
        elif case["kind"] == "tensor table" and r["config"] != reference.config:
            why = f"a damaged tensor table converted with another config: {r['config']}"
        elif case["kind"] == "metadata" and any(k in case["what"] for k in BAD_HYPERPARAMETERS):
            value = struct.unpack("<f", bytes.fromhex(case["value"]))[0]
            if not math.isfinite(value) or value <= 0:
                why = f"{case['what']} = {value} converted"
        if r.get("seconds", 0) > 5:
            why = f"took {r['seconds']:.1f} s"
        if why:
            failures.append(f"case {i} ({case['kind']}: {case['what']}): {why}")
    outcomes = {rc: sum(r["rc"] == rc for r in results.values()) for rc in (0, 1)}
    print(f"fuzzer: {len(cases)} cases in {elapsed:.1f} s: {outcomes[1]} errors, "
          f"{outcomes[0]} converted to the original weights")
    assert not failures, "\n".join(failures[:20])
    assert outcomes[1] > len(cases) // 2  # the mutations do reach the checks


# ------------------------------------------------------------- item 6: concurrent updates

def add_mode(update: BundleUpdate, mode: str) -> None:
    """What calibration does in an update: a file of the mode's and its manifest entry."""
    import mlx.core as mx

    staging, name = update.new_file(f"selection-{mode}", ".safetensors")
    mx.save_safetensors(str(staging), {"0.x": mx.zeros((4,))})
    n_layers = update.manifest["config"]["num_hidden_layers"]
    selection = update.manifest.setdefault("selection", {"default": None, "modes": {}})
    selection["modes"][mode] = {"file": name, "layers": [{"t": 0.5}] * n_layers}
    selection["default"] = mode


def test_concurrent_updates_take_turns_and_both_land(tiny_bundle, tmp_path):
    """Two updates prepared from the same bundle: the second waits for the first's lock and
    applies its change to the manifest the first wrote (before: it overwrote it, losing the
    first mode and orphaning its file)."""
    path = tmp_path / "b"
    shutil.copytree(tiny_bundle, path)
    first_in, release = threading.Event(), threading.Event()
    second_entered = threading.Event()

    def first() -> None:
        with BundleUpdate(Bundle.open(path)) as update:
            first_in.set()
            release.wait(10)
            add_mode(update, "gate")
            update.commit()

    def second(bundle: Bundle) -> None:
        with BundleUpdate(bundle) as update:
            second_entered.set()
            add_mode(update, "teal")
            update.commit()

    stale = Bundle.open(path)  # opened before the first update commits, as calibrate does
    a = threading.Thread(target=first)
    a.start()
    assert first_in.wait(10)
    b = threading.Thread(target=second, args=(stale,))
    b.start()
    assert not second_entered.wait(0.5)  # waits for the first
    release.set()
    a.join(10)
    b.join(10)
    bundle = Bundle.open(path, verify=True)
    modes = bundle.selection["modes"]
    assert set(modes) == {"gate", "teal"} and bundle.selection["default"] == "teal"
    on_disk = {p.name for p in path.iterdir() if p.name.startswith("selection-")}
    assert on_disk == {m["file"] for m in modes.values()}


def test_concurrent_calibrations_keep_both_modes(tiny_bundle, tmp_path):
    """Two `calibrate` runs at once on one bundle: both modes are in it, it loads, and no
    file is orphaned (the issue: unloadable, or one mode kept and the other's file left)."""
    path = tmp_path / "b"
    shutil.copytree(tiny_bundle, path)
    data = TESTS / "data" / "wikitext-2-valid-slice.txt"
    runs = [subprocess.Popen([sys.executable, "-m", "mlx_flash.calibrate", str(path),
                              "--data", str(data), "--mode", mode, "--tokens", "512",
                              "--quiet"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
            for mode in ("gate", "teal")]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-2000:]
    bundle = Bundle.open(path, verify=True)
    assert set(bundle.selection["modes"]) == {"gate", "teal"}
    listed = set(bundle.manifest["files"])
    assert {p.name for p in path.iterdir() if p.is_file()} - listed == {"manifest.json",
                                                                       ".lock"}
    for mode in ("gate", "teal"):
        mlx_flash.load(path, sparsity=mode)


def test_a_reader_never_sees_a_half_written_manifest(tiny_bundle, tmp_path):
    """While updates replace the manifest (and delete the files the old one named), bundles
    keep opening: the manifest is replaced in one rename, and a file deleted under a reader
    that read the old manifest sends it to the new one."""
    path = tmp_path / "b"
    shutil.copytree(tiny_bundle, path)
    stop, errors, opened = threading.Event(), [], []

    def read() -> None:
        while not stop.is_set():
            try:
                Bundle.open(path)
                opened.append(1)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(15):
            with BundleUpdate(Bundle.open(path)) as update:
                add_mode(update, ("gate", "teal")[i % 2])
                update.commit()
    finally:
        stop.set()
        reader.join()
    assert not errors, errors[:3]
    assert len(opened) > 15


# ------------------------------------------------------------------ item 9: altered records

def read_layer(bundle: Bundle, family: str, layer: int):
    """Every record of a layer read as the engine reads them: ids, slots, part rows."""
    import mlx.core as mx

    from mlx_flash.flash_io import FlashReader
    from mlx_flash.neuron_matrix import NeuronMatrix

    fam = bundle.families[family]
    matrix = NeuronMatrix(fam, fam.count)
    ids = np.arange(fam.count)
    reader = FlashReader(bundle.family_path(family))
    reader.read_records(fam, layer, ids, ids, matrix)
    reader.close()
    return ids, ids, {p.name: np.array(matrix.parts[p.name].view(mx.uint8), copy=False)
                      for p in fam.parts}


def alter(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("damage", ["flipped byte", "NaN record"])
def test_altered_record_is_caught_when_read(tiny_bundle, tmp_path, damage):
    path = tmp_path / "b"
    shutil.copytree(tiny_bundle, path)
    bundle = Bundle.open(path)
    fam = bundle.families["neuron"]
    assert fam.checksums == "crc32"
    checker = RecordChecker(bundle)
    checker.check("neuron", 1, *read_layer(bundle, "neuron", 1))  # sound: passes
    record = fam.segments[1][0] + 37 * fam.record_bytes
    if damage == "flipped byte":
        alter(bundle.ffn_path, record + 100, bytes([bundle.ffn_path.read_bytes()[record + 100]
                                                    ^ 0x40]))
    else:
        alter(bundle.ffn_path, record, np.full(fam.record_bytes // 4, np.nan,
                                                np.float32).tobytes())
    Bundle.open(path)  # sizes and manifest unchanged: only the records tell
    with pytest.raises(BundleError, match="record 37 of neuron\\[1\\] does not match"):
        RecordChecker(bundle).check("neuron", 1, *read_layer(bundle, "neuron", 1))
    # every read is checked, not only a record's first: the checker that passed it catches it
    with pytest.raises(BundleError, match="record 37 of neuron\\[1\\] does not match"):
        checker.check("neuron", 1, *read_layer(bundle, "neuron", 1))


def test_quantized_and_calibrated_records_are_checked(tmp_path):
    """Records with padding and quantized parts (the CRC spans padding: zeros), and the
    families calibration writes."""
    from mlx_flash.calibrate import calibrate

    src = tmp_path / "tiny.gguf"
    write_llama_gguf(src, "Q4_1")
    path = tmp_path / "b"
    bundle = convert(src, path, dtype=None, progress=False, keep_quantization=True)
    bundle = calibrate(path, TESTS / "data" / "wikitext-2-valid-slice.txt", mode="hybrid",
                       tokens=256, progress=False)
    checker = RecordChecker(bundle)
    for family in ("neuron", "up", "down"):
        assert bundle.families[family].checksums == "crc32"
        for layer in range(bundle.families[family].layers):
            checker.check(family, layer, *read_layer(bundle, family, layer))
    fam = bundle.families["down"]
    alter(bundle.family_path("down"), fam.segments[0][0] + 5, b"\x7f")
    with pytest.raises(BundleError, match="record 0 of down\\[0\\]"):
        RecordChecker(bundle).check("down", 0, *read_layer(bundle, "down", 0))


def test_bundles_without_checksums_are_not_checked(tiny_bundle, tmp_path):
    path = tmp_path / "b"
    shutil.copytree(tiny_bundle, path)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["ffn"]["families"]["neuron"]["checksums"]
    write_manifest(path, manifest)
    bundle = Bundle.open(path)
    alter(bundle.ffn_path, bundle.families["neuron"].segments[0][0], b"\xff\xff")
    RecordChecker(bundle).check("neuron", 0, *read_layer(bundle, "neuron", 0))


def test_generate_on_altered_records_is_an_error(tiny_bundle, tmp_path):
    path = tmp_path / "b"
    shutil.copytree(tiny_bundle, path)
    bundle = Bundle.open(path)
    alter(bundle.ffn_path, bundle.families["neuron"].segments[0][0] + 8, b"\x00\x00\xc0\x7f")
    r = run_module("mlx_flash.generate", "--model", str(path), "--max-tokens", "2")
    assert_one_line_error(r, "does not match its checksum")


# ------------------------------------------------------------------ item 10: leftovers

KILL_AT_MANIFEST = """
import os, signal, sys
from mlx_flash import bundle_writer, calibrate
def killed(folder, manifest):
    os.kill(os.getpid(), signal.SIGKILL)
bundle_writer.write_manifest = killed
calibrate.main(sys.argv[1:])
"""


def test_calibration_killed_before_its_manifest_leaves_nothing_after_the_next(
        tiny_bundle, tmp_path):
    """calibrate killed after renaming its files into place, before writing the manifest:
    the bundle stays the old one, and the next update removes the files (the issue: a
    28 MB selection file stayed)."""
    path = tmp_path / "b"
    shutil.copytree(tiny_bundle, path)
    data = str(TESTS / "data" / "wikitext-2-valid-slice.txt")
    r = subprocess.run([sys.executable, "-c", KILL_AT_MANIFEST, str(path), "--data", data,
                        "--mode", "gate", "--tokens", "256", "--quiet"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    left = {p.name for p in path.iterdir()} - set(Bundle.open(path).manifest["files"])
    assert any(n.startswith("selection-gate-") for n in left), left  # renamed, unlisted
    from mlx_flash.calibrate import calibrate

    bundle = calibrate(path, data, mode="teal", tokens=256, progress=False)
    left = {p.name for p in path.iterdir()} - set(bundle.manifest["files"])
    assert left == {"manifest.json", ".lock", "tokenizer"}, left


KILL_IN_CONVERT = """
import os, signal, sys
from mlx_flash import convert, sources
def killed(self, dest):
    os.kill(os.getpid(), signal.SIGKILL)
sources.HFSource.save_tokenizer = killed
sources.GGUFSource.save_tokenizer = killed
if sys.argv[1] == "load":
    import mlx_flash
    mlx_flash.load(sys.argv[2])
else:
    convert.main(sys.argv[1:] + ["--quiet"])
"""


def test_staging_left_by_a_killed_convert_is_removed_by_the_next(tiny_llama, tmp_path):
    """A conversion killed outright leaves its staging folder (up to 194 MB in the issue):
    the next conversion beside it removes it, and leaves a live one alone."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", KILL_IN_CONVERT, str(tiny_llama[0]), str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    stale = [p for p in tmp_path.iterdir() if STAGING in p.name]
    assert len(stale) == 1 and (stale[0] / "ffn.bin").is_file()
    from mlx_flash.bundle_writer import staging_dir

    with staging_dir(tmp_path / "other") as live:  # what a conversion starts with
        assert not stale[0].exists()
        convert(tiny_llama[0], out, dtype="float32", progress=False)  # beside a live one
        assert live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_staging_left_by_a_killed_first_use_is_removed(tiny_llama, tmp_path, monkeypatch):
    """The same for a first use's conversion into the cache, by the next run."""
    from mlx_flash.paths import resolve_bundle

    home = tmp_path / "home"
    monkeypatch.setenv("MLX_FLASH_HOME", str(home))
    r = subprocess.run([sys.executable, "-c", KILL_IN_CONVERT, "load", str(tiny_llama[0])],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert any(STAGING in p.name for p in (home / "bundles").iterdir())
    out = resolve_bundle(tiny_llama[0], dtype="float32", progress=False)
    assert [p.name for p in (home / "bundles").iterdir()] == [out.name]


# ------------------------------------------------------------ item 7: the cache directory

@pytest.mark.parametrize("cache", ["not a folder", "full"])
def test_unwritable_cache_is_one_line_in_generate(tiny_llama, tmp_path, cache):
    home = tmp_path / "home"
    if cache == "not a folder":
        home.write_text("a file where the cache folder should be")
        preexec = None
    else:
        preexec = limits(file_size=64 << 10)  # ffn.bin is larger: EFBIG, as a full disk
    r = run_module("mlx_flash.generate", "--model", str(tiny_llama[0]), "--max-tokens", "1",
                   env={"MLX_FLASH_HOME": str(home)}, preexec=preexec)
    assert_one_line_error(r, "cannot convert", "MLX_FLASH_HOME")
    if cache == "full":
        assert not [p for p in (home / "bundles").iterdir()]


def test_sane_limits_are_past_real_models():
    """The limits refuse nothing real: Llama 3.1 405B's config passes."""
    from mlx_flash.arch import check_config

    check_config({**TINY_LLAMA, "hidden_size": 16384, "intermediate_size": 53248,
                  "num_hidden_layers": 126, "num_attention_heads": 128,
                  "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                  "max_position_embeddings": 131072, "rope_theta": 500000.0,
                  "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]})
