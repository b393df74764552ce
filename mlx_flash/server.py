"""mlx-lm's OpenAI-compatible HTTP server, serving flash bundles.

    python -m mlx_flash server [--model BUNDLE_OR_SRC] [--memory-budget 250MB] [--port 8080]
                               [any other mlx_lm.server flag]

mlx-lm's server with the flash engine's options, loading through `mlx_flash.load`, and hardened
against what a request can ask for (issue 13): a request's `model` names one of the models the
server serves (the one it was started with, and the bundles in its cache, by folder name) and
never reaches the filesystem; token ids in `logit_bias`, `top_k` and the prompt are checked
against the vocabulary (an index past it crashes MLX); prompts longer than the model's context,
or than the KV cache a budget you set holds, are refused; a gone client's work stops between
prefill chunks and tokens. Without --model it serves the embedded default model. Binds 127.0.0.1
unless told otherwise.

What mlx-lm's server itself lets through, refused here (issue 23): a body that does not arrive
(a Content-Length that is negative, past MAX_BODY_BYTES, or longer than what is sent within
--request-timeout), that is not UTF-8, not JSON (NaN, Infinity, nesting past the parser's
recursion), or has lone surrogates; `n` other than 1; `stop`, `messages` and the other fields
in shapes mlx-lm fails on. Each is answered with its status and a one-line message, and the
connection closed. After a large request the C heap's free pages go back to the system.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import io
import json
import logging
import math
import select
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import Any

import mlx.core as mx
from mlx_lm import server as mlx_server

from .argtypes import Parser, float_in, interruptible
from .cli import add_engine_arguments, add_model_argument, load_errors, load_options, vocab_size

DEFAULT_HOST = "127.0.0.1"
# Fixed, whatever was asked: the answer must not tell whether some path exists.
UNKNOWN_MODEL = "model not found (GET /v1/models lists the models this server serves)"
# mlx-lm's name for the model the server was started with (a request without `model`).
DEFAULT_MODEL_KEY = "default_model"
# A request's body: at most this large (a larger one is answered 413), all of it within
# --request-timeout (or 408), read in chunks (mlx-lm reads Content-Length bytes at once).
MAX_BODY_BYTES = 64 * 2**20
BODY_CHUNK = 2**20
DEFAULT_REQUEST_TIMEOUT = 30.0
# Nesting deeper than this is refused: mlx-lm's templates and copies recurse through a body.
MAX_DEPTH = 100


class RequestRefused(ValueError):
    """A request this server does not serve, with the HTTP status to answer it."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ClientGone(Exception):
    """The client closed its connection: the work for its request stops."""


def client_gone(sock: socket.socket) -> bool:
    """Whether the peer has closed `sock` (end of stream, or reset), reading none of its data."""
    try:
        if not select.select([sock], [], [], 0)[0]:
            return False  # nothing to read: still there, waiting
        return sock.recv(1, socket.MSG_PEEK) == b""
    except ConnectionError:
        return True
    except (OSError, ValueError):  # not a socket we can poll: assume it is still there
        return False


def detached(error: BaseException) -> BaseException:
    """`error`, and the errors it chains, without the frames they were raised through.

    mlx-lm's server raises a request's error again from a local variable that holds it
    (ResponseGenerator.generate's `ctx`, its generator's `response`): a reference cycle
    through the traceback, which kept each failed or abandoned request's frames (its prompt,
    its token list, its KV cache, the handler) until Python's cyclic GC ran, seconds or
    minutes later. Without a traceback there is no cycle, and they go when the request does."""
    stack, seen = [error], set()
    while stack:
        e = stack.pop()
        if e is not None and id(e) not in seen:
            seen.add(id(e))
            e.__traceback__ = None
            stack += [e.__cause__, e.__context__]
    return error


class WatchedQueue:
    """The queue a request's results go to, as the generation thread sees it: putting the
    prompt's progress (between prefill chunks) or a token raises ClientGone once the client
    has gone, which ends mlx-lm's generation for it; an error goes without its traceback
    (`detached`: it is logged first, if it is the server's); anything else passes through."""

    def __init__(self, queue: Queue, client: socket.socket):
        self.queue, self.client = queue, client

    def put(self, item: Any) -> None:
        if isinstance(item, (tuple, mlx_server.Response)) and client_gone(self.client):
            raise ClientGone("the client closed its connection")
        if isinstance(item, BaseException):
            if not isinstance(item, (RequestRefused, ClientGone)):
                logging.error("a request failed", exc_info=item)
            item = detached(item)
        self.queue.put(item)


