"""Command-line pieces every command shares, below everything else: argument types whose
errors say what is wrong, a parser whose errors are one line, and a clean end on Ctrl-C."""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import signal
from collections.abc import Callable
from typing import Any

from .sysmem import parse_size

DTYPE_CHOICES = ["float16", "bfloat16", "float32"]


INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (argparse prints the whole usage first,
    which for our many flags buries the message), and that takes no abbreviations (argparse
    read `generate --mode hybrid` as `--model hybrid`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def budget(text: str) -> int | str:
    """argparse type for --memory-budget: a size, "auto" or "off"."""
    return text if text in ("auto", "off") else size(text)


def size(text: str) -> int:
    """argparse type for sizes ("250MB", "8G", "1.5GiB"). argparse replaces a type's
    ValueError with "invalid size value"; ArgumentTypeError keeps the parser's message."""
    try:
        value = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size")
    return value


def boolean(text: str) -> bool:
    """argparse type for a boolean flag's value, as mlx_lm writes it (`--verbose False`):
    True/T/False/F in any case, and 1/0, yes/no."""
    value = text.strip().lower()
    if value in ("true", "t", "1", "yes", "y"):
        return True
    if value in ("false", "f", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expects True or False, not {text!r}")


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {bound}, not {value}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(low: float, high: float = math.inf, low_open: bool = False
             ) -> Callable[[str], float]:
    """argparse type: a finite float in [low, high], or in (low, high] with `low_open`."""
    if high == math.inf:
        bound = f"greater than {low}" if low_open else f"at least {low}"
    else:
        bound = f"in {'(' if low_open else '['}{low}, {high}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or value > high:
            raise argparse.ArgumentTypeError(f"must be {bound}, not {text}")
        return value

    parse.__name__ = "number"
    return parse


def interruptible(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """Ctrl-C ends the command with a newline and exit code 130, no traceback. Only the main
    thread gets KeyboardInterrupt, so the reader threads stop with the interpreter. A second
    Ctrl-C while the interpreter shuts down kills it outright (the default action) instead of
    printing a traceback from its shutdown."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int | None:
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            with contextlib.suppress(OSError):  # stdout may be a closed pipe
                print(flush=True)  # the streamed text ends on a line of its own
            return INTERRUPTED

    return wrapper
