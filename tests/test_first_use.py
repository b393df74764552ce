"""A user's first runs (issue 23): a budget that works without knowing --max-kv-size,
calibrate's one-line refusals (a full disk, an MoE bundle), an MoE budget that lists its own
parts, mlx-lm's --verbose False, --kv-bits and --prompt-cache-file, Ctrl-C in the chat, and a
folder that is no model refused before any conversion is announced."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from test_cli import ROOT, STATS, run
from tiny_models import TINY_LLAMA, write_hf_llama
from tiny_moe import write_tiny_moe

import mlx_flash
from mlx_flash.errors import BudgetError
from mlx_flash.memory import DEFAULT_CONTEXT, MIN_CONTEXT

DATA = Path(__file__).parent / "data"
TEXT = DATA / "wikitext-2-valid-slice.txt"


def one_line(text: str) -> bool:
    return len(text.strip().splitlines()) == 1


def bundle_files(bundle: Path) -> dict[str, bytes]:
    return {str(p.relative_to(bundle)): p.read_bytes() for p in bundle.rglob("*")
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def moe_bundle(tmp_path_factory) -> Path:
    from mlx_flash.convert import convert

    root = tmp_path_factory.mktemp("moe")
    write_tiny_moe(root / "olmoe", "olmoe")
    return convert(root / "olmoe", root / "olmoe.flash", dtype=None, progress=False).path


@pytest.fixture(scope="module")
def wide_heads(tmp_path_factory) -> Path:
    """The tiny llama with heads of 32 (mlx-lm quantizes a KV cache in groups of 32 at the
    least), as a float32 bundle."""
    from mlx_flash.convert import convert

    root = tmp_path_factory.mktemp("wide")
    write_hf_llama(root / "llama", {**TINY_LLAMA, "num_attention_heads": 2, "head_dim": 32})
    return convert(root / "llama", root / "bundle", dtype="float32", progress=False).path


def sizes(bundle: Path, **options) -> tuple[int, int]:
    """(the bytes of the plan's minimum but the KV cache, the KV cache's bytes per token)."""
    plan = mlx_flash.load(bundle, memory_budget=10**12, context=DEFAULT_CONTEXT,
                          **options)[0].flash.plan
    return plan.minimum - plan.kv, plan.kv // DEFAULT_CONTEXT


# ---------------------------------------------------------------- 6: calibrate on a full disk

@contextlib.contextmanager
def full_disk(tmp_path: Path, bundle: Path):
    """A copy of `bundle` on a tmpfs it fills (root only); None where none can be mounted."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    size = sum(len(b) for b in bundle_files(bundle).values()) + 256 * 1024
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
            capture_output=True).returncode:
        yield None
        return
    try:
        shutil.copytree(bundle, mount / "bundle")
        with open(mount / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:  # every block left
                f.write(b"\0" * 4096)
        yield mount / "bundle"
    finally:
        gc.collect()  # the calibration's model: its open files keep the tmpfs busy
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)  # once they close


def test_calibrate_on_a_full_disk_is_one_line(tiny_bundle, tmp_path, capsys, monkeypatch):
    """MLX's save_safetensors raised RuntimeError ("[write] Unable to write ...") out of
    calibrate as a traceback: now one line, and the bundle is as it was. On a real full
    filesystem where one can be mounted (a tmpfs, as root), else MLX's error raised by hand."""
    from mlx_flash.calibrate import main

    with full_disk(tmp_path, tiny_bundle) as bundle:
        if bundle is None:
            bundle = tmp_path / "bundle"
            shutil.copytree(tiny_bundle, bundle)

            def full(*args, **kwargs):
                raise RuntimeError("[write] Unable to write 977 bytes to file.")

            monkeypatch.setattr(mx, "save_safetensors", full)
        before = bundle_files(bundle)
        assert main([str(bundle), "--data", str(TEXT), "--mode", "gate", "--tokens", "512",
                     "--quiet"]) == 1
        err = capsys.readouterr().err
        assert one_line(err) and err.startswith("error: cannot write the calibration into")
        assert "free on its disk); the bundle is as it was" in err
        assert bundle_files(bundle) == before
        assert mlx_flash.load(bundle)[0].flash.selection == "off"  # opens as it did


