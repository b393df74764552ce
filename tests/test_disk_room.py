"""A dense model's first use says what its conversion writes and how much room there is, and
refuses in one line, before writing anything, when the disk is short (issue 21, item 3)."""

from __future__ import annotations

import os
from collections import namedtuple
from pathlib import Path

import pytest
from tiny_models import write_llama_gguf

import mlx_flash.paths
from mlx_flash.convert import bundle_bytes
from mlx_flash.errors import BundleError
from mlx_flash.paths import cached_bundle_path, resolve_bundle
from mlx_flash.sources import open_source
from mlx_flash.sysmem import format_bytes


def written(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("kind", ["hf float32", "gguf Q4_1 kept", "gguf Q8_0 to float16"])
def test_the_estimate_is_what_a_conversion_writes(tiny_llama, tmp_path, monkeypatch, kind):
    """Within a quarter of the bundle's bytes, for float and kept-quantized sources."""
    monkeypatch.setenv("MLX_FLASH_HOME", str(tmp_path / "home"))
    if kind.startswith("hf"):
        source, dtype = tiny_llama[0], None
    else:
        source = tmp_path / "tiny.gguf"
        write_llama_gguf(source, kind.split()[1])
        dtype = "float16" if kind.endswith("float16") else None
    estimate = bundle_bytes(open_source(source), dtype)
    actual = written(resolve_bundle(source, dtype, progress=False))
    assert 0.75 * actual <= estimate <= 1.25 * actual, (estimate, actual)


def test_a_short_disk_is_one_line_before_anything_is_written(tiny_llama, tmp_path,
                                                             monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("MLX_FLASH_HOME", str(home))
    source = tiny_llama[0]
    need = bundle_bytes(open_source(source), None)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(mlx_flash.paths.shutil, "disk_usage",
                        lambda path: usage(10 * need, 9 * need, need))  # no headroom left
    with pytest.raises(BundleError, match="whose disk has .* free") as e:
        resolve_bundle(source, None)
    assert "\n" not in str(e.value) and "MLX_FLASH_HOME" in str(e.value)
    assert "converting it" not in capsys.readouterr().err  # nothing announced
    out = cached_bundle_path(source, None)
    assert not out.exists() and not any(out.parent.glob(f".{out.name}*"))  # nothing written


def test_the_announcement_says_what_is_written_and_what_is_free(tiny_llama, tmp_path,
                                                                monkeypatch, capsys):
    monkeypatch.setenv("MLX_FLASH_HOME", str(tmp_path / "home"))
    need = bundle_bytes(open_source(tiny_llama[0]), None)
    resolve_bundle(tiny_llama[0], None, progress=True)
    err = capsys.readouterr().err
    assert f"about {format_bytes(need)} to write, " in err and " free there" in err, err


def test_calibrate_and_evaluate_take_a_hub_id(tmp_path, monkeypatch):
    """`calibrate ORG/NAME` and `evaluate ORG/NAME` work on the bundle the hub cache's model
    converts to; an id the cache lacks is one line."""
    from test_cli import run
    from test_hub import add_to_cache
    from tiny_models import TINY_LLAMA, write_hf_llama

    cache = tmp_path / "hub"
    folder = tmp_path / "tiny"
    write_hf_llama(folder, TINY_LLAMA)
    add_to_cache(cache, "org/tiny", sorted(folder.iterdir()), "a" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "MLX_FLASH_HOME": str(tmp_path / "home")}
    text = str(Path(__file__).parent / "data" / "wikitext-2-valid-slice.txt")
    r = run("-m", "mlx_flash", "calibrate", "org/tiny", "--data", text, "--mode", "teal",
            "--tokens", "256", "--quiet", env=env)
    assert r.returncode == 0 and "calibrated teal" in r.stdout, r.stderr[-2000:]
    r = run("-m", "mlx_flash", "evaluate", "org/tiny", "--data", text, "--tokens", "256",
            "--ctx", "64", "--quiet", env=env)
    assert r.returncode == 0 and "perplexity" in r.stdout.lower(), r.stderr[-2000:]
    r = run("-m", "mlx_flash.evaluate", "org/missing", "--data", text, "--quiet", env=env)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "org/missing" in r.stderr
