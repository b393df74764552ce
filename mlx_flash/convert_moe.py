"""Convert a Mixture-of-Experts model into a bundle: each routed expert one record (gate, up
and down, whole 4 KiB pages), quantization kept bit for bit; everything else resident, as
mlx-lm loads it (docs/MOE.md, docs/FORMAT.md)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from tqdm import tqdm

from .arch import (
    QuantizedTensor,
    Weight,
    check_finite,
    mlx_lm_quantization,
    pack_records,
    resident_arrays,
)
from .arch.moe import MOE_TYPES, TENSORS, RoutedLayer, expert_layout, flash_model
from .bundle import DTYPES, EXPERTS, Bundle, Quantization, quantized_parts
from .bundle_writer import BundleWriter
from .errors import ConversionError
from .loader import quantize_resident

# Hugging Face names one tensor per expert (`...experts.E.gate_proj.weight`); Mixtral calls
# the projections w1 (gate), w3 (up) and w2 (down)
HF_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _expert_sources(names: set[str], r: RoutedLayer, count: int) -> dict[str, list[str]]:
    """The source tensors of layer `r`'s experts: per tensor, one stacked `[E, out, in]`
    (mlx-lm, GGUF) or one per expert (Hugging Face)."""
    out = {}
    owner = r.path.rsplit(".", 1)[0]
    for t in TENSORS:
        stacked = f"{r.path}.{t}_proj.weight"
        if stacked in names:
            out[t] = [stacked]
            continue
        for hf in (f"{t}_proj", next(k for k, v in HF_PROJ.items() if v == f"{t}_proj")):
            per = [f"{owner}.experts.{e}.{hf}.weight" for e in range(count)]
            if all(n in names for n in per):
                out[t] = per
                break
        else:
            raise ConversionError(f"the source lacks the {t} matrices of layer {r.layer}'s "
                                  f"experts ({stacked} or {owner}.experts.E.{t}_proj.weight)")
    return out


def _stack(source, names: list[str], shape: tuple[int, ...]) -> Weight:
    """The experts' matrices of one tensor, stacked `[E, out, in]` (as stored)."""
    ws = [source.get_weight(n) for n in names]
    if len(ws) == 1 and names[0].count(".experts.") == 0:
        w = ws[0]
    elif all(isinstance(w, QuantizedTensor) for w in ws):
        w = QuantizedTensor(*(mx.stack([getattr(w, a) for w in ws])
                              for a in ("weight", "scales", "biases")), ws[0].bits,
                            ws[0].group_size)
    else:
        w = mx.stack([w.dequantize() if isinstance(w, QuantizedTensor) else w for w in ws])
    if tuple(w.shape) != shape:
        raise ConversionError(f"{names[0]} has shape {tuple(w.shape)}, the model expects {shape}")
    return w


def convert_moe(source, out: str | Path, dtype: str | None = None,
                progress: bool = True) -> Bundle:
    """Convert an MoE `source` (opened by `sources.open_source`) into a bundle at `out`.

    Routed experts become records; quantized ones keep their quantization bit for bit (MLX's
    affine quantization of mlx-lm folders and of GGUF Q4_0/Q4_1/Q8_0: `gather_qmm` computes
    it where it lies); float ones are stored as `dtype`, by default the source's own (or
    its quantization scales', widened to float32 on MLX's CPU backend), so the bundle
    computes what mlx-lm computes on the source."""
    config = dict(source.config)
    model, routed = flash_model(config, None)
    if not routed:
        raise ConversionError("no routed experts")
    count = int(config[MOE_TYPES[config["model_type"]]])
    names = set(source.names())
    experts = {i: _expert_sources(names, r, count) for i, r in routed.items()}
    in_experts = {n for layer in experts.values() for ns in layer.values() for n in ns}
    first = min(routed)
    sample = {t: source.get_weight(experts[first][t][0]) for t in TENSORS}
    quantization = {t: Quantization(w.bits, w.group_size) for t, w in sample.items()
                    if isinstance(w, QuantizedTensor)}
    if dtype is None:
        # Quantized experts on MLX's CPU backend compute in float32 (gather_qmm: 8 ms in
        # float32, 132 in bfloat16 for 8 experts of 768 x 2048 here): scales stored in
        # float32 (exact: a 16-bit float widens losslessly) let the experts multiply where the
        # cache holds them. Else the source's own dtype.
        dtype = "float32" if quantization and not mx.metal.is_available() else \
            source.stored_dtype(experts[first]["gate"][0])
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    # resident tensors: as mlx-lm would load them (its sanitize maps the source's names)
    quantized: dict[str, Quantization] = {}
    resident: dict[str, mx.array] = {}
    for name in sorted(names - in_experts):
        w = source.get_weight(name)
        check_finite(name, w)
        resident.update(resident_arrays(name, w, quantized))
    # (the supported models' sanitize reads their config, never the modules replaced above)
    resident = model.sanitize(resident)
    if quantized:
        config["quantization"] = mlx_lm_quantization(
            {m: q for m, q in quantized.items()
             if f"{m}.scales" in resident})
    quantize_resident(model, config, resident)
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    if resident.keys() != expected.keys():
        extra = sorted(resident.keys() - expected.keys())
        lacking = sorted(expected.keys() - resident.keys())
        raise ConversionError(f"{source.path.name} does not match mlx-lm's "
                              f"{config['model_type']} model: unexpected tensors {extra[:3]}, "
                              f"missing {lacking[:3]}")
    for k, shape in expected.items():
        if tuple(resident[k].shape) != tuple(shape):
            raise ConversionError(f"{k} has shape {tuple(resident[k].shape)}, the model "
                                  f"expects {tuple(shape)}")
    shapes = routed[first].shapes
    parts, record_bytes = expert_layout(shapes, dtype, quantization)
    target = DTYPES[dtype]
    with BundleWriter(out, architecture=config["model_type"], config=config, dtype=dtype,
                      source=source.describe()) as writer, \
            tqdm(total=len(routed), unit="layer", disable=not progress,
                 desc=f"converting {source.path.name}") as bar:
        for k, a in resident.items():
            writer.add_resident(k, a)
        writer.add_family(EXPERTS, count, parts, record_bytes, quantization, every_layer=False)
        for i, r in sorted(routed.items()):
            arrays = {}
            for t in TENSORS:
                w = _stack(source, experts[i][t], (count, *r.shapes[t]))
                check_finite(experts[i][t][0], w)
                q = quantization.get(t)
                if q is None:
                    f = w.dequantize() if isinstance(w, QuantizedTensor) else w
                    arrays[t] = f.astype(target).reshape(count, -1)
                elif not isinstance(w, QuantizedTensor) or (w.bits, w.group_size) != (
                        q.bits, q.group_size):
                    raise ConversionError(f"layer {i}'s {t} experts are not quantized as "
                                          f"layer {first}'s")
                else:
                    for part, a in zip(quantized_parts(t), (w.weight, w.scales, w.biases),
                                       strict=True):
                        arrays[part] = (a if part == t else a.astype(target)).reshape(count, -1)
            writer.write_segment(EXPERTS, i, pack_records(parts, record_bytes, arrays))
            bar.update()
        source.save_tokenizer(writer.tokenizer_dir)
        return writer.commit()