# ---------------------------------------------------------------- 7: MoE bundles

def test_calibrate_an_moe_bundle_says_there_is_nothing_to_calibrate(moe_bundle, capsys):
    from mlx_flash.calibrate import main

    before = bundle_files(moe_bundle)
    assert main([str(moe_bundle), "--data", str(TEXT), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert one_line(err) and "Mixture-of-Experts" in err and "router already selects" in err
    assert bundle_files(moe_bundle) == before


def test_moe_budget_error_lists_its_own_parts_in_bytes(moe_bundle):
    with pytest.raises(BudgetError) as e:
        mlx_flash.load(moe_bundle, memory_budget="1MB")
    message = str(e.value)
    assert "selection data" not in message and "one layer of records" not in message
    assert "resident weights" in message and "KV cache for" in message
    parts = message.split(": ", 1)[1].split(" + ")
    assert parts[-1].startswith("the 2 experts a token routes to, in each of 2 MoE layers ")
    for part in parts:  # each part with its bytes
        assert part.rsplit(" ", 2)[-1] in ("B", "KB", "MB", "GB"), part


def test_moe_plan_describes_expert_slots(moe_bundle):
    """--memory-budget off --verbose said "neuron caches 1.3 MB" for an MoE model."""
    naive = mlx_flash.load(moe_bundle, memory_budget="off")[0].flash.plan.describe()
    assert "neuron caches" not in naive and "expert slots" in naive
    assert "the experts of one token, read anew every token" in naive
    held = mlx_flash.load(moe_bundle, memory_budget=None)[0].flash.plan.describe()
    assert "expert slots" in held and "8 of 8 experts in each of 2 MoE layers" in held
    r = run("-m", "mlx_flash", "generate", "--model", str(moe_bundle), "--memory-budget", "off",
            "--verbose", "-m", "2", "-p", "the", "--no-chat")
    assert r.returncode == 0, r.stderr
    assert "expert slots" in r.stderr and "neuron caches" not in r.stderr


# ---------------------------------------------------------------- 8: the budget and the context

def test_a_budget_below_the_default_context_leaves_the_kv_cache_what_it_can(tiny_bundle):
    """`--memory-budget` alone works: a budget that cannot hold 2048 tokens of KV cache above
    the rest of the model holds what it leaves (the error never said --max-kv-size), says so
    in --verbose, and the model's KV cache holds that many tokens, allocated at once."""
    from mlx_lm import stream_generate
    from mlx_lm.models.cache import make_prompt_cache

    fixed, per_token = sizes(tiny_bundle)
    budget = fixed + 1000 * per_token + per_token // 2
    with pytest.raises(BudgetError):  # 2048 tokens, as asked
        mlx_flash.load(tiny_bundle, memory_budget=budget)
    model, tokenizer = mlx_flash.load(tiny_bundle, memory_budget=budget, context=None)
    plan = model.flash.plan
    assert plan.context == 1000 and plan.fitted and plan.total <= budget
    cache = make_prompt_cache(model)
    list(stream_generate(model, tokenizer, "the theme", max_tokens=3, prompt_cache=cache))
    assert {c.keys.shape[2] for c in cache} == {1000}  # what the plan counts, at once
    r = run("-m", "mlx_flash", "generate", "--model", str(tiny_bundle), "--memory-budget",
            str(budget), "--verbose", "-p", "the", "--no-chat", "-m", "4")
    assert r.returncode == 0, r.stderr
    assert "KV cache for 1000 tokens (what the budget leaves)" in r.stderr
    assert STATS.search(r.stderr), r.stderr
    # the chat's banner says it too
    r = run("-m", "mlx_flash", "chat", "--model", str(tiny_bundle), "--memory-budget",
            str(budget), input="q\n")
    assert r.returncode == 0, r.stderr
    assert "KV cache for 1000 tokens reserved (what the budget leaves" in r.stderr
    # a budget that holds 2048 tokens plans 2048, as before
    roomy = mlx_flash.load(tiny_bundle, memory_budget=fixed + 3000 * per_token,
                           context=None)[0].flash.plan
    assert roomy.context == DEFAULT_CONTEXT and not roomy.fitted


def test_a_budget_below_the_fewest_tokens_names_the_max_kv_size_that_fits(tiny_bundle):
    fixed, per_token = sizes(tiny_bundle)
    budget = fixed + 100 * per_token
    r = run("-m", "mlx_flash", "generate", "--model", str(tiny_bundle), "--memory-budget",
            str(budget), "-p", "the", "--no-chat", "-m", "4")
    assert r.returncode == 1 and one_line(r.stderr), r.stderr
    assert f"KV cache for {MIN_CONTEXT} tokens" in r.stderr
    assert r.stderr.rstrip().endswith("a KV cache of at most 100 tokens fits it "
                                      "(--max-kv-size 100)")
    r = run("-m", "mlx_flash", "generate", "--model", str(tiny_bundle), "--memory-budget",
            str(budget), "--max-kv-size", "100", "-p", "the", "--no-chat", "-m", "4")
    assert r.returncode == 0, r.stderr


def test_a_folder_that_is_no_model_is_refused_before_a_conversion_is_announced(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("not a model")
    r = run("-m", "mlx_flash", "generate", "--model", str(folder), "-m", "2")
    assert r.returncode == 1 and one_line(r.stderr), r.stderr
    assert "converting" not in r.stderr and "neither a GGUF file nor a model folder" in r.stderr
    (folder / "config.json").write_text('{"model_type": "gpt9"}')
    r = run("-m", "mlx_flash", "generate", "--model", str(folder), "-m", "2")
    assert r.returncode == 1 and one_line(r.stderr) and "converting" not in r.stderr, r.stderr


def test_chat_ctrl_c_stops_the_answer_not_the_chat(tiny_bundle):
    """mlx-lm's chat dies on Ctrl-C; ours stops the answer, back at the prompt (q then quits
    with 0). Before, Ctrl-C ended the whole chat (130)."""
    p = subprocess.Popen([sys.executable, "-m", "mlx_flash", "chat", "--model",
                          str(tiny_bundle), "-m", "1000000"], cwd=ROOT, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        p.stdin.write(b"the theme\n")
        p.stdin.flush()
        assert p.stdout.read(4)  # the prompt, and the answer under way
        time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(b"q\n", timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, err.decode()
    assert b"[answer stopped: Ctrl-C]" in err and b"window hit rate" in err
    assert b"Traceback" not in err and out.count(b">> ") == 1  # the first was read above


def test_verbose_takes_mlx_lm_boolean(tiny_bundle):
    """mlx_lm.generate takes --verbose True/False (False: only the text)."""
    base = ("-m", "mlx_flash", "generate", "--model", str(tiny_bundle), "-p", "the",
            "--no-chat", "-m", "4")
    quiet = run(*base, "--verbose", "False")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert quiet.stdout == run(*base, "-q").stdout
    for form in (("--verbose", "True"), ("--verbose", "T"), ("--verbose",)):
        r = run(*base, *form)
        assert r.returncode == 0 and "[memory] " in r.stderr, (form, r.stderr)
    r = run(*base, "--verbose", "maybe")
    assert r.returncode == 2 and one_line(r.stderr) and "True or False" in r.stderr


def test_kv_bits_quantize_the_kv_cache_and_the_budget_counts_it(wide_heads):
    """mlx_lm.generate's --kv-bits, --kv-group-size, --quantized-kv-start: the same text as
    mlx-lm's stream_generate given them; under a budget, quantized from the first token, the
    KV cache is mlx-lm's QuantizedKVCache, the plan counts its smaller size, so the same
    budget holds more tokens."""
    from mlx_lm import stream_generate
    from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    base = ("-m", "mlx_flash", "generate", "--model", str(wide_heads), "-p", "the theme",
            "--no-chat", "-m", "12", "-q")
    kv = ("--kv-bits", "4", "--kv-group-size", "32", "--quantized-kv-start", "3")
    r = run(*base, *kv)
    assert r.returncode == 0, r.stderr
    model, tokenizer = mlx_flash.load(wide_heads)
    expected = "".join(x.text for x in stream_generate(
        model, tokenizer, tokenizer.encode("the theme"), max_tokens=12,
        sampler=make_sampler(0.0), kv_bits=4, kv_group_size=32, quantized_kv_start=3))
    assert r.stdout == expected + "\n"
    fixed, per_token = sizes(wide_heads)
    budget = fixed + 600 * per_token
    assert mlx_flash.load(wide_heads, memory_budget=budget,
                          context=None)[0].flash.plan.context == 600
    model, tokenizer = mlx_flash.load(wide_heads, memory_budget=budget, context=None,
                                      kv_bits=4, kv_group_size=32, quantized_kv_start=0)
    plan = model.flash.plan
    assert plan.context > 3 * 600 and plan.kv_bits == 4 and plan.total <= budget
    cache = make_prompt_cache(model)
    assert all(isinstance(c, QuantizedKVCache) for c in cache)
    list(stream_generate(model, tokenizer, "the theme", max_tokens=3, prompt_cache=cache))
    assert sum(c.nbytes for c in cache) == plan.kv  # allocated at once, as counted
    r = run(*base, "--memory-budget", str(budget), "--kv-bits", "4", "--kv-group-size", "32",
            "--quantized-kv-start", "0")
    assert r.returncode == 0, r.stderr
    r = run(*base, "--kv-bits", "4", "--max-kv-size", "64")  # mlx-lm cannot rotate them
    assert r.returncode == 1 and one_line(r.stderr) and "rotating" in r.stderr


def test_prompt_cache_file_continues_the_saved_prompt(tiny_bundle, tmp_path):
    """mlx_lm.generate's --prompt-cache-file: a prompt cache saved with its metadata (as
    mlx_lm.cache_prompt saves it) continues with what follows, as the whole prompt would;
    --model defaults to the cache's; another model is refused in one line."""
    from mlx_lm.models.cache import make_prompt_cache, save_prompt_cache

    model, tokenizer = mlx_flash.load(tiny_bundle)
    cache = make_prompt_cache(model)
    model(mx.array([tokenizer.encode("the theme")]), cache=cache)
    mx.eval([c.state for c in cache])
    saved = tmp_path / "prompt.safetensors"
    save_prompt_cache(str(saved), cache, {"model": str(tiny_bundle), "tokenizer_config": "{}"})
    common = ("-m", "mlx_flash", "generate", "--no-chat", "-m", "10", "-q")
    whole = run(*common, "--model", str(tiny_bundle), "-p", "the theme in the hat")
    assert whole.returncode == 0, whole.stderr
    fixed, per_token = sizes(tiny_bundle)
    for budget in ((), ("--memory-budget", str(fixed + 2 * DEFAULT_CONTEXT * per_token))):
        r = run(*common, "--prompt-cache-file", str(saved), "-p", " in the hat", *budget)
        assert r.returncode == 0, r.stderr
        assert r.stdout == whole.stdout
    r = run(*common, "--prompt-cache-file", str(saved), "--model", str(tmp_path), "-p", "x")
    assert r.returncode == 1 and one_line(r.stderr) and "made with the model" in r.stderr
    r = run(*common, "--prompt-cache-file", str(tmp_path / "none"), "-p", "x")
    assert r.returncode == 1 and one_line(r.stderr) and "does not exist" in r.stderr