@dataclass
class ClientRequest(mlx_server.CompletionRequest):
    """mlx-lm's request, with the connection of the client waiting for it."""

    client: socket.socket | None = None


def _no_constant(name: str) -> Any:
    raise RequestRefused(400, f"the body is not JSON: {name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RequestRefused(400, f"the body has a number out of range: {text[:40]}")
    return value


def parse_body(raw: bytes) -> Any:
    """The JSON value of a request's body, or RequestRefused(400) saying in one line why not:
    bytes that are not UTF-8; not JSON, including Python's NaN, Infinity and numbers too large
    for a float (mlx-lm's json.loads accepts them; a NaN temperature sampled garbage); nesting
    deeper than MAX_DEPTH (past the parser's recursion, mlx-lm dropped the connection); strings
    with lone surrogates (valid JSON escapes, but no text: the tokenizer fails on them)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestRefused(400, f"the body is not UTF-8 (byte {e.start})") from None
    try:
        body = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RequestRefused:
        raise
    except RecursionError:
        raise RequestRefused(400, f"the body nests deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as e:
        raise RequestRefused(400, f"the body is not JSON: {e}") from None
    except ValueError:  # an int past Python's limit on digits
        raise RequestRefused(400, "the body has a number too long to read") from None
    stack = [(body, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth >= MAX_DEPTH:
                raise RequestRefused(400, f"the body nests deeper than {MAX_DEPTH} levels")
            items = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((i, depth + 1) for i in items)
        elif isinstance(item, str) and not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestRefused(400, "the body has a string with a lone surrogate "
                                     "(\\ud800 to \\udfff unpaired): not text") from None
    return body


def check_fields(body: dict, path: str) -> None:
    """Refuse (ValueError, mlx-lm's 400) the fields mlx-lm reads without checking, in shapes
    it fails on deep in generation (it answered those 404, with Python's words) or ignores."""
    n = body.get("n")
    if n is not None and not (type(n) is int and n == 1):
        raise ValueError("n must be 1: this server answers with one choice")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise ValueError("stop must be a string or a list of non-empty strings")
    for name in ("stream_options", "chat_template_kwargs", "role_mapping"):
        if body.get(name) is not None and not isinstance(body[name], dict):
            raise ValueError(f"{name} must be an object")
    if not all(isinstance(v, str) for v in (body.get("role_mapping") or {}).values()):
        raise ValueError("role_mapping's values must be strings")
    if body.get("tools") is not None and not isinstance(body["tools"], list):
        raise ValueError("tools must be a list")
    if path == "/v1/completions":
        return
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object with a role and a content")
        if not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}].role must be a string")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise ValueError(f"messages[{i}].content must be a string or a list of parts")
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ValueError(f"messages[{i}].content[{j}] must be an object with a type")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"messages[{i}].content[{j}].text must be a string")


def _heap_trimmer() -> Callable[[], Any]:
    """A call that gives the C heap's free pages back to the system (a no-op where there is
    none). Tokenizing a 1 MB prompt takes ~180 MB that glibc keeps once freed: the server's
    RSS grew with each such request and never came back, though nothing was still in use.
    Called after each request: ~3 ms after a large one, ~0 when there is nothing to give."""
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):
        return lambda: None
    trim = getattr(libc, "malloc_trim", None)  # glibc
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        return lambda: trim(0)
    relief = getattr(libc, "malloc_zone_pressure_relief", None)  # macOS (not tested here)
    if relief is not None:
        relief.argtypes, relief.restype = [ctypes.c_void_p, ctypes.c_size_t], ctypes.c_size_t
        return lambda: relief(None, 0)
    return lambda: None


release_free_memory = _heap_trimmer()


def short_id(path: Path) -> str:
    """A model's id in /v1/models and in requests: its bundle folder's name."""
    return path.name


