"""The sparsity frontier: FFN bytes read per token vs perplexity, one curve per selection mode.

    python tools/frontier.py BUNDLE --data TEXT [--modes hybrid,gate,teal] [--tokens 4096]
        [--cal-tokens 4096] [--out docs/frontier]

For each mode and each operating point in its grid, calibrates a scratch copy of the bundle on
the first --cal-tokens tokens of TEXT and evaluates it on the last --tokens tokens (the same
code paths as `python -m mlx_flash.calibrate` / `evaluate`), then writes OUT.json, OUT.md (a
table) and OUT.png (the plot; needs matplotlib). Modes that keep the gate rows resident (gate,
hybrid) are marked: what they do not read, they hold in memory instead.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

GRIDS = {
    "gate": ["0.95", "0.9", "0.8", "0.7", "0.6"],
    "hybrid": ["0.9,0.6", "0.8,0.5", "0.8,0.4", "0.7,0.4", "0.6,0.3"],
    "teal": ["0.9,0.7", "0.8,0.6", "0.7,0.7", "0.7,0.5", "0.6,0.4"],
    "predictor": ["0.99", "0.95", "0.9"],
}
RESIDENT_GATE = {"gate", "hybrid"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--data", required=True)
    p.add_argument("--modes", default="hybrid,gate,teal")
    p.add_argument("--tokens", type=int, default=4096, help="evaluation tokens (end of text)")
    p.add_argument("--cal-tokens", type=int, default=4096, help="calibration tokens (start)")
    p.add_argument("--compute-dtype", default="float32")
    p.add_argument("--out", default="frontier", help="output path without extension")
    args = p.parse_args()

    from mlx_flash.calibrate import calibrate
    from mlx_flash.evaluate import evaluate

    points = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "bundle"
        shutil.copytree(args.bundle, scratch)
        dense = None
        for mode in args.modes.split(","):
            for target in GRIDS[mode]:
                calibrate(scratch, args.data, mode=mode, tokens=args.cal_tokens, target=target,
                          progress=False)
                r = evaluate(scratch, args.data, tokens=args.tokens, mode=mode,
                             compute_dtype=args.compute_dtype, progress=False)
                dense, oracle = r["ppl_dense"], r["ppl_oracle"]
                point = {k: r[k] for k in ("mode", "target", "ppl_dense", "ppl_sparse",
                                           "ppl_oracle", "oracle_keep", "ffn_bytes_fraction",
                                           "recall_mean", "resident_selection_bytes")}
                points.append(point)
                print(f"{mode} {target}: read {100 * r['ffn_bytes_fraction']:.1f}% of the FFN "
                      f"per token, perplexity {100 * (r['ppl_sparse'] / dense - 1):+.2f}% "
                      f"(oracle, same neuron count: {100 * (oracle / dense - 1):+.2f}%)",
                      flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({
        "bundle": Path(args.bundle).name, "data": Path(args.data).name,
        "tokens": args.tokens, "calibration_tokens": args.cal_tokens,
        "compute_dtype": args.compute_dtype, "points": points}, indent=2))
    rows = ["| mode | target | FFN bytes read / token | perplexity vs dense | oracle, same "
            "neuron count | resident selection data |", "|---|---|---|---|---|---|"]
    for pt in points:
        rows.append(f"| {pt['mode']} | {pt['target']} | {100 * pt['ffn_bytes_fraction']:.1f}% | "
                    f"{100 * (pt['ppl_sparse'] / pt['ppl_dense'] - 1):+.2f}% | "
                    f"{100 * (pt['ppl_oracle'] / pt['ppl_dense'] - 1):+.2f}% | "
                    f"{pt['resident_selection_bytes'] / 1e6:.1f} MB |")
    out.with_suffix(".md").write_text("\n".join(rows) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in dict.fromkeys(pt["mode"] for pt in points):
        pts = sorted((pt for pt in points if pt["mode"] == mode),
                     key=lambda pt: pt["ffn_bytes_fraction"])
        label = mode + (" (gate rows resident)" if mode in RESIDENT_GATE else "")
        ax.plot([100 * pt["ffn_bytes_fraction"] for pt in pts],
                [100 * (pt["ppl_sparse"] / pt["ppl_dense"] - 1) for pt in pts], "o-",
                label=label)
    ax.axhline(5, color="grey", linestyle=":", linewidth=1)
    ax.axvline(70, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("FFN bytes read per token (% of the FFN, no cache)")
    ax.set_ylabel("perplexity increase over dense (%)")
    ax.set_title(f"{Path(args.bundle).name}: {args.tokens} held-out tokens of "
                 f"{Path(args.data).name}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
