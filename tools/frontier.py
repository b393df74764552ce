"""The sparsity frontier: FFN bytes read per token vs perplexity, one curve per selection mode.

    python tools/frontier.py BUNDLE --data TEXT [--modes hybrid,gate,teal] [--tokens 4096]
        [--cal-tokens 4096] [--out docs/frontier]

For each mode and each operating point in its grid, calibrates a scratch copy of the bundle on
the first --cal-tokens tokens of TEXT and evaluates it on the last --tokens tokens (the same
code paths as `python -m mlx_flash.calibrate` / `evaluate`), then writes OUT.json, OUT.md (a
table) and OUT.png (the plot; needs matplotlib). Modes that keep the gate rows resident (gate,
hybrid) are marked: what they do not read, they hold in memory instead. `--from-json` merges
earlier runs' points into one report.
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


def measure(bundle: str, data: str, modes: list[str], tokens: int, cal_tokens: int | None,
            compute_dtype: str) -> list[dict]:
    from mlx_flash.calibrate import DEFAULT_TOKENS, calibrate
    from mlx_flash.evaluate import evaluate

    points = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "bundle"
        shutil.copytree(bundle, scratch)
        for mode in modes:
            for target in GRIDS[mode]:
                calibrate(scratch, data, mode=mode, tokens=cal_tokens or DEFAULT_TOKENS[mode],
                          target=target, progress=False)
                r = evaluate(scratch, data, tokens=tokens, mode=mode,
                             compute_dtype=compute_dtype, progress=False)
                point = {k: r[k] for k in ("mode", "target", "calibration_tokens", "ppl_dense",
                                           "ppl_sparse", "ppl_oracle", "oracle_keep",
                                           "ffn_bytes_fraction", "recall_mean",
                                           "resident_selection_bytes")}
                points.append(point)
                dense, oracle = r["ppl_dense"], r["ppl_oracle"]
                print(f"{mode} {target}: read {100 * r['ffn_bytes_fraction']:.1f}% of the FFN "
                      f"per token, perplexity {100 * (r['ppl_sparse'] / dense - 1):+.2f}% "
                      f"(oracle, same neuron count: {100 * (oracle / dense - 1):+.2f}%)",
                      flush=True)
    return points


def report(points: list[dict], title: str, out: Path) -> None:
    """OUT.md (table) and OUT.png (plot, when matplotlib is there)."""
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
    ax.set_ylim(-1, 26)
    ax.set_xlabel("FFN bytes read per token (% of the FFN, no cache)")
    ax.set_ylabel("perplexity increase over dense (%)")
    ax.set_title(title, fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", nargs="?", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--modes", default="hybrid,gate,teal,predictor")
    p.add_argument("--tokens", type=int, default=4096, help="evaluation tokens (end of text)")
    p.add_argument("--cal-tokens", type=int, default=None,
                   help="calibration tokens (start of text; default: calibrate's per mode)")
    p.add_argument("--compute-dtype", default="float32")
    p.add_argument("--title", default=None)
    p.add_argument("--out", default="frontier", help="output path without extension")
    p.add_argument("--from-json", nargs="+", default=None,
                   help="only report: merge the points of these earlier OUT.json files")
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        runs = [json.loads(Path(f).read_text()) for f in args.from_json]
        points = [pt for r in runs for pt in r["points"]]
        meta = runs[0]
    else:
        if not args.bundle or not args.data:
            p.error("BUNDLE and --data are needed (or --from-json)")
        points = measure(args.bundle, args.data, args.modes.split(","), args.tokens,
                         args.cal_tokens, args.compute_dtype)
        meta = {"bundle": Path(args.bundle).name, "data": Path(args.data).name,
                "tokens": args.tokens, "compute_dtype": args.compute_dtype}
    out.with_suffix(".json").write_text(json.dumps(dict(meta, points=points), indent=2))
    title = args.title or f"{meta['bundle']}: {meta['tokens']} held-out tokens of {meta['data']}"
    report(points, title, out)


if __name__ == "__main__":
    main()
