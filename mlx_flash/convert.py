"""Convert a model (GGUF file, Hugging Face / mlx-lm folder) into a flash bundle.

    python -m mlx_flash.convert SRC OUT [--dtype float16|bfloat16|float32] [--format ...]

Resident tensors (embeddings, attention, norms) are kept; each layer's FFN becomes one segment
of neuron records (row-column bundling). `--format mlx-lm` instead writes a plain dense mlx-lm
folder of the same weights, the reference the bundle is checked against.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from tqdm import tqdm

from .arch import (
    Architecture,
    FFNSpec,
    QuantizedTensor,
    UnsupportedModel,
    Weight,
    get_architecture,
    pack_records,
    record_tensors,
)
from .arch.base import check_finite, mlx_lm_quantization, resident_arrays
from .arch.moe import is_moe
from .bundle import DTYPES, EXPERTS, ITEMSIZE, Bundle, Quantization
from .bundle_writer import BundleWriter, publish_dir, staging_dir
from .convert_moe import convert_moe
from .errors import BundleError, ConversionError
from .hub import is_hub_id, resolve_hub_model
from .loader import build_flash_model, default_dtype
from .sources import SourceError, open_source


def _plan(source) -> tuple[dict[str, Any], Architecture, dict[str, str]]:
    """The bundle config, the architecture, and canonical name -> source name."""
    config = dict(source.config)
    arch = get_architecture(config)
    names = {arch.canonical_name(n): n for n in source.names()}
    # Each layer has tensors of its own: more layers than tensors is a damaged config, refused
    # before anything is sized by the number of layers.
    if config["num_hidden_layers"] > len(names):
        raise ConversionError(f"{source.path.name}: its config claims "
                              f"{config['num_hidden_layers']} layers, its weights are "
                              f"{len(names)} tensors")
    config.setdefault("tie_word_embeddings", "lm_head.weight" not in names)
    arch.ffn_spec(config)  # re-check with the completed config
    return config, arch, names


def _ffn_quantization(source, spec: FFNSpec, roles: dict[str, str], keep: bool,
                      quantize: Quantization | None, down_bits: int | None
                      ) -> dict[str, Quantization]:
    """How the records store each FFN tensor: as asked (`quantize`), or as the source stores
    it (`keep`; layer 0 decides). The down projection is quantized along d, at `down_bits`
    (default: as the rest); a kept source's down, whose quantization runs across neurons, is
    stored as float (exact) unless `down_bits` asks to requantize it. 16: float."""
    out: dict[str, Quantization] = {}
    for t in ("gate", "up", "down"):
        if t not in roles:
            continue
        if quantize is not None:
            q = quantize
        else:
            w = source.get_weight(roles[t]) if keep else None
            if not isinstance(w, QuantizedTensor):
                continue
            q = Quantization(w.bits, w.group_size)
        if t == "down" and (down_bits == 16 or (down_bits is None and quantize is None)):
            continue  # float: exact (the source's blocks run across neurons)
        out[t] = Quantization(down_bits or q.bits, q.group_size) if t == "down" else q
    return out


def _auto_dtype(source, arch: Architecture, names: dict[str, str], keep: bool) -> str:
    """float16 when a quantized source's quantization is kept (GGUF's scales are float16),
    else the platform's default."""
    up = names[arch.ffn_source_names(0)["up"]]
    if keep and isinstance(source.get_weight(up), QuantizedTensor):
        return "float16"
    return default_dtype()


def bundle_bytes(source, dtype: str | None) -> int:
    """About how many bytes converting `source` to `dtype` writes (None: as `resolve_bundle`
    converts, a quantized tensor kept as stored but the down projection, which is stored as
    float16; float tensors in 16 bits), from the source's headers alone."""
    itemsize = ITEMSIZE[dtype] if dtype else 2
    total = 0
    for name, (elements, stored) in source.tensor_sizes().items():
        kept = dtype is None and stored < elements * itemsize and "down" not in name
        total += stored if kept else elements * itemsize
    return total