class FlashModelProvider(mlx_server.ModelProvider):
    """mlx-lm's ModelProvider, loading with `mlx_flash.load` and the engine's options. It
    serves the model it was started with (by its short id, the --model text, or mlx-lm's
    "default_model") and the bundles in mlx_flash's cache (by short id), nothing else."""

    def __init__(self, cli_args: argparse.Namespace):
        super().__init__(cli_args)
        self.source = cli_args.model  # None: the embedded default model
        self.started: Path | None = None  # its bundle, once loaded
        self.aliases: set[str] = set()
        self.context: int | None = None  # the loaded model's, for the prompt's bound
        self.bound = ""  # the bound, in words

    def load_default(self) -> None:
        if self.started is not None:  # mlx-lm's generation loop asks again once started
            return
        # as generate does: a --model that is not a bundle is converted into the cache first
        self._load(self.source)
        self.started = self.model.flash.bundle.path
        self.aliases = {DEFAULT_MODEL_KEY, short_id(self.started)} | (
            {self.source} if self.source else set())

    def model_ids(self) -> list[str]:
        """The served models' ids, the started model's first."""
        first = short_id(self.started)
        return [first, *sorted(set(self.cached()) - {first})]

    def cached(self) -> dict[str, Path]:
        from .paths import home, is_bundle

        folder = home() / "bundles"
        if not folder.is_dir():
            return {}
        return {short_id(p): p for p in folder.iterdir() if p.is_dir() and is_bundle(p)}

    def resolve(self, name: str) -> Path:
        """The bundle a request's `model` names. The name is looked up among the served
        models' names, never opened as a path."""
        if name in self.aliases:
            return self.started
        path = self.cached().get(name)
        if path is None:
            raise RequestRefused(404, UNKNOWN_MODEL)
        return path

    def load(self, model_path: str, adapter_path: str | None = None,
             draft_model_path: str | None = None) -> tuple[Any, Any]:
        # mlx-lm passes the request's `model`, `adapters` and `draft_model` here
        if adapter_path is not None or draft_model_path not in (None, DEFAULT_MODEL_KEY):
            raise RequestRefused(400, "mlx_flash.server serves no adapters or draft models")
        path = str(self.resolve(model_path))
        if self.model_key != (path, None, None):
            self._load(path)
        return self.model, self.tokenizer

    def _load(self, model_path: str | None, adapter_path: str | None = None,
              draft_model_path: str | None = None) -> None:
        from . import load

        args = self.cli_args
        self.reset()
        gc.collect()
        mx.clear_cache()
        model, tokenizer = load(model_path, tokenizer_config=self._tokenizer_config,
                                **load_options(args))
        if args.use_default_chat_template and tokenizer.chat_template is None:
            tokenizer.chat_template = tokenizer.default_chat_template
        self.model_key = (str(model.flash.bundle.path), None, None)
        self.model, self.tokenizer = model, tokenizer
        self.context = args.max_kv_size or model.flash.bundle.config.get(
            "max_position_embeddings")
        self.bound = f"this model's context of {self.context}"
        plan = model.flash.plan  # a budget you set holds a KV cache of plan.context tokens
        if plan.budget is not None and not plan.automatic and plan.context < (
                self.context or 2**63):  # past it, the KV cache grows over the budget
            self.context = plan.context
            self.bound = f"the context of {plan.context} tokens the memory budget holds"
        self.processor = self.draft_model = None
        # The flash engine serves one sequence at a time from its neuron matrix.
        self.is_batchable = False


def check_generation(provider: FlashModelProvider, prompt: list[int],
                     args: mlx_server.GenerationArguments) -> None:
    """Refuse (400) what would index past the loaded model's arrays or run past its context
    (or its budget's KV cache): token ids at or past the vocabulary, top_k beyond it."""
    vocab = vocab_size(provider.model)
    for token, bias in (args.logits.logit_bias or {}).items():
        if not 0 <= token < vocab:
            raise RequestRefused(400, f"logit_bias: token id {token} is not in the vocabulary "
                                 f"(0 to {vocab - 1})")
        if not math.isfinite(bias):
            raise RequestRefused(400, f"logit_bias: the bias of token {token} is not finite")
    if args.sampling.top_k >= vocab:
        raise RequestRefused(400, f"top_k must be below the vocabulary's {vocab} tokens "
                             "(0 turns it off)")
    if args.top_logprobs >= vocab:
        raise RequestRefused(400, f"top_logprobs must be below the vocabulary's {vocab} tokens")
    if prompt and not 0 <= min(prompt) <= max(prompt) < vocab:
        raise RequestRefused(400, "the prompt has token ids outside the model's vocabulary")
    if provider.context and len(prompt) > provider.context:
        raise RequestRefused(400, f"the prompt has {len(prompt)} tokens, more than "
                             f"{provider.bound}")


