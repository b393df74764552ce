"""The sparse-FFN kernels: the reference against NumPy in float64, dispatch, and the Metal and
CUDA kernels against the reference where their backend is available (skipped elsewhere).

Inputs are made in their dtype, so they are exact there; NumPy computes on the float64 values
of those same inputs. The errors left are float32 accumulation and, in the reference, the
rounding of 16-bit dot products to their dtype (it multiplies in the rows' dtype, which MLX's
CPU backend does 2.5x faster): outputs are compared with `atol = (TOL + 4 u) * scale`,
`scale` being the largest sum of |terms| an output adds (an error bound that holds whatever
cancellation the random data has), and `rtol = TOL + u`, u the dtype's unit roundoff (0 for
float32 rows; the GPU kernels, accumulating in float32, are held to the same bound).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from gpu_emulator import COMPILER, Emulator

from mlx_flash import kernels
from mlx_flash.kernels import cuda, gpu, metal, reference

TOL = 1e-4  # float32 accumulation errors measured here stay below 1e-7 of the scale
ROUNDOFF = {mx.float16: 2.0**-11, mx.bfloat16: 2.0**-8, mx.float32: 0.0}
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
SHAPES = [(8, 1), (8, 7), (64, 64), (96, 7), (96, 64)]  # (d, C)
VARIANTS = [("glu", "silu"), ("glu", "relu"), ("glu", "fatrelu"), ("glu", "drelu"),
            ("mlp", "relu")]


def counts(c: int) -> list[int]:
    """Selected counts: none, one, about half, all."""
    return sorted({0, 1, c // 2, c})


def as_np(a: mx.array) -> np.ndarray:
    """float64 values of `a` (bfloat16 goes through float32: NumPy has no bfloat16)."""
    return np.array(a.astype(mx.float32)).astype(np.float64)


def make(d: int, c: int, dtype: mx.Dtype, seed: int) -> tuple[mx.array, dict[str, mx.array]]:
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal(d).astype(np.float32)).astype(dtype)
    parts = {p: mx.array(rng.standard_normal((c, d)).astype(np.float32)).astype(dtype)
             for p in ("gate", "up", "down")}
    parts["up_bias"] = mx.array(rng.standard_normal((c, 1)).astype(np.float32)).astype(dtype)
    return x, parts


def pick(c: int, k: int, seed: int) -> mx.array:
    """k distinct slots of C in random order."""
    return mx.array(np.random.default_rng(seed).permutation(c)[:k].astype(np.int32))


def safe_threshold(pre: np.ndarray) -> float:
    """A FATReLU threshold near 0.5 that no pre-activation comes within 1e-3 of, so float32
    rounding cannot flip a neuron across the jump of the activation."""
    t = 0.5
    while np.any(np.abs(pre - t) < 1e-3):
        t += 1e-2
    return t


def numpy_ffn(x: np.ndarray, p: dict[str, np.ndarray], s: np.ndarray, kind: str,
              activation: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(y, scale): the FFN in float64 and, per output, the sum of |terms| it adds."""
    if kind == "mlp":
        pre = p["up"][s] @ x + p["up_bias"][s, 0]
        h = np.maximum(pre, 0)
        mag_h = np.abs(p["up"][s]) @ np.abs(x) + np.abs(p["up_bias"][s, 0])
    else:
        g, u = p["gate"][s] @ x, p["up"][s] @ x
        if activation == "silu":
            a = g / (1 + np.exp(-g))
        elif activation == "fatrelu":
            a = np.where(g > threshold, g, 0)
        else:
            a = np.maximum(g, 0)
        if activation == "drelu":
            u = np.maximum(u, 0)
        h = a * u
        mag_h = (np.abs(p["gate"][s]) @ np.abs(x)) * (np.abs(p["up"][s]) @ np.abs(x))
    return h @ p["down"][s], mag_h @ np.abs(p["down"][s])


def check(got: mx.array, want: np.ndarray, scale: np.ndarray,
          rows: mx.Dtype = mx.float32) -> None:
    """`got` within the bound above, `rows` being the dtype dot products were taken in."""
    assert got.dtype == mx.float32
    assert got.shape == want.shape
    u = ROUNDOFF[rows]
    atol = (TOL + 4 * u) * (scale.max() if scale.size else 0.0)
    np.testing.assert_allclose(np.array(got), want, rtol=TOL + u, atol=atol)


