"""`python -m mlx_flash <command>`: one entry point for every command line, as `mlx_lm` has.

    python -m mlx_flash generate --prompt "Why is the sky blue?"
    python -m mlx_flash --help | --version
"""

from __future__ import annotations

import importlib
import sys

DISTRIBUTION = "mlx-flash-llm"  # PyPI's `mlx-flash` is an unrelated project

# command: (module, what it does)
COMMANDS = {
    "generate": ("mlx_flash.generate", "generate text from a prompt, streaming it"),
    "chat": ("mlx_flash.chat", "chat with a model in the terminal"),
    "convert": ("mlx_flash.convert", "convert a GGUF file or model folder into a flash bundle"),
    "calibrate": ("mlx_flash.calibrate", "calibrate which FFN weights each token reads"),
    "evaluate": ("mlx_flash.evaluate", "measure a selection mode: perplexity and bytes read"),
    "server": ("mlx_flash.server", "serve a model over HTTP (OpenAI-compatible, mlx_lm.server)"),
}


def version() -> str:
    """The installed distribution's version (the package's own when run from a clone that
    was not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed(DISTRIBUTION)
    except PackageNotFoundError:
        from ._version import __version__

        return __version__


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {what}" for name, (_, what) in COMMANDS.items()]
    return ("usage: python -m mlx_flash COMMAND [ARGS...]\n\n"
            "Run language models larger than memory with MLX, their FFN weights read from "
            "flash.\n\ncommands:\n" + "\n".join(lines) +
            "\n\noptions:\n  -h, --help  show this help and exit\n"
            "  --version   print the version and exit\n\n"
            "python -m mlx_flash COMMAND --help describes a command.\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(usage(), end="", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0
    if argv[0] == "--version":
        print(f"{DISTRIBUTION} {version()}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"python -m mlx_flash: error: unknown command {argv[0]!r} (commands: "
              f"{', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