class FlashResponseGenerator(mlx_server.ResponseGenerator):
    """mlx-lm's generation thread, checking each request against the loaded model and
    stopping the work of clients that have gone."""

    model_provider: FlashModelProvider

    def __init__(self, *args: Any, **kwargs: Any):
        self.startup_error: BaseException | None = None
        super().__init__(*args, **kwargs)

    def _run_generate(self) -> None:
        # the started model loads here, in the generation thread (MLX streams are per
        # thread); an error is kept for main() to report in one line
        try:
            self.model_provider.load_default()
        except Exception as e:
            if not isinstance(e, load_errors()):
                logging.exception("loading the model failed")
            self.startup_error = e
            self._generation_failed = True
            return
        super()._run_generate()

    def _tokenize(self, tokenizer: Any, request: Any, args: Any) -> Any:
        try:
            tokenized = super()._tokenize(tokenizer, request, args)
        except Exception as e:  # the request's messages, as the template or tokenizer saw them
            message = str(e).strip().splitlines()
            raise RequestRefused(400, "the prompt could not be made from the request: "
                                 + (message[0] if message else type(e).__name__)) from e
        check_generation(self.model_provider, tokenized[0], args)
        return tokenized

    def _serve_single(self, request: tuple, stream: Any) -> None:
        rqueue, completion, args = request
        client = getattr(completion, "client", None)
        if client is not None:
            rqueue = WatchedQueue(rqueue, client)
            if client_gone(client):  # left while queued: not even its prompt is tokenized
                rqueue.put(ClientGone("the client closed its connection"))
                return
        super()._serve_single((rqueue, completion, args), stream)
        release_free_memory()  # what tokenizing and generating freed (_heap_trimmer)

    def generate(self, *args: Any, **kwargs: Any) -> tuple[Any, Iterator[Any]]:
        # mlx-lm raises the request's error from a variable that holds it: see `detached`
        try:
            ctx, responses = super().generate(*args, **kwargs)
        except Exception as e:
            raise detached(e) from None
        return ctx, _detaching(responses)


def _detaching(responses: Iterator[Any]) -> Iterator[Any]:
    try:
        yield from responses
    except Exception as e:
        raise detached(e) from None


