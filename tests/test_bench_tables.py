"""tools/bench.py's rows beside llama.cpp: greedy tokens compared with the reference engine's,
rows that did not run kept in the table with their reason."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import bench  # noqa: E402


def ok_row(engine: str, tokens: list[int], ms: float = 10.0) -> dict:
    return {"engine": engine, "status": "ok", "tokens": tokens, "ms_per_token": ms,
            "ffn_bytes_per_token": None, "io_ms": None, "mem_ms": None, "compute_ms": None,
            "peak_rss_bytes": 200e6, "model_rss_bytes": 100e6, "cgroup_peak_bytes": 150e6,
            "first_token_seconds": 1.5}


def test_tokens_agree_counts_up_to_the_first_difference() -> None:
    rows = [ok_row("naive", [1, 2, 3, 4]), ok_row("dense", [1, 2, 3, 4]),
            ok_row("llama.cpp", [1, 2, 9, 4]), ok_row("flash", [7, 2, 3, 4]),
            {"engine": "llama.cpp --no-mmap", "status": "out of memory", "ms_per_token": None}]
    bench.compare_tokens(rows)
    by = {r["engine"]: r for r in rows}
    assert all(r.get("tokens_reference") == "dense" for r in rows[:4])  # dense first
    assert (by["dense"]["tokens_agree"], by["dense"]["tokens_equal"]) == (4, True)
    assert (by["llama.cpp"]["tokens_agree"], by["llama.cpp"]["tokens_equal"]) == (2, False)
    assert by["flash"]["tokens_agree"] == 0  # a later match after a difference does not count
    assert "tokens_agree" not in by["llama.cpp --no-mmap"]
    rows = [ok_row("naive", [5, 6]), ok_row("llama.cpp", [5, 6, 7])]  # no dense: naive
    bench.compare_tokens(rows)
    assert rows[1]["tokens_reference"] == "naive" and rows[1]["tokens_agree"] == 2
    assert rows[1]["tokens_equal"] is False


def test_table_keeps_rows_that_did_not_run_with_their_reason() -> None:
    rows = [ok_row("naive", [1, 2], ms=100.0), ok_row("llama.cpp", [1, 3], ms=20.0),
            {"engine": "llama.cpp --no-mmap", "status": bench.SCALE_LLAMA_STATUS,
             "ms_per_token": None}]
    rows[1].update(read_bytes_per_token=2e6)
    bench.compare_tokens(rows)
    text = bench.table({"model": "scale", "budget_bytes": 815e6, "tokens": 2,
                        "compute_dtype": "bfloat16", "read_mbps": 12.0, "rows": rows})
    assert "reads limited to 12 MB/s (read-bound)" in text
    lines = {line.split("|")[1].strip(): line for line in text.splitlines()
             if line.startswith("| ") and not line.startswith("| engine")}
    assert "5.00×" in lines["llama.cpp"] and "| 2.00 |" in lines["llama.cpp"]  # its MB read
    assert "1/2" in lines["llama.cpp"] and "no OPT architecture" in lines["llama.cpp --no-mmap"]
    assert lines["llama.cpp --no-mmap"].count("–") == 10
