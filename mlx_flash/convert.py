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

from .arch import Architecture, UnsupportedModel, get_architecture, make_records
from .bundle import DTYPES, Bundle, BundleError, BundleWriter, publish_dir, staging_dir
from .loader import build_flash_model, default_dtype
from .sources import SourceError, open_source


class ConversionError(Exception):
    """The source's tensors do not match what its architecture needs."""


def _plan(source) -> tuple[dict[str, Any], Architecture, dict[str, str]]:
    """The bundle config, the architecture, and canonical name -> source name."""
    config = dict(source.config)
    arch = get_architecture(config)
    names = {arch.canonical_name(n): n for n in source.names()}
    config.setdefault("tie_word_embeddings", "lm_head.weight" not in names)
    arch.ffn_spec(config)  # re-check with the completed config
    return config, arch, names


def convert(src: str | Path, out: str | Path, dtype: str = "float16",
            progress: bool = True) -> Bundle:
    """Convert `src` into a new bundle at `out` (which must not exist)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    source = open_source(src)
    config, arch, names = _plan(source)
    spec = arch.ffn_spec(config)
    n_layers = int(config["num_hidden_layers"])
    ffn_names = {i: arch.ffn_source_names(i) for i in range(n_layers)}
    in_ffn = {n for roles in ffn_names.values() for n in roles.values()}
    missing = sorted(in_ffn - names.keys())
    if missing:
        raise ConversionError(f"{source.path.name} lacks FFN tensors, e.g. {missing[0]}")
    # Every resident tensor must be a parameter of the flash model, and vice versa.
    resident = {t: n for n in names.keys() - in_ffn
                if (t := arch.resident_name(n, config)) is not None}
    if spec.down_bias:
        resident.update({f"{arch.layer_prefix(i)}.mlp.bias": ffn_names[i]["down_bias"]
                         for i in range(n_layers)})
    expected = dict(tree_flatten(build_flash_model(arch, config, spec, None).parameters()))
    if resident.keys() != expected.keys():
        extra = sorted(resident.keys() - expected.keys())
        lacking = sorted(expected.keys() - resident.keys())
        raise ConversionError(f"{source.path.name} does not match the {arch.name} model: "
                              f"unexpected tensors {extra[:3]}, missing {lacking[:3]}")

    d, n = spec.hidden_size, spec.intermediate_size
    ffn_shapes = {"gate": (n, d), "up": (n, d), "down": (d, n), "up_bias": (n,)}

    def get(name: str, shape: tuple[int, ...]) -> mx.array:
        w = source.get(names[name])
        if tuple(w.shape) != tuple(shape):
            raise ConversionError(f"{name} has shape {tuple(w.shape)}, the model expects "
                                  f"{tuple(shape)}")
        return w

    parts, stride = spec.record_layout()
    with BundleWriter(out, architecture=arch.name, config=config, dtype=dtype,
                      source=source.describe()) as writer, \
            tqdm(total=len(resident) + n_layers, unit="tensor", disable=not progress,
                 desc=f"converting {source.path.name}") as bar:
        for target, name in resident.items():
            writer.add_resident(target, get(name, expected[target].shape))
            bar.update()
        writer.add_family("neuron", spec.intermediate_size, parts, stride)
        for i in range(n_layers):
            w = {role: get(n, ffn_shapes[role]) for role, n in ffn_names[i].items()
                 if role != "down_bias"}
            writer.write_segment("neuron", i, make_records(spec, w))
            bar.update()
        source.save_tokenizer(writer.tokenizer_dir)
        return writer.commit()


def export_mlx_lm(src: str | Path, out: str | Path, dtype: str = "float16",
                  progress: bool = True) -> Path:
    """Write `src` as a plain, dense mlx-lm folder (config.json, model.safetensors, tokenizer)
    holding exactly the weights a bundle converted with the same dtype holds."""
    source = open_source(src)
    config, arch, names = _plan(source)
    if arch.name != "llama" or arch.ffn_spec(config).activation != "silu":
        raise ConversionError("mlx-lm has no equivalent of this model (it has no OPT, and its "
                              "llama computes SiLU only): no mlx-lm folder to write")
    weights = {}
    for name in tqdm(names, unit="tensor", desc="exporting", disable=not progress):
        target = arch.resident_name(name, config)
        if target is not None:
            weights[target] = source.get(names[name]).astype(DTYPES[dtype])
    out = Path(out)
    with staging_dir(out) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        source.save_tokenizer(tmp)
        publish_dir(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_flash.convert",
        description="Convert a model into a flash bundle: resident weights (embeddings, "
        "attention, norms) plus FFN neuron records that are read from flash on demand.")
    parser.add_argument("src", help="a GGUF file (llama/qwen2, any GGML tensor type), or a "
                        "Hugging Face / mlx-lm model folder (llama, mistral, qwen2, opt)")
    parser.add_argument("out", help="the bundle folder to create (must not exist)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="dtype of the stored weights; quantized sources are dequantized "
                        "to it (default: float16 where Metal runs, else bfloat16, which MLX's "
                        "CPU backend computes about twice as fast)")
    parser.add_argument("--format", choices=["bundle", "mlx-lm"], default="bundle",
                        help="'mlx-lm' writes a dense mlx-lm folder instead, for comparison")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or default_dtype()
    try:
        if args.format == "mlx-lm":
            export_mlx_lm(args.src, args.out, args.dtype, progress=not args.quiet)
            print(f"wrote mlx-lm folder {args.out}")
        else:
            b = convert(args.src, args.out, args.dtype, progress=not args.quiet)
            print(f"wrote bundle {b.path}: resident {b.resident_bytes / 1e6:.1f} MB, "
                  f"FFN records {b.ffn_bytes / 1e6:.1f} MB ({b.dtype})")
    except (SourceError, UnsupportedModel, ConversionError, BundleError, FileExistsError,
            OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