def convert(src: str | Path, out: str | Path, dtype: str | None = "float16",
            progress: bool = True,
            quantize: Quantization | None = None, keep_quantization: bool = False,
            down_bits: int | None = None) -> Bundle:
    """Convert `src` into a new bundle at `out` (which must not exist).

    Weights are stored as `dtype`, dequantized, unless `quantize` asks for MLX affine
    quantization (FFN records, attention and embeddings, like mlx-lm) or `keep_quantization`
    keeps a quantized source's own (GGUF Q4_0/Q4_1/Q8_0, mlx-lm folders) bit for bit where
    the layout allows: everywhere but the down projection, which is stored as float, exact,
    or with `down_bits` requantized along d (docs/FORMAT.md). `dtype` None: float16 when a source's
    quantization is kept (GGUF's scales are float16), else `default_dtype()`."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    source = open_source(src)
    if is_moe(source.config):
        if quantize is not None or down_bits is not None:
            raise ValueError("an MoE model's experts are stored as its source stores them: "
                             "quantize it with mlx-lm first")
        return convert_moe(source, out, dtype, progress)
    config, arch, names = _plan(source)
    spec = arch.ffn_spec(config)
    n_layers = int(config["num_hidden_layers"])
    ffn_names = {i: arch.ffn_source_names(i) for i in range(n_layers)}
    in_ffn = {n for roles in ffn_names.values() for n in roles.values()}
    missing = sorted(in_ffn - names.keys())
    if missing:
        raise ConversionError(f"{source.path.name} lacks FFN tensors, e.g. {missing[0]}")
    # Every resident tensor must be a parameter of the flash model, and vice versa.
    # sorted: a source converts to the same bytes in every process (a set's order is not)
    resident = {t: n for n in sorted(names.keys() - in_ffn)
                if (t := arch.resident_name(n, config)) is not None}
    if spec.down_bias:
        resident.update({f"{arch.layer_prefix(i)}.mlp.bias": ffn_names[i]["down_bias"]
                         for i in range(n_layers)})
    model = build_flash_model(arch, config, spec, None)
    expected = dict(tree_flatten(model.parameters()))
    if resident.keys() != expected.keys():
        extra = sorted(resident.keys() - expected.keys())
        lacking = sorted(expected.keys() - resident.keys())
        raise ConversionError(f"{source.path.name} does not match the {arch.name} model: "
                              f"unexpected tensors {extra[:3]}, missing {lacking[:3]}")
    quantizable = {f"{path}.weight" for path, m in model.named_modules()
                   if hasattr(m, "to_quantized")}
    keep = keep_quantization or quantize is not None

    d, n = spec.hidden_size, spec.intermediate_size
    ffn_shapes = {"gate": (n, d), "up": (n, d), "down": (d, n), "up_bias": (n,)}

    def get(name: str, shape: tuple[int, ...], quantized: bool = False) -> Weight:
        w = source.get_weight(names[name]) if quantized else source.get(names[name])
        if tuple(w.shape) != tuple(shape):
            raise ConversionError(f"{name} has shape {tuple(w.shape)}, the model expects "
                                  f"{tuple(shape)}")
        check_finite(name, w)
        return w

    ffn_q = _ffn_quantization(source, spec, {r: names[v] for r, v in ffn_names[0].items()},
                              keep, quantize, down_bits)
    dtype = dtype or _auto_dtype(source, arch, names, keep)
    parts, record_bytes = spec.record_layout(dtype, ffn_q)
    quantized: dict[str, Quantization] = {}  # resident module -> its quantization
    with BundleWriter(out, architecture=arch.name, config=config, dtype=dtype,
                      source=source.describe()) as writer, \
            tqdm(total=len(resident) + n_layers, unit="tensor", disable=not progress,
                 desc=f"converting {source.path.name}") as bar:
        for target, name in resident.items():
            w = get(name, expected[target].shape, keep and target in quantizable)
            if isinstance(w, mx.array) and quantize is not None and target in quantizable \
                    and w.shape[-1] % quantize.group_size == 0:
                w = QuantizedTensor(*mx.quantize(w, quantize.group_size, quantize.bits),
                                    quantize.bits, quantize.group_size)
            for k, a in resident_arrays(target, w, quantized).items():
                writer.add_resident(k, a)
            bar.update()
        if quantized:
            config["quantization"] = mlx_lm_quantization(quantized)
        writer.add_family("neuron", spec.intermediate_size, parts, record_bytes, ffn_q)
        for i in range(n_layers):
            w = {role: get(n, ffn_shapes[role], role in ffn_q) for role, n in ffn_names[i].items()
                 if role != "down_bias"}
            writer.write_segment("neuron", i, pack_records(
                parts, record_bytes, record_tensors(spec, w, dtype, ffn_q)))
            bar.update()
        source.save_tokenizer(writer.tokenizer_dir)
        return writer.commit()


def export_mlx_lm(src: str | Path, out: str | Path, dtype: str | None = "float16",
                  progress: bool = True, keep_quantization: bool = False) -> Path:
    """Write `src` as a plain, dense mlx-lm folder (config.json, model.safetensors, tokenizer)
    holding exactly the weights a bundle converted with the same dtype holds; with
    `keep_quantization`, a quantized source's weights as it stores them (an mlx-lm quantized
    model: the reference for quantized bundles)."""
    source = open_source(src)
    if is_moe(source.config):
        raise ConversionError(
            f"--format mlx-lm exports dense models only, and {source.path.name} is a "
            f"{source.config['model_type']} Mixture-of-Experts model: "
            + ("this folder already is one mlx-lm loads (mlx_lm.load takes it as it is)"
               if source.kind == "hf" else "mlx-lm does not read GGUF experts")
            + "; without --format it converts into a flash bundle")
    config, arch, names = _plan(source)
    if arch.name != "llama" or arch.ffn_spec(config).activation != "silu":
        raise ConversionError("mlx-lm has no equivalent of this model (it has no OPT, and its "
                              "llama computes SiLU only): no mlx-lm folder to write")
    dtype = dtype or _auto_dtype(source, arch, names, keep_quantization)
    weights, quantized = {}, {}
    for name in tqdm(names, unit="tensor", desc="exporting", disable=not progress):
        target = arch.resident_name(name, config)
        if target is None:
            continue
        w = source.get_weight(names[name]) if keep_quantization else source.get(names[name])
        check_finite(name, w)
        weights.update({k: a.astype(DTYPES[dtype]) if mx.issubdtype(a.dtype, mx.floating) else a
                        for k, a in resident_arrays(target, w, quantized).items()})
    if quantized:
        config["quantization"] = mlx_lm_quantization(quantized)
    out = Path(out)
    with staging_dir(out) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        source.save_tokenizer(tmp)
        publish_dir(tmp, out)
    return out


def _how(quantization: dict[str, Quantization], dtype: str) -> str:
    """How records store their tensors: `dtype`, or each quantized one's bits and group size
    (once when all are alike), the rest `dtype`."""
    if not quantization:
        return dtype
    kinds = {(q.bits, q.group_size) for q in quantization.values()}
    if len(kinds) == 1:
        ((bits, group),) = kinds
        return f"{bits}-bit/{group}, scales {dtype}"
    return ", ".join(f"{t} {q.bits}-bit/{q.group_size}" for t, q in quantization.items()) \
        + f", scales {dtype}"


def summary(b: Bundle) -> str:
    """The line the command prints for a bundle it wrote: resident bytes, and the FFN records
    (dense: neurons; MoE: experts per layer, each layer's bytes) and how they are stored."""
    head = f"wrote bundle {b.path}: resident {b.resident_bytes / 1e6:.1f} MB"
    if "neuron" in b.families:
        q = b.families["neuron"].quantization
        how = ", ".join(f"{t} {v.bits}-bit/{v.group_size}" for t, v in q.items()) or b.dtype
        return f"{head}, FFN records {b.ffn_bytes / 1e6:.1f} MB ({how})"
    fam = b.families[EXPERTS]
    layers = sum(1 for _, length in fam.segments if length)
    return (f"{head}, {fam.count} experts in each of {layers} layers, "
            f"{fam.count * fam.record_bytes / 1e6:.1f} MB per layer "
            f"({_how(fam.quantization, fam.dtype)}), {b.ffn_bytes / 1e6:.1f} MB in all")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_flash.convert",
        description="Convert a model into a flash bundle: resident weights (embeddings, "
        "attention, norms) plus FFN neuron records that are read from flash on demand.")
    parser.add_argument("src", help="a GGUF file (llama/qwen2, any GGML tensor type; "
                        "qwen3_moe and mixtral with experts), a Hugging Face / mlx-lm model folder "
                        "(llama, mistral, qwen2, opt; the "
                        "Mixture-of-Experts models mlx-lm runs: qwen3_moe, qwen2_moe, mixtral, "
                        "olmoe, deepseek_v2, deepseek_v3), or a Hugging Face hub id (org/name"
                        "[@revision], org/repo:Q4_K_M for a repository of GGUF files)")
    parser.add_argument("out", help="the bundle folder to create (must not exist)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="dtype of the stored float weights. Given, a quantized source is "
                        "dequantized to it; not given, a quantized source (GGUF Q4_0/Q4_1/Q8_0, "
                        "an mlx-lm quantized folder) keeps its quantization, scales in float16, "
                        "and a float one becomes float16 where Metal runs, else bfloat16, which "
                        "MLX's CPU backend computes about twice as fast")
    parser.add_argument("--quantize", action="store_true",
                        help="store FFN records, attention and embeddings with MLX's affine "
                        "quantization (a quantized source's own is kept where it already is)")
    parser.add_argument("--q-bits", type=int, default=4, choices=[2, 3, 4, 5, 6, 8],
                        help="bits per weight with --quantize (default 4)")
    parser.add_argument("--q-group-size", type=int, default=64, choices=[32, 64, 128],
                        help="weights per scale and bias with --quantize (default 64)")
    parser.add_argument("--down-bits", type=int, default=None, choices=[2, 3, 4, 5, 6, 8, 16],
                        help="bits of the down projection in quantized records, quantized "
                        "along the model dimension (default: as the rest with --quantize; "
                        "a kept source's down is stored as float16, exactly, unless this "
                        "asks to requantize it; 16: float)")
    parser.add_argument("--format", choices=["bundle", "mlx-lm"], default="bundle",
                        help="'mlx-lm' writes a dense mlx-lm folder instead, for comparison")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    keep = args.dtype is None and not args.quantize
    quantize = Quantization(args.q_bits, args.q_group_size) if args.quantize else None
    try:
        # org/name[@revision][:tag], when it is not a path: fetched as mlx-lm and llama.cpp do
        src = resolve_hub_model(args.src) if is_hub_id(args.src) else args.src
        if args.format == "mlx-lm":
            export_mlx_lm(src, args.out, args.dtype, progress=not args.quiet,
                          keep_quantization=keep)
            print(f"wrote mlx-lm folder {args.out}")
        else:
            b = convert(src, args.out, args.dtype, progress=not args.quiet,
                        quantize=quantize, keep_quantization=keep, down_bits=args.down_bits)
            print(summary(b))
    except (SourceError, UnsupportedModel, ConversionError, BundleError, FileExistsError,
            OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
