"""Hostile inputs at conversion (issue 23, items 1, 2, 5 and 7's convert part): every MoE
conversion from the command line ends in a summary of its experts, through both entry points
(`python -m mlx_flash convert`, `python -m mlx_flash.convert`); configs, weights and tokenizers
that cannot work are one line `error: ...` at conversion, with nothing left behind, never a
bundle that crashes or computes garbage later; hub ids convert as they load.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import pytest
from test_hub import add_to_cache
from tiny_moe import write_hf_experts, write_tiny_moe

from mlx_flash.bundle import EXPERTS, Bundle
from mlx_flash.convert import convert, main
from mlx_flash.errors import ConversionError, SourceError, UnsupportedModel

ROOT = Path(__file__).parent.parent
MOE_TINY = Path(__file__).parent / "data" / "moe-tiny"
ENTRY_POINTS = {"mlx_flash": ["-m", "mlx_flash", "convert"],
                "mlx_flash.convert": ["-m", "mlx_flash.convert"]}
REFUSED = (ConversionError, SourceError, UnsupportedModel)


def run_convert(entry: str, *args: str, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *ENTRY_POINTS[entry], *args, "--quiet"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def one_line_error(stderr: str) -> str:
    """The one line `error: ...` a command printed, and nothing else (no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


def nothing_left(out: Path) -> None:
    """No bundle at `out`, and no staging folder beside it."""
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if out.name in p.name]


def variant(src: Path, dst: Path, config: dict | None = None,
            weights: Callable[[dict[str, mx.array]], None] | None = None) -> Path:
    """A copy of the model folder `src` with `config` entries replaced and its weights
    changed in place by `weights`."""
    shutil.copytree(src, dst)
    if config:
        saved = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**saved, **config}))
    if weights:
        (file,) = dst.glob("*.safetensors")
        arrays, metadata = mx.load(str(file), return_metadata=True)
        weights(arrays)
        file.unlink()
        mx.save_safetensors(str(file), arrays, metadata=metadata)
    return dst


@pytest.fixture(scope="module")
def hf_experts(tmp_path_factory) -> Path:
    """The trained fixture with Hugging Face's names: one tensor per expert."""
    out = tmp_path_factory.mktemp("hf_experts") / "moe-tiny-hf"
    write_hf_experts(MOE_TINY, out)
    return out


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> Path:
    """A tiny deepseek_v3 (8 experts in n_group 2, topk_group 1; the first layer dense)."""
    out = tmp_path_factory.mktemp("deepseek") / "deepseek_v3"
    write_tiny_moe(out, "deepseek_v3")
    return out


def drop(name: str) -> Callable[[dict[str, mx.array]], None]:
    return lambda w: w.pop(name)


def extra_expert(w: dict[str, mx.array]) -> None:
    """Expert 16 of 16 in layer 2 (one past the last)."""
    for proj in ("gate_proj", "up_proj", "down_proj"):
        w[f"model.layers.2.mlp.experts.16.{proj}.weight"] = \
            w[f"model.layers.2.mlp.experts.0.{proj}.weight"]


def as_int32(name: str) -> Callable[[dict[str, mx.array]], None]:
    def change(w: dict[str, mx.array]) -> None:
        w[name] = (w[name] * 100).astype(mx.int32)
    return change


# ------------------------------------------ items 1 and 2: MoE conversions on the command line

def summary_of(bundle: Path) -> list[str]:
    """What the summary line must say of the experts of `bundle`: their count, their bytes
    per layer, their dtype or quantization."""
    b = Bundle.open(bundle)
    fam = b.families[EXPERTS]
    how = f"{next(iter(fam.quantization.values())).bits}-bit" if fam.quantization else b.dtype
    return [f"{fam.count} experts", f"{fam.count * fam.record_bytes / 1e6:.1f} MB per layer",
            how]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_moe_conversion_from_the_command_line(entry, tmp_path):
    """Item 1: it wrote a valid bundle, then a KeyError traceback and exit code 1."""
    out = tmp_path / "bundle"
    r = run_convert(entry, str(MOE_TINY), str(out))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    (line,) = r.stdout.strip().splitlines()
    assert line.startswith(f"wrote bundle {out}:"), line
    for needle in summary_of(out):
        assert needle in line, (needle, line)


