"""The command lines and the examples, run as a user runs them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def run(*args: str, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kw)


SIZE = r"[\d.]+ [KMG]?B"
STATS = re.compile(rf"^\[stats\] \w+ \| prompt \d+ tokens @ [\d.]+ tok/s \| "
                   rf"generation (\d+) tokens @ [\d.]+ tok/s \| "
                   rf"flash read ({SIZE})/token \(prefill {SIZE}\) \| "
                   rf"peak RSS {SIZE} \(runtime {SIZE} \+ model {SIZE}(, budget {SIZE})?\) \| "
                   rf"MLX peak {SIZE}$", re.M)


def test_generate_default_model_streams_and_reports():
    """No --model: the embedded default is converted into the cache and used."""
    r = run("-m", "mlx_flash.generate", "--prompt", "What is the capital of France?",
            "--max-tokens", "12", "--verbose")
    assert r.returncode == 0, r.stderr
    m = STATS.search(r.stdout)
    assert m, r.stdout
    assert int(m.group(1)) >= 1
    # the whole FFN of the default model, in bfloat16 here: 30 layers x 1536 x 3 x 576 x 2 bytes
    assert m.group(2) == f"{30 * 1536 * 3 * 576 * 2 / 1e6:.1f} MB"
    assert "Paris" in r.stdout
    assert "[decode] per token: flash I/O" in r.stdout


def test_generate_flags_like_mlx_lm(tiny_bundle):
    r = run("-m", "mlx_flash.generate", "--model", str(tiny_bundle), "--prompt", "the",
            "--max-tokens", "5", "--temp", "0.9", "--top-p", "0.8", "--seed", "3", "--no-chat")
    assert r.returncode == 0, r.stderr
    assert STATS.search(r.stdout), r.stdout
    again = run("-m", "mlx_flash.generate", "--model", str(tiny_bundle), "--prompt", "the",
                "--max-tokens", "5", "--temp", "0.9", "--top-p", "0.8", "--seed", "3",
                "--no-chat")
    assert again.stdout.splitlines()[0] == r.stdout.splitlines()[0]  # same seed, same text


def test_generate_reads_prompt_from_stdin(tiny_bundle):
    r = run("-m", "mlx_flash.generate", "--model", str(tiny_bundle), "--prompt", "-",
            "--max-tokens", "3", input="the theme")
    assert r.returncode == 0, r.stderr


def test_help_explains():
    for module in ("mlx_flash.generate", "mlx_flash.convert"):
        r = run("-m", module, "--help")
        assert r.returncode == 0 and "flash" in r.stdout
    r = run("-m", "mlx_flash.generate", "--help")
    for flag in ("--model", "--prompt", "--max-tokens", "--temp", "--top-p", "--seed", "--chat",
                 "--no-chat"):
        assert flag in r.stdout


def test_generate_missing_model_is_one_line():
    r = run("-m", "mlx_flash.generate", "--model", "/no/such/model.gguf")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "does not exist" in r.stderr


def test_example_stream_generate(tiny_bundle):
    r = run("examples/stream_generate.py", str(tiny_bundle), "--max-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert "MB read from flash per token" in r.stdout


def test_example_serve_answers_over_http(tiny_bundle):
    """mlx-lm's OpenAI-compatible server, loading through mlx_flash, answers a chat request
    on 127.0.0.1 (the example starts and stops the server itself)."""
    r = run("examples/serve.py", "--model", str(tiny_bundle), timeout=240)
    assert r.returncode == 0, r.stderr
    assert "'completion_tokens'" in r.stdout


def test_example_chat(tiny_bundle):
    r = run("examples/chat.py", "--model", str(tiny_bundle), "--max-tokens", "5",
            input="the theme\nand again\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("window hit rate") == 2 and "MB/token" in r.stdout
