"""What the model-running command lines share: the flash engine's options (generate, chat
and server take the same), loading the model they name, and printing its stream."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .argtypes import DTYPE_CHOICES, budget, float_in, int_in
from .errors import BundleError, ConversionError, SourceError, UnsupportedModel
from .eviction import DEFAULT_POLICY, POLICIES
from .loader import MAX_THREADS

SPARSITY_CHOICES = ["auto", "off", "predictor", "gate", "hybrid", "teal"]
PREFILL_STEP_SIZE = 2048  # mlx_lm.generate's default
DEFAULT_QUANTIZED_KV_START = 5000  # mlx_lm.generate's


def add_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a flash bundle; or a GGUF file, HF / mlx-lm model folder, or Hugging "
                   "Face model (org/name[@revision], org/name:Q4_K_M for a repo of GGUFs) to "
                   "convert into the cache first (default: the embedded SmolLM2-135M-Instruct)")


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The flash engine's options, as `load` takes them (see `load_options`)."""
    g = p.add_argument_group("flash engine")
    g.add_argument("--sparsity", default="auto", choices=SPARSITY_CHOICES,
                   help="which FFN weights each token reads: a selection mode calibrated in the "
                   "bundle (python -m mlx_flash calibrate), 'off' for all of them, 'auto' for "
                   "the bundle's default (all of them if none is calibrated, or when the "
                   "budget holds the model whole: nothing is read then, and a selection "
                   "would only cost compute)")
    g.add_argument("--memory-budget", type=budget, default="auto",
                   help="memory for the model (resident weights, selection data, KV cache, "
                   "neuron caches), e.g. 250MB or 8G; the neuron caches get what the rest "
                   "leaves. Too small: an error saying the minimum. 'auto' (default): the "
                   "whole model, read once, when it fits in 75%% of the memory available, "
                   "else that much; 'off': no caches, every token reads what it selects")
    g.add_argument("--window", type=int_in(0), default=5,
                   help="tokens whose neurons stay cached (the paper's sliding window; 0: no "
                   "cache)")
    g.add_argument("--max-kv-size", type=int_in(1), default=None,
                   help="bound the KV cache to this many tokens (rotating, as mlx_lm does); "
                   "the budget reserves it (default: unbounded; the budget reserves 2048 "
                   "tokens, or what a budget you set leaves when it holds fewer, at least 256 "
                   "(--verbose says how many); a budget you set allocates them at once)")
    g.add_argument("--threads", type=int_in(1, MAX_THREADS), default=8,
                   help="parallel flash reads (default 8: what tools/flash_profile.py found "
                   f"best; at most {MAX_THREADS})")
    g.add_argument("--cold", action=argparse.BooleanOptionalAction, default=None,
                   help="bypass the OS page cache, so every read reaches the storage; the "
                   "first run on a disk then measures it and says what a token costs (default: "
                   "on on macOS, where the page cache takes the budget's unified memory, off "
                   "elsewhere)")
    g.add_argument("--lookahead", action="store_true",
                   help="decoding, read the next layer's likely records while its attention "
                   "computes (predictor mode; MoE models: the next layer's router on this "
                   "layer's input; off by default: its guesses add reads)")
    g.add_argument("--expert-policy", choices=list(POLICIES), default=DEFAULT_POLICY,
                   help="MoE models: which resident expert makes room for a missing one "
                   f"(default {DEFAULT_POLICY}: the best measured against Belady's optimum, "
                   "docs/MOE.md)")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="dtype for converting a non-bundle --model (default: as convert "
                   "does, a quantized GGUF or mlx-lm folder keeps its quantization; float "
                   "weights become float16 where Metal runs, else bfloat16). An MoE model "
                   "folder is not converted unless this is given: its experts are read from "
                   "its own files")
    g.add_argument("--compute-dtype", choices=DTYPE_CHOICES, default=None,
                   help="dtype to compute in (default: the bundle's)")
    g.add_argument("--verify", action="store_true",
                   help="check every bundle file's sha256 before loading (an MoE folder "
                   "streamed in place: every weight file's)")
    # dest apart from mlx_lm's own --pipeline (the server hands these options to mlx-lm's)
    g.add_argument("--pipeline", dest="pipelined", action="store_true",
                   help="under mlx.launch, split the model by layers over the ranks, as "
                   "mlx_lm's --pipeline does: each rank loads, reads and budgets only its "
                   "layers; rank 0 prints the text (docs/PIPELINE.md). Alone: no effect")
    g.add_argument("--pipeline-split", type=pipeline_split, default=None, metavar="SPLIT",
                   help="with --pipeline: layers per rank, rank 0 first (e.g. 10,14; rank 0 "
                   "runs the last layers), or 'budget': in proportion to each rank's memory "
                   "budget (default: even, as mlx_lm)")