def test_quantized_moe_summary_names_the_quantization(tmp_path, capsys):
    src = tmp_path / "moe-4bit"
    write_tiny_moe(src, "qwen3_moe", bits=4)
    assert main([str(src), str(tmp_path / "bundle"), "--quiet"]) == 0
    line = capsys.readouterr().out.strip()
    for needle in summary_of(tmp_path / "bundle"):
        assert needle in line, (needle, line)
    assert "/32" in line  # the group size


HOSTILE_MOE = {
    "4096 experts": lambda root, hf, ds: variant(MOE_TINY, root / "src", {"num_experts": 4096}),
    "moe_intermediate_size 2^20": lambda root, hf, ds: variant(
        MOE_TINY, root / "src", {"moe_intermediate_size": 1 << 20}),
    "an expert missing": lambda root, hf, ds: variant(
        hf, root / "src", weights=drop("model.layers.1.mlp.experts.5.up_proj.weight")),
    "an expert too many": lambda root, hf, ds: variant(hf, root / "src", weights=extra_expert),
    "n_group not dividing the experts": lambda root, hf, ds: variant(ds, root / "src",
                                                                     {"n_group": 3}),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("case", HOSTILE_MOE)
def test_hostile_moe_sources_are_one_line_from_both_entry_points(
        hf_experts, deepseek, tmp_path, case, entry):
    """Item 2: run as `python -m mlx_flash.convert`, the module was imported twice and the MoE
    code's ConversionError was another class: a traceback."""
    src = HOSTILE_MOE[case](tmp_path, hf_experts, deepseek)
    out = tmp_path / "bundle"
    r = run_convert(entry, str(src), str(out))
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    one_line_error(r.stderr)
    assert not r.stdout.strip()
    nothing_left(out)


# ------------------------------------------------------ item 5: configs that cannot work

@pytest.mark.parametrize("change, needle", [
    ({"n_group": 3}, "n_group"),  # 8 experts in 3 groups
    ({"n_group": 8}, "n_group"),  # groups of one expert: the group score is its top two
    ({"n_group": 0}, "n_group"),
    ({"topk_group": 3}, "topk_group"),  # more groups kept than there are
    ({"topk_group": 0}, "topk_group"),  # every group masked
    ({"topk_method": "greedy"}, "topk_method"),  # mlx-lm's deepseek_v3 asserts noaux_tc
    ({"scoring_func": "softmax"}, "scoring_func"),  # mlx-lm's computes sigmoid, whatever asked
    ({"routed_scaling_factor": math.nan}, "routed_scaling_factor"),
    ({"routed_scaling_factor": math.inf}, "routed_scaling_factor"),
    ({"routed_scaling_factor": 0}, "routed_scaling_factor"),
    ({"routed_scaling_factor": "2.5"}, "routed_scaling_factor"),
    ({"rope_scaling": {"type": "yarn", "factor": math.nan}}, "rope_scaling"),
])
def test_deepseek_configs_that_cannot_work_are_refused(deepseek, tmp_path, change, needle):
    """They converted, then crashed in generate (or generated <|endoftext|> on NaN)."""
    src = variant(deepseek, tmp_path / "src", change)
    with pytest.raises(UnsupportedModel, match=needle):
        convert(src, tmp_path / "bundle", dtype=None, progress=False)
    nothing_left(tmp_path / "bundle")


def test_deepseek_v2_group_limited_greedy_needs_its_groups(tmp_path):
    src = tmp_path / "v2"
    write_tiny_moe(src, "deepseek_v2")
    for i, change in enumerate([{"topk_method": "group_limited_greedy"},  # no n_group
                                {"topk_method": "group_limited_greedy", "n_group": 3,
                                 "topk_group": 1}]):
        bad = variant(src, tmp_path / f"bad{i}", change)
        with pytest.raises(UnsupportedModel, match="n_group"):
            convert(bad, tmp_path / "bundle", dtype=None, progress=False)
        nothing_left(tmp_path / "bundle")
    # grouped as it should be, it converts (and keeping every group is no grouping at all)
    ok = variant(src, tmp_path / "ok", {"topk_method": "group_limited_greedy", "n_group": 2,
                                        "topk_group": 2})
    convert(ok, tmp_path / "bundle", dtype=None, progress=False)


def test_a_sane_deepseek_v3_still_converts(deepseek, tmp_path):
    convert(deepseek, tmp_path / "bundle", dtype=None, progress=False)
    assert Bundle.open(tmp_path / "bundle").families[EXPERTS].count == 8


# ------------------------------------------------------ item 5: weights that are not floats

def test_an_int32_dense_weight_is_refused(tiny_llama, tmp_path):
    """It converted (the integers cast to float) and generated different text."""
    name = "model.layers.1.mlp.up_proj.weight"
    src = variant(tiny_llama[0], tmp_path / "src", weights=as_int32(name))
    with pytest.raises(REFUSED, match=re.escape(name) + ".*int32"):
        convert(src, tmp_path / "bundle", dtype="float32", progress=False)
    nothing_left(tmp_path / "bundle")


def test_an_int32_expert_is_refused(hf_experts, tmp_path):
    name = "model.layers.2.mlp.experts.3.down_proj.weight"
    src = variant(hf_experts, tmp_path / "src", weights=as_int32(name))
    with pytest.raises(REFUSED, match=re.escape(name) + ".*int32"):
        convert(src, tmp_path / "bundle", dtype=None, progress=False)
    nothing_left(tmp_path / "bundle")


def test_quantized_weights_of_the_wrong_types_are_refused(tmp_path):
    src = tmp_path / "moe-4bit"
    write_tiny_moe(src, "qwen3_moe", bits=4)
    for i, (name, dtype) in enumerate([("model.layers.0.self_attn.q_proj.scales", mx.int32),
                                       ("model.layers.1.mlp.switch_mlp.up_proj.weight",
                                        mx.int32)]):
        def change(w, name=name, dtype=dtype):
            w[name] = w[name].view(dtype) if w[name].dtype.size == 4 else w[name].astype(dtype)
        bad = variant(src, tmp_path / f"bad{i}", weights=change)
        with pytest.raises(REFUSED, match=re.escape(name.rsplit(".", 1)[0])):
            convert(bad, tmp_path / "bundle", dtype=None, progress=False)
        nothing_left(tmp_path / "bundle")


# ---------------------------------------------------------- item 5: a tokenizer that is broken

@pytest.mark.parametrize("broken", ["{not json", '{"version": "1.0"}'])
@pytest.mark.parametrize("model", ["dense", "moe"])
def test_a_broken_tokenizer_is_refused_at_conversion(tiny_llama, tmp_path, broken, model,
                                                     capsys):
    """It converted, and the bundle could not load."""
    src = variant(tiny_llama[0] if model == "dense" else MOE_TINY, tmp_path / "src")
    (src / "tokenizer.json").write_text(broken)
    out = tmp_path / "bundle"
    assert main([str(src), str(out), "--quiet"]) == 1
    assert "tokenizer" in one_line_error(capsys.readouterr().err)
    nothing_left(out)


def test_export_refuses_a_broken_tokenizer(tiny_llama, tmp_path, capsys):
    src = variant(tiny_llama[0], tmp_path / "src")
    (src / "tokenizer.json").write_text("{not json")
    out = tmp_path / "mlx-lm"
    assert main([str(src), str(out), "--format", "mlx-lm", "--quiet"]) == 1
    assert "tokenizer" in one_line_error(capsys.readouterr().err)
    nothing_left(out)


# ---------------------------------------------------------- item 7: --format mlx-lm of an MoE

def test_mlx_lm_format_of_an_moe_says_what_to_do(tmp_path, capsys):
    """It said `unsupported architecture 'qwen3_moe' (supported: ...; Mixture-of-Experts:
    ..., qwen3_moe)`: supported, and unsupported, at once."""
    out = tmp_path / "mlx-lm"
    assert main([str(MOE_TINY), str(out), "--format", "mlx-lm", "--quiet"]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert "dense models only" in line and "unsupported architecture" not in line, line
    assert "already" in line, line  # an MoE folder already is an mlx-lm folder
    nothing_left(out)


# ----------------------------------------------------------------------------- hub ids

def test_convert_takes_a_hub_id(tmp_path):
    home = tmp_path / "hf_home"
    add_to_cache(home / "hub", "org/moe-tiny", sorted(MOE_TINY.iterdir()), "c" * 40)
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "bundle"
    r = run_convert("mlx_flash", "org/moe-tiny", str(out), env=env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert Bundle.open(out).manifest["source"]["name"] == "moe-tiny"
    missing = run_convert("mlx_flash", "org/nothing", str(tmp_path / "other"), env=env)
    assert missing.returncode == 1
    assert "HF_HUB_OFFLINE" in one_line_error(missing.stderr)
    nothing_left(tmp_path / "other")
