"""The command lines and the examples, run as a user runs them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def run(*args: str, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kw)


SIZE = r"[\d.]+ [KMG]?B"
STATS = re.compile(rf"^\[stats\] \w+ \| prompt \d+ tokens @ [\d.]+ tok/s \| "
                   rf"generation (\d+) tokens @ [\d.]+ tok/s \| "
                   rf"flash read ({SIZE})/token, [\d.]+ (?:neurons|experts)/token "
                   rf"\(prefill {SIZE}; FFN {SIZE}, cache hit rate "
                   rf"\d+%\) \| "
                   rf"peak RSS {SIZE} \(runtime {SIZE} \+ model {SIZE}"
                   rf"(, budget {SIZE}( auto)?)?\) \| "
                   rf"MLX peak {SIZE}$", re.M)


def read_per_token(stats: re.Match) -> float:
    value, unit = stats.group(2).split()
    return float(value) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


@pytest.mark.slow
def test_generate_default_model_streams_and_reports():
    """No --model: the embedded default is converted (and calibrated) into the cache and used.
    Without --memory-budget it fits this machine: held in memory, it reads nothing per token
    after the prompt; within a budget below that, it reads a fraction of its FFN per token;
    both answer as when it reads the whole FFN (`off`)."""
    prompt = ("--prompt", "What is the capital of France?", "--max-tokens", "12")
    whole = run("-m", "mlx_flash.generate", *prompt, "--sparsity", "off",
                "--memory-budget", "off")
    assert whole.returncode == 0, whole.stderr
    assert "Paris" in whole.stdout
    held = run("-m", "mlx_flash.generate", *prompt)
    assert held.returncode == 0, held.stderr
    m = STATS.search(held.stderr)
    assert m and read_per_token(m) == 0 and " auto)" in held.stderr, held.stderr
    assert "Paris" in held.stdout
    r = run("-m", "mlx_flash.generate", *prompt, "--verbose", "--memory-budget", "150MB",
            "--max-kv-size", "256")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and r.stdout == held.stdout  # exact under every setting
    m = STATS.search(r.stderr)
    assert m, r.stderr
    assert int(m.group(1)) >= 1 and not r.stderr.split("[stats] ")[1].startswith("off")
    assert 0 < read_per_token(m) < read_per_token(STATS.search(whole.stderr))
    assert "[decode] per token: flash I/O" in r.stderr


def test_generate_flags_like_mlx_lm(tiny_bundle):
    r = run("-m", "mlx_flash.generate", "--model", str(tiny_bundle), "--prompt", "the",
            "--max-tokens", "5", "--temp", "0.9", "--top-p", "0.8", "--seed", "3", "--no-chat")
    assert r.returncode == 0, r.stderr
    assert STATS.search(r.stderr), r.stderr
    again = run("-m", "mlx_flash.generate", "--model", str(tiny_bundle), "--prompt", "the",
                "--max-tokens", "5", "--temp", "0.9", "--top-p", "0.8", "--seed", "3",
                "--no-chat")
    assert again.stdout == r.stdout  # same seed, same text


def test_generate_reads_prompt_from_stdin(tiny_bundle):
    r = run("-m", "mlx_flash.generate", "--model", str(tiny_bundle), "--prompt", "-",
            "--max-tokens", "3", input="the theme")
    assert r.returncode == 0, r.stderr


def test_help_explains():
    for module in ("mlx_flash.generate", "mlx_flash.convert", "mlx_flash.chat"):
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




# ---------------------------------------------------------------- mlx-lm's conventions (issue 12)

COMMANDS = ("generate", "chat", "convert", "calibrate", "evaluate", "server")


def test_python_m_mlx_flash_lists_commands_and_dispatches(tiny_bundle):
    from importlib.metadata import entry_points, version

    r = run("-m", "mlx_flash", "--help")
    assert r.returncode == 0
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s+\w", r.stdout, re.M), r.stdout
    r = run("-m", "mlx_flash", "--version")
    assert r.returncode == 0 and r.stdout.split() == ["mlx-flash-llm", version("mlx-flash-llm")]
    r = run("-m", "mlx_flash", "nonsense")
    assert r.returncode == 2 and "unknown command" in r.stderr
    r = run("-m", "mlx_flash", "generate", "--model", str(tiny_bundle), "-p", "the", "-m", "3",
            "--no-chat", "-q")
    assert r.returncode == 0 and r.stdout.strip() and not r.stderr, r.stderr
    # a console script for each command
    scripts = {e.name: e for e in entry_points(group="console_scripts")
               if e.dist is not None and e.dist.name == "mlx-flash-llm"}
    for command in COMMANDS:
        assert callable(scripts[f"mlx-flash-{command}"].load()), command


def test_generate_stdout_holds_only_the_text(tiny_bundle, tmp_path):
    """`generate ... > out.txt` leaves only the generated text in out.txt; -q drops the stats."""
    args = ("-m", "mlx_flash", "generate", "--model", str(tiny_bundle), "-p", "the theme",
            "--no-chat", "-m", "8")
    full, quiet = run(*args), run(*args, "--quiet")
    assert full.returncode == quiet.returncode == 0, full.stderr + quiet.stderr
    assert full.stdout == quiet.stdout and full.stdout.count("\n") == 1
    assert STATS.search(full.stderr) and "[stats]" not in full.stdout
    assert quiet.stderr == ""


def test_generate_takes_mlx_lm_flags(tiny_bundle):
    base = ("-m", "mlx_flash.generate", "--model", str(tiny_bundle), "-p", "the theme in the hat",
            "-m", "12", "-q")
    raw = run(*base, "--no-chat")
    assert raw.returncode == 0, raw.stderr
    # mlx_lm's name for --no-chat
    assert run(*base, "--ignore-chat-template").stdout == raw.stdout
    assert run(*base).stdout != raw.stdout  # the tiny tokenizer has a chat template
    # prefill in chunks of 1 or 3 tokens: the same text
    for step in ("1", "3"):
        assert run(*base, "--no-chat", "--prefill-step-size", step).stdout == raw.stdout
    # a token of the answer made an end-of-sequence token ends the answer there
    from mlx_lm import stream_generate

    import mlx_flash

    model, tokenizer = mlx_flash.load(tiny_bundle)
    ids = [r.token for r in stream_generate(model, tokenizer, "the theme in the hat",
                                            max_tokens=12)]
    stop = ids[4]
    for token in (str(stop), tokenizer.convert_ids_to_tokens(stop)):
        cut = run(*base, "--no-chat", "--extra-eos-token", token)
        assert cut.returncode == 0, cut.stderr
        assert len(cut.stdout) < len(raw.stdout) and raw.stdout.startswith(cut.stdout[:-1])
    for bad in ("999999", "no-such-token"):
        r = run(*base, "--no-chat", "--extra-eos-token", bad)
        assert r.returncode == 2 and bad in r.stderr and len(r.stderr.splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--threads", "0"], "--threads: must be between 1 and 64, not 0"),
    (["--threads", "100000"], "--threads: must be between 1 and 64, not 100000"),
    (["--window", "-1"], "--window: must be at least 0, not -1"),
    (["--temp", "-1"], "--temp: must be at least 0"),
    (["--temp", "nan"], "--temp: must be at least 0"),
    (["--max-kv-size", "-5"], "--max-kv-size: must be at least 1, not -5"),
    (["--max-kv-size", "0"], "--max-kv-size: must be at least 1, not 0"),
    (["--max-tokens", "0"], "--max-tokens/-m: must be at least 1, not 0"),
    (["--top-p", "0"], "--top-p: must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p: must be in (0, 1]"),
    (["--prefill-step-size", "0"], "--prefill-step-size: must be at least 1, not 0"),
    (["--memory-budget", "lots"], "--memory-budget: not a size: 'lots'"),
    (["--memory-budget", "1e400GB"], "--memory-budget: not a size"),
    (["--sparsity", "sometimes"], "--sparsity: invalid choice"),
])
def test_out_of_range_numbers_are_one_line_errors(args, message, capsys):
    """For generate, chat and server (whose parser takes the engine's flags and passes the rest
    on to mlx_lm.server's)."""
    from importlib import import_module

    server_flag = args[0] in ("--threads", "--window", "--max-kv-size", "--memory-budget",
                              "--sparsity")
    for command in ("generate", "chat", "server") if server_flag else ("generate", "chat"):
        parser = import_module(f"mlx_flash.{command}").build_parser()
        with pytest.raises(SystemExit) as e:
            parser.parse_known_args(args)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, (command, err)


@pytest.mark.parametrize("text, size", [("250M", 250 * 10**6), ("8G", 8 * 10**9),
                                        ("1.5GiB", int(1.5 * 2**30)), ("250MB", 250 * 10**6),
                                        ("8GB", 8 * 10**9), ("512KiB", 512 * 1024)])
def test_sizes_as_mlx_lm_and_llama_cpp_write_them(text, size):
    from mlx_flash.generate import build_parser
    from mlx_flash.sysmem import parse_size

    assert parse_size(text) == size
    assert build_parser().parse_args(["--memory-budget", text]).memory_budget == size


def test_ctrl_c_ends_generation_cleanly(tiny_bundle):
    """SIGINT while generating: exit code 130, the text ends with a newline, no traceback
    (from the main thread or the reader threads)."""
    import signal
    import time

    # a job a non-interactive shell runs in the background inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt: the child gets the default back
    p = subprocess.Popen([sys.executable, "-m", "mlx_flash", "generate", "--model",
                          str(tiny_bundle), "-p", "the", "--no-chat", "-m", "1000000",
                          "--threads", "8"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert p.stdout.read(1)  # generating
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err.decode()
    assert out.endswith(b"\n") and b"Traceback" not in err and b"KeyboardInterrupt" not in err


def test_chat_repl(tiny_bundle):
    """`python -m mlx_flash chat`: turns in one conversation, r resets, q quits; each answer's
    cost on stderr."""
    r = run("-m", "mlx_flash", "chat", "--model", str(tiny_bundle), "--max-tokens", "5",
            "--window", "2", input="the theme\nh\nand again\nr\nonce more\nq\nnever read\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("window hit rate") == 3 and "MB/token" in r.stderr
    assert r.stdout.count(">> ") == 6  # six prompts read; "never read" was not


def custom_code_tokenizer(bundle: Path, dest: Path) -> Path:
    """A copy of `bundle` whose tokenizer asks for its own code (auto_map), manifest resealed."""
    import json
    import shutil

    from mlx_flash.bundle import manifest_digest, sha256_file

    shutil.copytree(bundle, dest)
    name = "tokenizer/tokenizer_config.json"
    config = json.loads((dest / name).read_text())
    config.update(auto_map={"AutoTokenizer": [None, "tokenization_x.XTokenizerFast"]},
                  tokenizer_class="XTokenizerFast")
    (dest / name).write_text(json.dumps(config))
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": (dest / name).stat().st_size,
                               "sha256": sha256_file(dest / name)}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_tokenizer_with_custom_code_is_refused_without_asking(tiny_bundle, tmp_path):
    """transformers asks "run the custom code? [y/N]" (and reads the answer from stdin) unless
    told: the load never asks and refuses in one line."""
    bundle = custom_code_tokenizer(tiny_bundle, tmp_path / "custom")
    r = run("-m", "mlx_flash", "generate", "--model", str(bundle), "-m", "2", input="y\n")
    assert r.returncode == 1
    assert "[y/N]" not in r.stdout + r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1
    assert "auto_map" in r.stderr


def test_calibrate_refuses_too_little_text(tiny_bundle, tmp_path, capsys):
    """4 tokens calibrated without a word and replaced the bundle's default mode: now an error
    naming the minimum, and the bundle is untouched."""
    import shutil

    from mlx_flash.calibrate import MIN_TOKENS, main

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    before = {p.name: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    text = tmp_path / "short.txt"
    text.write_text("the theme in the hat")
    assert main([str(bundle), "--data", str(text), "--mode", "gate", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"at least {MIN_TOKENS} tokens" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before
    with pytest.raises(SystemExit) as e:
        main([str(bundle), "--data", str(text), "--tokens", "4"])
    assert e.value.code == 2 and f"at least {MIN_TOKENS}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([str(bundle), "--data", str(text), "--mode", "sometimes"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_evaluate_refuses_too_little_text(tiny_bundle, tmp_path, capsys):
    from mlx_flash.evaluate import MIN_TOKENS, main

    text = tmp_path / "short.txt"
    text.write_text("the theme in the hat")
    assert main([str(tiny_bundle), "--data", str(text), "--mode", "off", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"at least {MIN_TOKENS} tokens" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        main([str(tiny_bundle), "--data", str(text), "--mode", "sometimes"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def readme_python_example() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```python\n", readme.index("### Python")) + len("```python\n")
    return readme[start:readme.index("\n```", start)]


@pytest.mark.slow
def test_readme_python_example_prints_text():
    """The README's Python example, run as written, on the default model: it prints an
    answer (a raw prompt made the model emit end-of-text first and print nothing)."""
    code = readme_python_example()
    assert "mlx_flash.load(" in code and "apply_chat_template" in code
    r = run("-c", code, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) >= 2 and len(" ".join(lines[:-1]).split()) >= 5, r.stdout
    assert float(lines[-1]) > 0  # FFN bytes read per token