def add_kv_arguments(p: argparse.ArgumentParser) -> None:
    """mlx_lm.generate's KV cache quantization flags (same names and defaults); the memory
    budget counts the quantized cache."""
    g = p.add_argument_group("KV cache")
    g.add_argument("--kv-bits", type=int, choices=[2, 3, 4, 5, 6, 8], default=None,
                   help="quantize the KV cache to this many bits (default: no quantization); "
                   "with --quantized-kv-start 0 a budget holds more tokens of context in it")
    g.add_argument("--kv-group-size", type=int, choices=[32, 64, 128], default=64,
                   help="group size for KV cache quantization (default 64)")
    g.add_argument("--quantized-kv-start", type=int_in(0), default=DEFAULT_QUANTIZED_KV_START,
                   help="with --kv-bits, quantize the KV cache from this token on (default "
                   f"{DEFAULT_QUANTIZED_KV_START}, as mlx_lm; 0: from the first, the only way "
                   "the budget's 2048 tokens get smaller)")


def kv_options(args: argparse.Namespace) -> dict[str, Any]:
    """stream_generate's KV quantization arguments from the flags of `add_kv_arguments`."""
    return {"kv_bits": getattr(args, "kv_bits", None),
            "kv_group_size": getattr(args, "kv_group_size", 64),
            "quantized_kv_start": getattr(args, "quantized_kv_start",
                                          DEFAULT_QUANTIZED_KV_START)}


def add_sampling_arguments(p: argparse.ArgumentParser, max_tokens: int) -> None:
    """mlx_lm.generate's sampling flags, with their ranges checked."""
    p.add_argument("--max-tokens", "-m", type=int_in(1), default=max_tokens,
                   help=f"maximum number of tokens to generate (default: {max_tokens})")
    p.add_argument("--temp", type=float_in(0), default=0.0,
                   help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float_in(0, 1, low_open=True), default=1.0,
                   help="sampling top-p, in (0, 1] (1: off)")
    p.add_argument("--top-k", type=int_in(0), default=0, help="sampling top-k (0: off)")
    p.add_argument("--min-p", type=float_in(0, 1), default=0.0,
                   help="sampling min-p, in [0, 1] (0: off)")
    p.add_argument("--seed", type=int_in(0, 2**64 - 1), default=None, help="PRNG seed")
    p.add_argument("--prefill-step-size", type=int_in(1), default=PREFILL_STEP_SIZE,
                   help="prompt tokens processed at a time; fewer lower prefill's peak memory "
                   f"(default: {PREFILL_STEP_SIZE}, as mlx_lm)")


def make_sampler(args: argparse.Namespace) -> Callable:
    """mlx-lm's sampler for the flags of `add_sampling_arguments`."""
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(args.temp, args.top_p, args.min_p, top_k=args.top_k)


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """`mlx_flash.load`'s keyword arguments from the options of `add_engine_arguments`."""
    return {"dtype": args.dtype, "compute_dtype": args.compute_dtype, "verify": args.verify,
            "sparsity": None if args.sparsity == "auto" else args.sparsity,
            "memory_budget": args.memory_budget, "window": args.window,
            # no --max-kv-size: 2048 tokens, or what a budget leaves (`memory.choose_context`)
            "context": args.max_kv_size, "threads": args.threads, "cold": args.cold,
            "lookahead": args.lookahead, "expert_policy": args.expert_policy,
            "rotating_kv": args.max_kv_size is not None, **kv_options(args),
            "pipeline_group": pipeline_group(args),
            "pipeline_split": getattr(args, "pipeline_split", None)}


def pipeline_split(text: str) -> list[int] | str:
    """--pipeline-split: 'budget', or layer counts per rank (argparse's type)."""
    if text == "budget":
        return text
    try:
        split = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'budget' or layers per rank, rank 0 first (e.g. "
                                         f"10,14), not {text!r}") from None
    if any(n < 1 for n in split):
        raise argparse.ArgumentTypeError(f"every rank takes at least one layer: {text!r}")
    return split


def pipeline_group(args: argparse.Namespace) -> Any:
    """The distributed group to pipeline over: with --pipeline, this process's (mlx.launch
    starts the ranks), when it has more than one rank; else None (as mlx_lm: alone, the
    whole model)."""
    if not getattr(args, "pipelined", False):
        return None
    from .pipeline import init_group

    group = init_group()
    return group if group.size() > 1 else None