@pytest.fixture
def use_reference(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "reference")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("d", "c"), SHAPES)
def test_gather_matvec_and_accumulate(use_reference, dtype, d, c):
    x, parts = make(d, c, DTYPES[dtype], seed=d * 100 + c)
    rows, xn = as_np(parts["gate"]), as_np(x)
    for k in counts(c):
        slots = pick(c, k, seed=k)
        s = np.array(slots)
        check(kernels.gather_matvec(x, parts["gate"], slots), rows[s] @ xn,
              np.abs(rows[s]) @ np.abs(xn) if k else np.zeros(0), DTYPES[dtype])
        h = mx.array(np.random.default_rng(k).standard_normal(k).astype(np.float32))
        hn = as_np(h)
        check(kernels.gather_accumulate(h, parts["gate"], slots), hn @ rows[s],
              np.abs(hn) @ np.abs(rows[s]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("d", "c"), SHAPES)
@pytest.mark.parametrize(("kind", "activation"), VARIANTS)
def test_sparse_ffn_matches_numpy(use_reference, dtype, d, c, kind, activation):
    x, parts = make(d, c, DTYPES[dtype], seed=d * 100 + c)
    xn, pn = as_np(x), {name: as_np(v) for name, v in parts.items()}
    threshold = safe_threshold(pn["gate"] @ xn) if activation == "fatrelu" else 0.0
    if kind == "mlp":
        del parts["gate"]
    for k in counts(c):
        slots = pick(c, k, seed=c + k)
        want, scale = numpy_ffn(xn, pn, np.array(slots), kind, activation, threshold)
        got = kernels.sparse_ffn(x, parts, slots, kind, activation, threshold)
        check(got, want, scale, DTYPES[dtype])
        if k == 0:
            assert not np.any(np.array(got))


def test_bad_arguments_are_refused(use_reference):
    x, parts = make(8, 4, mx.float32, seed=0)
    slots = pick(4, 2, seed=0)
    with pytest.raises(ValueError, match="kind"):
        kernels.sparse_ffn(x, parts, slots, "moe", "relu")
    with pytest.raises(ValueError, match="activation"):
        kernels.sparse_ffn(x, parts, slots, "mlp", "drelu")
    with pytest.raises(ValueError, match="needs parts"):
        kernels.sparse_ffn(x, {"up": parts["up"], "down": parts["down"]}, slots, "glu", "silu")
    with pytest.raises(ValueError, match="one dtype"):
        kernels.sparse_ffn(x, {**parts, "up": parts["up"].astype(mx.float16)}, slots, "glu",
                           "silu")
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        kernels.gather_matvec(x, parts["up"].astype(mx.int32), slots)


# Dispatch


def test_default_backend(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    gpu_default = mx.default_device().type == mx.DeviceType.gpu
    expected = ("metal" if kernels.available("metal")
                else "cuda" if kernels.available("cuda") and gpu_default else "reference")
    assert kernels.backend() == expected


def test_forced_reference(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "reference")
    assert kernels.backend() == "reference"
    x, parts = make(8, 4, mx.float32, seed=1)
    assert kernels.sparse_ffn(x, parts, pick(4, 3, seed=1), "glu", "silu").shape == (8,)


@pytest.mark.parametrize(("name", "what"), [("metal", "Metal"), ("cuda", "CUDA")])
def test_forcing_an_unavailable_backend_raises(monkeypatch, name, what):
    if kernels.available(name):
        pytest.skip(f"{name} is available here: forcing it is allowed")
    monkeypatch.setenv(kernels.ENV, name)
    message = f"{kernels.ENV}={name} but .*{what}.* is not available on this machine"
    with pytest.raises(RuntimeError, match=message):
        kernels.backend()
    x, parts = make(8, 4, mx.float32, seed=2)
    with pytest.raises(RuntimeError, match=message):
        kernels.sparse_ffn(x, parts, pick(4, 2, seed=2), "glu", "silu")


def test_unknown_backend_raises(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "opencl")
    with pytest.raises(RuntimeError, match="MLX_FLASH_KERNEL=opencl is not one of"):
        kernels.backend()


# The GPU kernels: built here (where the backend allows it), run only on their backend.

GPU = {"metal": metal, "cuda": cuda}


@pytest.mark.parametrize("name", GPU)
def test_kernel_sources_name_their_inputs(name):
    module = GPU[name]
    assert set(module.BODIES) == set(gpu.SIGNATURES)
    for source in (module.HEADER, *module.BODIES.values()):
        assert source.count("{") == source.count("}")
        assert source.count("(") == source.count(")")
    for which, (inputs, outputs) in gpu.SIGNATURES.items():
        for n in inputs + outputs:
            body = module.BODIES[which]
            assert f"{n}[" in body or f"{n} +" in body, f"{name} {which}: {n} is never used"
    for code in ("FLASH_GROUP", "FLASH_KIND_GLU", "FLASH_KIND_MLP", "FLASH_ACT_SILU",
                 "FLASH_ACT_FATRELU", "FLASH_ACT_DRELU"):
        assert f"int {code} = " in module.HEADER


@pytest.mark.parametrize("name", GPU)
def test_kernels_build(name):
    try:
        kernel = GPU[name].KERNELS.kernel("rows")
    except RuntimeError as e:  # mx.fast.cuda_kernel needs the CUDA backend even to build
        pytest.skip(f"{name} kernels cannot be built here: {e}")
    assert callable(kernel)
    assert GPU[name].KERNELS.kernel("rows") is kernel  # built once, cached
    for which in gpu.SIGNATURES:
        assert callable(GPU[name].KERNELS.kernel(which))


def assert_matches_reference(run, d: int, c: int, dtype: str, ks: list[int],
                             variants=VARIANTS) -> None:
    """`run(fn, *args)` (an implementation's gather_matvec, gather_accumulate, sparse_ffn)
    against the reference, for `ks` selected of `c` rows of width `d`."""
    x, parts = make(d, c, DTYPES[dtype], seed=d + c)
    xn, pn = as_np(x), {p: as_np(v) for p, v in parts.items()}
    threshold = safe_threshold(pn["gate"] @ xn)
    for k in ks:
        slots = pick(c, k, seed=k)
        s = np.array(slots)
        calls = [(("gather_matvec", x, parts["up"], slots), np.abs(pn["up"][s]) @ np.abs(xn))]
        h = reference.gather_matvec(x, parts["gate"], slots)
        calls.append((("gather_accumulate", h, parts["down"], slots),
                      np.abs(np.array(h)) @ np.abs(pn["down"][s])))
        for kind, activation in variants:
            p = {n: v for n, v in parts.items() if not (kind == "mlp" and n == "gate")}
            calls.append((("sparse_ffn", x, p, slots, kind, activation, threshold),
                          numpy_ffn(xn, pn, s, kind, activation, threshold)[1]))
        for args, scale in calls:
            want = getattr(reference, args[0])(*args[1:])
            check(run(*args), np.array(want), scale, x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("d", "c"), [(8, 1), (96, 7), (576, 300), (4096, 1024)])
@pytest.mark.parametrize("name", GPU)
def test_gpu_kernels_match_reference(monkeypatch, name, dtype, d, c):
    if not kernels.available(name):
        pytest.skip(f"{name} backend not available on this machine")
    monkeypatch.setenv(kernels.ENV, name)
    assert_matches_reference(lambda fn, *args: getattr(kernels, fn)(*args), d, c, dtype,
                             counts(c))


def quantized_rows(d: int, c: int, bits: int, group_size: int, dtype: str,
                   seed: int) -> tuple[tuple[mx.array, mx.array, mx.array], np.ndarray]:
    """Random rows quantized by MLX, and their values in float64 unpacked by NumPy (the
    packing, independently: value e of a uint32 word in bits e·bits..), checked against
    mx.dequantize."""
    w = mx.array(np.random.default_rng(seed).standard_normal((c, d)).astype(np.float32))
    packed, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    scales, biases = scales.astype(DTYPES[dtype]), biases.astype(DTYPES[dtype])
    words = np.array(packed).astype(np.uint64)
    per_word = 32 // bits
    q = np.stack([(words >> (e * bits)) & ((1 << bits) - 1) for e in range(per_word)], -1)
    q = q.reshape(c, d).astype(np.float64)
    groups = np.arange(d) // group_size
    values = as_np(scales)[:, groups] * q + as_np(biases)[:, groups]
    np.testing.assert_allclose(values, as_np(mx.dequantize(
        packed, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group_size,
        bits=bits)), rtol=1e-6, atol=1e-6)
    return (packed, scales, biases), values


def assert_quantized_matches_numpy(implementation, bits: int, group_size: int, dtype: str,
                                   d: int | None = None, c: int = 20) -> None:
    """`implementation`'s gather_qmatvec and gather_qaccumulate against NumPy (d: two groups
    unless given)."""
    d = d or 2 * group_size
    q, values = quantized_rows(d, c, bits, group_size, dtype, seed=bits + group_size)
    rng = np.random.default_rng(bits)
    x = mx.array(rng.standard_normal(d).astype(np.float32))
    for k in sorted({1, 17, c}):
        slots = pick(c, k, seed=k)
        s = np.array(slots)
        rows = values[s]
        got = implementation.gather_qmatvec(x, q, slots, bits, group_size)
        check(got, rows @ as_np(x), np.abs(rows) @ np.abs(as_np(x)))
        h = mx.array(rng.standard_normal(k).astype(np.float32))
        got = implementation.gather_qaccumulate(h, q, slots, bits, group_size)
        check(got, as_np(h) @ rows, np.abs(as_np(h)) @ np.abs(rows))


QUANTIZED = [(4, 64, "bfloat16"), (8, 32, "float16"), (2, 128, "float32")]


@pytest.mark.parametrize(("bits", "group_size", "dtype"), QUANTIZED)
@pytest.mark.parametrize("name", GPU)
def test_gpu_quantized_kernels_match_numpy(monkeypatch, name, bits, group_size, dtype):
    if not kernels.available(name):
        pytest.skip(f"{name} backend not available on this machine")
    monkeypatch.setenv(kernels.ENV, name)
    assert_quantized_matches_numpy(kernels, bits, group_size, dtype)


@pytest.mark.parametrize(("bits", "group_size", "dtype"), QUANTIZED + [(3, 32, "float32")])
def test_reference_quantized_matches_numpy(use_reference, bits, group_size, dtype):
    """The reference path (MLX's quantized_matmul), and the public functions' dispatch: 3 bits
    (packed across words) go to the reference on every backend."""
    if bits == 3:
        d, c = 256, 8
        packed, scales, biases = mx.quantize(mx.ones((c, d)), group_size=group_size, bits=3)
        assert kernels._quantized_implementation((packed, scales, biases), 3) is reference
        return
    assert_quantized_matches_numpy(kernels, bits, group_size, dtype)


# The GPU kernel bodies run on this CPU by tests/gpu_emulator.py (g++): their arithmetic,
# indexing, packing, reductions and guards against the reference, wherever the tests run.
# Not the Metal or CUDA compilers: see the emulator's docstring.


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    if COMPILER is None:
        pytest.skip("g++ is not installed: the GPU kernel bodies cannot be emulated")
    work = tmp_path_factory.mktemp("emulated")

    def two_pass(name: str, bodies: dict[str, str]) -> gpu.TwoPass:
        module = GPU[name]
        label = f"{name}-emulated-{abs(hash(tuple(bodies.values())))}"
        return gpu.TwoPass(label, Emulator(name, work).make, module.HEADER, bodies,
                           module.KERNELS.split)

    return two_pass


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", GPU)
def test_emulated_gpu_kernels_match_reference(emulated, name, dtype):
    """Every variant once across the dtypes (each instantiation is one g++ compile)."""
    i = list(DTYPES).index(dtype)
    variants = [VARIANTS[j % len(VARIANTS)] for j in (2 * i, 2 * i + 1)]
    implementation = emulated(name, GPU[name].BODIES)
    for d, c in [(8, 1), (96, 21)]:  # d under a SIMD group; k over a threadgroup's rows
        assert_matches_reference(lambda fn, *args: getattr(implementation, fn)(*args), d, c,
                                 dtype, [k for k in counts(c) if k], variants)


@pytest.mark.parametrize(("bits", "group_size", "dtype"), QUANTIZED)
@pytest.mark.parametrize("name", GPU)
def test_emulated_quantized_kernels_match_numpy(emulated, name, bits, group_size, dtype):
    assert_quantized_matches_numpy(emulated(name, GPU[name].BODIES), bits, group_size, dtype)
    if bits == 4:  # lanes taking several words each (144 words), k past CUDA's 32 slices
        assert_quantized_matches_numpy(emulated(name, GPU[name].BODIES), bits, group_size,
                                       dtype, d=1152, c=70)


@pytest.mark.parametrize("name", GPU)
def test_emulator_catches_broken_kernels(emulated, name):
    """The emulation can fail: a body reading the wrong bits gives wrong numbers, and one whose
    threads leave before a SIMD reduction or a threadgroup barrier is refused."""
    bodies = GPU[name].BODIES
    wrong_bits = emulated(name, dict(bodies, qrows=bodies["qrows"].replace(
        "(e * BITS)", "(e * BITS + 1)")))
    with pytest.raises(AssertionError):
        assert_quantized_matches_numpy(wrong_bits, 4, 64, "float32")
    diverging = emulated(name, dict(bodies, rows=bodies["rows"].replace(
        "if (row >= k) {", "if (row >= k || lane >= 16) {")))
    x, parts = make(64, 8, mx.float32, seed=3)
    with pytest.raises(RuntimeError, match="SIMD reduction or barrier"):
        diverging.gather_matvec(x, parts["up"], pick(8, 5, seed=3))
    early = "  if (j >= d) {\n    return;\n  }\n"  # threads leaving before the barrier
    body = bodies["accumulate"]
    at = body.index("  float acc = 0.0f;")
    leaving = emulated(name, dict(bodies, accumulate=body[:at] + early + body[at:]))
    _, narrow = make(40, 8, mx.float32, seed=4)  # 40 columns: 24 threads of 64 leave
    with pytest.raises(RuntimeError, match="SIMD reduction or barrier"):
        leaving.gather_accumulate(mx.ones((5,)), narrow["up"], pick(8, 5, seed=3))