class FlashAPIHandler(mlx_server.APIHandler):
    """mlx-lm's request handler, given only requests whose body has arrived whole and is JSON
    (see do_POST); /v1/models lists the served models by short id."""

    response_generator: FlashResponseGenerator

    def setup(self) -> None:
        # bounds each read of the request line and headers (http.server closes the connection
        # on a timeout); the body has a deadline of its own (read_body)
        self.timeout = getattr(self.response_generator.cli_args, "request_timeout",
                               DEFAULT_REQUEST_TIMEOUT)
        super().setup()

    def _set_completion_headers(self, status_code: int = 200) -> None:
        # mlx-lm answers 404 to any error raised while a request is queued (it calls this in
        # its `except` block); a request refused here carries its own status, anything else
        # failed in the server (500)
        error = sys.exc_info()[1]
        if isinstance(error, RequestRefused):
            status_code = error.status
        elif error is not None and status_code == 404:
            status_code = 500
        super()._set_completion_headers(status_code)

    def read_body(self) -> bytes:
        """The request's body, all of it within the request timeout. mlx-lm reads it with
        rfile.read(Content-Length), no timeout: a length of -1 reads to the end of a stream
        the client keeps open, one longer than the body waits for bytes that never come."""
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestRefused(411, "Content-Length header is required")
        length = length.strip()
        if not (length.isascii() and length.isdigit()):
            raise RequestRefused(400, "Invalid Content-Length header: not a number of bytes")
        size = int(length)
        if size > MAX_BODY_BYTES:
            raise RequestRefused(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        deadline = time.monotonic() + self.timeout
        chunks, got = [], 0
        while got < size:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                self.connection.settimeout(left)
                chunk = self.rfile.read1(min(size - got, BODY_CHUNK))
            except TimeoutError:
                raise RequestRefused(408, f"the body did not arrive within {self.timeout:g} s "
                                     f"({got} of its {size} bytes)") from None
            if not chunk:
                raise RequestRefused(400, f"the body ended after {got} of its {size} bytes")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def refuse(self, error: RequestRefused) -> None:
        """Answer `error` in one line and close the connection (the client may be gone)."""
        body = json.dumps({"error": str(error)}).encode()
        self.close_connection = True
        try:
            super()._set_completion_headers(error.status)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass

    def do_POST(self) -> None:
        # The body is read and checked here, then mlx-lm's do_POST reads it again from memory
        # (it reads and parses the socket's stream itself; its faults are listed in read_body
        # and parse_body)
        raw = b""
        try:
            try:
                raw = self.read_body()
                parse_body(raw)
            except RequestRefused as e:
                self.refuse(e)
                return
            self.connection.settimeout(None)  # the answer is mlx-lm's, written as it writes it
            stream, self.rfile = self.rfile, io.BytesIO(raw)
            try:
                super().do_POST()
            finally:
                self.rfile, self.body = stream, None
        finally:
            del raw
            release_free_memory()  # what reading and parsing the body freed (_heap_trimmer)

    def validate_model_parameters(self) -> None:
        super().validate_model_parameters()
        check_fields(self.body, self.path)
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError("seed must be between 0 and 2**64 - 1")
        if self.path == "/v1/completions" and not isinstance(self.body.get("prompt"), str):
            raise ValueError("prompt must be a string")

    def _with_client(self, make: Callable[[], mlx_server.CompletionRequest]
                     ) -> ClientRequest:
        base = make()
        return ClientRequest(**vars(base), client=self.connection)

    def handle_chat_completions(self) -> ClientRequest:
        return self._with_client(super().handle_chat_completions)

    def handle_text_completions(self) -> ClientRequest:
        return self._with_client(super().handle_text_completions)

    def handle_completion(self, request: Any, stop_words: list[str]) -> None:
        try:
            super().handle_completion(request, stop_words)
        except (ClientGone, ConnectionError):  # ConnectionError: writing to it, once gone
            logging.info("client went away: its request stopped")

    def handle_models_request(self) -> None:
        provider = self.response_generator.model_provider
        wanted = self.path.split("/", 3)[3] if self.path.count("/") >= 3 else None
        models = [{"id": name, "object": "model", "created": self.created}
                  for name in provider.model_ids() if wanted in (None, "", name)]
        body = json.dumps({"object": "list", "data": models}).encode()
        self._set_completion_headers(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()


def build_parser() -> argparse.ArgumentParser:
    from .cli import add_kv_arguments  # mlx-lm's --kv-* flags, checked, counted by the budget
    # (Parser takes no abbreviations: a prefix of one of mlx-lm's flags goes on to mlx-lm)
    p = Parser(prog="python -m mlx_flash server",
               description="Serve a model over HTTP with mlx-lm's OpenAI-compatible server "
               "(/v1/chat/completions, /v1/completions, /v1/models), its FFN weights read from "
               "flash.",
               epilog="Every other mlx_lm.server flag (--port, --temp, --max-tokens, "
               "--prefill-step-size, --log-level, ...) is passed on to it: see "
               "python -m mlx_lm server --help.")
    add_model_argument(p)
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--request-timeout", type=float_in(0, low_open=True),
                   default=DEFAULT_REQUEST_TIMEOUT, metavar="SECONDS",
                   help="the time a client has to send its request's headers, and then its "
                   f"body (default {DEFAULT_REQUEST_TIMEOUT:g}); a slower one is answered 408")
    add_engine_arguments(p)
    add_kv_arguments(p)
    return p


@interruptible
def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    errors: list[BaseException] = []

    def make_provider(mlx_args: argparse.Namespace) -> FlashModelProvider:
        for name, value in vars(args).items():
            setattr(mlx_args, name, value)
        return FlashModelProvider(mlx_args)

    def run(host: str, port: int, provider: FlashModelProvider) -> None:
        from .cli import serve_or_follow
        generator = FlashResponseGenerator(provider, mlx_server.LRUPromptCache(
            provider.cli_args.prompt_cache_size))
        try:
            while provider.model is None and generator.generation_available():
                time.sleep(0.05)  # serve once the model is loaded, or say why it is not
        except KeyboardInterrupt:
            generator.stop_and_join()  # its thread would keep the process alive
            raise
        if not generator.generation_available():
            errors.append(generator.startup_error or RuntimeError("the model did not load"))
            return
        serve_or_follow(host, port, generator, FlashAPIHandler)  # a pipeline's rank 0 serves

    # mlx-lm's main() parses its own flags, then calls ModelProvider(args) and run() by name
    saved = mlx_server.ModelProvider, mlx_server.run, sys.argv
    mlx_server.ModelProvider, mlx_server.run = make_provider, run
    sys.argv = ["mlx_flash server", "--host", args.host, *rest]
    try:
        mlx_server.main()
    finally:
        mlx_server.ModelProvider, mlx_server.run, sys.argv = saved
    if errors:
        print(f"error: {errors[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