def finish_ranks(args: argparse.Namespace) -> None:
    """A pipeline's ranks wait for each other before they exit: the token mlx-lm's
    generate computes ahead is still crossing between them, and a rank that exits first
    closes its sockets under the others' last transfers (the ring backend's "Receiving from
    socket failed")."""
    group = pipeline_group(args)
    if group is not None:
        import mlx.core as mx
        from mlx_lm.generate import generation_stream

        from .pipeline import synchronize

        mx.synchronize(generation_stream)
        synchronize(group)


def serve_or_follow(host: str, port: int, generator: Any, handler_class: type) -> None:
    """mlx_lm.server's run(): rank 0 (or a lone process) serves HTTP; under mlx.launch the
    other ranks follow the requests rank 0 shares with them (mlx-lm pickles each request:
    the client's connection, which stays with rank 0, goes as None)."""
    import copyreg
    import socket

    import mlx.core as mx
    from mlx_lm import server as mlx_server

    if mx.distributed.init().size() > 1:
        copyreg.pickle(socket.socket, lambda _: (type(None), ()))
    if mx.distributed.init().rank() == 0:
        mlx_server._run_http_server(host, port, generator, handler_class=handler_class)
    else:
        generator.join()


def is_printing_rank(args: argparse.Namespace) -> bool:
    """Whether this process prints the generated text: not a pipeline's ranks past 0 (they
    generate the same tokens; as mlx_lm, rank 0 alone prints them)."""
    group = pipeline_group(args)
    return group is None or group.rank() == 0


def context_text(plan: Any, rotating: bool) -> str:
    """How many tokens of context the KV cache holds, for the chat's banner and --verbose:
    "" when nothing bounds or reserves it (no budget you set: mlx-lm's cache grows)."""
    if rotating:
        return f"context {plan.context} tokens (--max-kv-size: the oldest rotate out past them)"
    if plan.budget is None or plan.automatic:
        return ""
    why = "what the budget leaves" if plan.fitted else "the default"
    return (f"KV cache for {plan.context} tokens reserved ({why}; past them it grows over the "
            "budget, --max-kv-size bounds it)")


def vocab_size(model: Any) -> int:
    """Rows of a flash model's logits: a token id at or past it indexes past MLX's arrays
    (which crashes, not raises)."""
    return int(model.flash.bundle.config["vocab_size"])


def add_eos_tokens(tokenizer: Any, tokens: Sequence[str], vocab: int) -> None:
    """mlx_lm.generate's --extra-eos-token: token ids or tokens that also end generation.
    Unknown ones are an error (the tokenizer would map a misspelt token to its unknown
    token's id and stop on that)."""
    known = tokenizer.get_vocab()
    for token in tokens:
        ok = 0 <= int(token) < vocab if token.isdigit() else token in known
        if not ok:
            raise ValueError(f"{token!r} is not a token of this model")
        tokenizer.add_eos_token(token)


def load_errors() -> tuple[type[BaseException], ...]:
    """What loading a model raises for a bad model or option: one line for the user, no
    traceback."""
    return (OSError, BundleError, SourceError, UnsupportedModel, ConversionError, ValueError)


def load_model(args: argparse.Namespace, tokenizer_config: dict[str, Any] | None = None
               ) -> tuple[Any, Any] | None:
    """Seed the sampler and load the model the options of `add_engine_arguments` name:
    (model, tokenizer), or None once the reason it did not load is printed."""
    import mlx.core as mx

    from . import load  # the package's: what a caller (or a test) set there

    if args.seed is not None:
        mx.random.seed(args.seed)
    try:
        return load(args.model, tokenizer_config=tokenizer_config, **load_options(args))
    except load_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def print_stream(responses: Iterable[Any], stop: Callable[[], bool] = lambda: False,
                 echo: bool = True) -> tuple[Any, bool]:
    """Print each of mlx-lm's generation responses' text as it comes, then a newline:
    (the last response, whether the generation ended well). A failed read or a record that
    fails its checksum ends it with a one-line error instead of a traceback. `stop()` true
    after a response ends the generation there (the chat's Ctrl-C). `echo` False: run the
    generation, print nothing of it (a pipeline's ranks past 0)."""
    response = None
    try:
        for response in responses:
            print(response.text if echo else "", end="", flush=True)
            if stop():
                getattr(responses, "close", lambda: None)()  # mlx-lm's generator ends here
                break
    except (OSError, BundleError) as e:
        print()
        print(f"error: {e}", file=sys.stderr)
        return response, False
    print(end="\n" if echo else "")
    return response, True


