"""The HTTP server (mlx-lm's, loading through mlx_flash), as a client on 127.0.0.1 uses it and
as a hostile one tries it (issues 13 and 23): it serves only its own models, never opens what a
request names, refuses token ids past the vocabulary and prompts past the context, stops the
work of a client that has gone, answers a malformed request 400 (or 408, 411, 413) in one line
and goes on serving, and gives back the memory large and abandoned requests took."""

from __future__ import annotations

import argparse
import json
import math
import select
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mlx_flash.server import UNKNOWN_MODEL, ClientGone, WatchedQueue

ROOT = Path(__file__).parent.parent
CONTEXT = 200  # the served tiny model's --max-kv-size: its prompts' bound
REQUEST_TIMEOUT = 2  # the served model's --request-timeout, seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    # its log: a pipe no one reads would fill, and block the server
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (open while the server runs)
    proc = subprocess.Popen([sys.executable, "-m", "mlx_flash", "server", "--port", str(port),
                             *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=1)
            return proc, base
        except OSError:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"the server exited: {log.read()}") from None
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start within 90 s")


@pytest.fixture(scope="module")
def served(tiny_bundle):
    """(process, URL) of the tiny model served with the engine's options, on 127.0.0.1 (the
    default host)."""
    proc, base = start("--model", str(tiny_bundle), "--max-kv-size", str(CONTEXT),
                       "--window", "2", "--threads", "2", "--sparsity", "off",
                       "--request-timeout", str(REQUEST_TIMEOUT))
    yield proc, base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(served):
    return served[1]


def post(base: str, body: dict, path: str = "/v1/chat/completions",
         timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def chat(content: str = "the theme", **fields) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}


def assert_answers(base: str) -> None:
    status, reply = post(base, chat())
    assert status == 200 and reply["usage"]["completion_tokens"] >= 1, reply


def exchange(base: str, body: bytes = b"", length: str | None = "",
             path: str = "/v1/chat/completions", timeout: float = 30,
             linger: float = 0) -> tuple[int | None, dict | None]:
    """POST `body` as it is, with a Content-Length header of `length` ("": the body's length,
    None: no header), and read the answer until the server closes the connection: its status
    and JSON body, or (None, None) if it closed without answering. `linger`: seconds to wait
    before reading (the server answers as soon as it can; the client is still sending)."""
    port = int(base.rsplit(":", 1)[1])
    header = b"" if length is None else b"Content-Length: %s\r\n" % (
        str(len(body)) if length == "" else length).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s"
                  b"\r\n" % (path.encode(), header) + body)
        time.sleep(linger)
        answer = b""
        while chunk := s.recv(65536):  # socket.timeout if the server neither answers nor closes
            answer += chunk
    if not answer:
        return None, None
    head, _, content = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(content)


def assert_refused(reply: dict | None, *words: str) -> None:
    """A one-line message that names what was wrong (`words`), and no Python in it."""
    message = reply["error"]
    assert "\n" not in message and all(w in message for w in words), message
    assert not any(w in message for w in ("Traceback", "object is not", "Error")), message


def test_models_lists_short_ids(server, tiny_bundle):
    with urllib.request.urlopen(f"{server}/v1/models", timeout=10) as r:
        ids = [m["id"] for m in json.load(r)["data"]]
    assert ids[0] == tiny_bundle.name and not any("/" in i for i in ids)
    status, reply = post(server, chat(model=tiny_bundle.name))
    assert status == 200, reply


def test_out_of_vocabulary_logit_bias_is_400_and_server_keeps_answering(server):
    """A logit_bias on token 999999999 segfaulted MLX inside mlx_lm.server."""
    for bias in ({"999999999": 5}, {"-1": 5}, {"264": 1}):
        status, reply = post(server, chat(logit_bias=bias))
        assert status == 400 and "logit_bias" in reply["error"], reply
    assert_answers(server)


@pytest.mark.parametrize("fields, path", [
    ({"top_k": 100000}, "/v1/chat/completions"),
    ({"top_k": 264}, "/v1/chat/completions"),
    ({"seed": -1}, "/v1/chat/completions"),
    ({"prompt": [1, 2, 999999]}, "/v1/completions"),
])
def test_fields_reaching_an_index_are_checked(server, fields, path):
    body = chat(**fields) if path.endswith("chat/completions") else {"max_tokens": 2, **fields}
    status, reply = post(server, body, path)
    assert status == 400, reply
    assert_answers(server)


def test_model_field_never_reaches_the_filesystem(server, tiny_llama):
    """"/etc/shadow" answered 404 with its first bytes; a model folder was converted and
    served to everyone. Any name but the served ones: the same 404, nothing loaded."""
    from mlx_flash.paths import home

    cache = home() / "bundles"
    before = sorted(cache.iterdir()) if cache.exists() else []
    for name in ("/etc/shadow", "/etc", "/no/such/file", str(tiny_llama[0]), "../bundle"):
        status, reply = post(server, chat(model=name))
        assert (status, reply) == (404, {"error": UNKNOWN_MODEL}), name
    status, reply = post(server, chat(adapters=str(tiny_llama[0])))
    assert status == 400
    assert (sorted(cache.iterdir()) if cache.exists() else []) == before
    assert_answers(server)


def test_prompt_longer_than_the_context_is_400(server):
    status, reply = post(server, {"prompt": "the " * (CONTEXT + 10), "max_tokens": 2},
                         "/v1/completions")
    assert status == 400 and f"context of {CONTEXT}" in reply["error"], reply
    assert_answers(server)


def test_prompt_longer_than_the_context_a_budget_holds_is_400(tmp_path):
    """A --memory-budget that holds a KV cache of 300 tokens (no --max-kv-size), for a model of
    4096 positions: a longer prompt would grow the cache past the budget, and is refused in one
    line that names that context; a shorter one is served."""
    from tiny_models import TINY_LLAMA, write_hf_llama

    import mlx_flash
    from mlx_flash.convert import convert

    write_hf_llama(tmp_path / "llama", {**TINY_LLAMA, "max_position_embeddings": 4096})
    bundle = tmp_path / "bundle"
    convert(tmp_path / "llama", bundle, dtype="float32", progress=False)
    budget = mlx_flash.load(bundle, memory_budget=10**12, context=300,
                            sparsity="off")[0].flash.plan.minimum  # fits 300 tokens, not 301
    proc, base = start("--model", str(bundle), "--memory-budget", str(budget),
                       "--sparsity", "off", "--threads", "2")
    try:
        status, reply = post(base, {"prompt": "the " * 400, "max_tokens": 2},
                             "/v1/completions")
        assert status == 400, reply
        assert_refused(reply, "the context of 300 tokens the memory budget holds")
        assert_answers(base)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_abandoned_request_stops(server):
    """A client that sent a long request and left: its work stops, so the next client is
    answered at once (it waited for the whole abandoned generation)."""
    port = int(server.rsplit(":", 1)[1])
    body = json.dumps({"prompt": "the", "max_tokens": 10**6,
                       "logit_bias": {"2": -1000}}).encode()  # never its end-of-text token
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(1.0)  # generating
    started = time.time()
    status, reply = post(server, chat(), timeout=30)
    assert status == 200, reply
    assert time.time() - started < 15


def test_watched_queue_stops_between_prefill_chunks_and_tokens():
    """Prefill progress and tokens raise once the client has closed; the rest passes."""
    from queue import Queue

    from mlx_lm.server import Response

    ours, theirs = socket.socketpair()
    queue: Queue = Queue()
    watched = WatchedQueue(queue, ours)
    watched.put((1, 10))
    theirs.sendall(b"more of the request")  # data waiting is not a closed connection
    watched.put(Response("a", 1, 0.0, None, ()))
    ours.recv(100)  # the server read the request
    theirs.close()
    for item in ((2, 10), Response("b", 2, 0.0, None, ())):
        with pytest.raises(ClientGone):
            watched.put(item)
    error = ValueError("x")
    watched.put(error)
    watched.put(None)
    assert [queue.get() for _ in range(4)][2:] == [error, None]
    ours.close()


def test_engine_options_reach_load(tiny_bundle, monkeypatch):
    import mlx_flash
    from mlx_flash.cli import kv_options
    from mlx_flash.server import DEFAULT_HOST, FlashModelProvider, build_parser

    args, rest = build_parser().parse_known_args([
        "--model", str(tiny_bundle), "--memory-budget", "8G", "--sparsity", "off",
        "--window", "3", "--threads", "4", "--cold", "--max-kv-size", "128", "--port", "9"])
    assert args.host == DEFAULT_HOST == "127.0.0.1" and rest == ["--port", "9"]
    mlx_args = argparse.Namespace(pipeline=False, adapter_path=None, draft_model=None,
                                  trust_remote_code=False, chat_template="",
                                  use_default_chat_template=False, **vars(args))
    seen = {}
    real = mlx_flash.load

    def load(path, **kw):
        seen.update(kw, path=path, calls=seen.get("calls", 0) + 1)
        return real(path, **kw)

    monkeypatch.setattr(mlx_flash, "load", load)
    provider = FlashModelProvider(mlx_args)
    provider.load_default()
    provider.load_default()
    provider.load("default_model")
    provider.load(tiny_bundle.name)
    assert seen.pop("calls") == 1 and seen["path"] == str(tiny_bundle)
    assert {k: seen[k] for k in ("memory_budget", "sparsity", "window", "threads", "cold",
                                 "context", "rotating_kv")} == {
        "memory_budget": 8 * 10**9, "sparsity": "off", "window": 3, "threads": 4, "cold": True,
        "context": 128, "rotating_kv": True}
    assert provider.context == 128
    # mlx-lm's own --kv-* flags, checked here (their choices) and counted by the plan
    kv, rest = build_parser().parse_known_args(["--kv-bits", "8", "--quantized-kv-start", "0"])
    assert rest == [] and kv_options(kv) == {"kv_bits": 8, "kv_group_size": 64,
                                             "quantized_kv_start": 0}
    with pytest.raises(SystemExit):
        build_parser().parse_known_args(["--kv-bits", "7"])


def test_startup_error_is_one_line(tiny_bundle):
    """A budget below the model's minimum: the server says so in one line and exits."""
    r = subprocess.run([sys.executable, "-m", "mlx_flash", "server", "--model",
                        str(tiny_bundle), "--memory-budget", "1KB", "--port", str(free_port())],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: memory budget"), r.stderr
    assert "Traceback" not in r.stderr


# os.preadv fails (EIO) while the file named by MLX_FLASH_TEST_FAIL exists: a disk that errs
# for a while under a running server
FAULTY_SERVER = """
import errno, os, sys
real, flag = os.preadv, os.environ["MLX_FLASH_TEST_FAIL"]
def preadv(fd, buffers, offset):
    if os.path.exists(flag):
        raise OSError(errno.EIO, "Input/output error (injected)")
    return real(fd, buffers, offset)
os.preadv = preadv
from mlx_flash.server import main
sys.exit(main(sys.argv[1:]))
"""


def test_server_answers_as_before_after_read_errors(tiny_bundle, tmp_path, monkeypatch):
    """Read errors in the middle of requests fail those requests; once the disk reads again,
    the same server answers every request exactly as it did before the errors (partial neuron
    caches, so requests read records: none of the failed reads stays in them)."""
    import mlx_flash

    plan = mlx_flash.load(tiny_bundle, memory_budget=10**12, context=CONTEXT)[0].flash.plan
    budget = plan.minimum + (plan.total - plan.minimum) // 2
    flag = tmp_path / "fail"
    monkeypatch.setenv("MLX_FLASH_TEST_FAIL", str(flag))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", FAULTY_SERVER, "--port", str(port),
                             "--model", str(tiny_bundle), "--memory-budget", str(budget),
                             "--max-kv-size", str(CONTEXT), "--sparsity", "off"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
                time.sleep(0.2)
        requests = [chat(text, max_tokens=8, temperature=0.0) for text in
                    ("the theme", "in the", "a the")]
        before = [post(base, r) for r in requests]
        assert all(status == 200 for status, _ in before), before
        flag.touch()
        for r in requests:
            try:
                status, _ = post(base, r, timeout=30)
            except (urllib.error.URLError, ConnectionError):
                status = None  # the connection may end without a status
            assert status != 200
        flag.unlink()
        after = [post(base, r) for r in requests]
        strip = [[c["message"] for c in reply["choices"]] for _, reply in before]
        assert [[c["message"] for c in reply["choices"]] for _, reply in after] == strip
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_nan_temperature_is_400_and_the_server_keeps_serving(server):
    """mlx-lm's json.loads reads NaN, and `NaN < 0` is false: a NaN temperature passed its check
    and answered 200 with garbage."""
    status, reply = post(server, chat(temperature=math.nan))
    assert status == 400, reply
    assert_refused(reply, "NaN")
    assert_answers(server)


@pytest.mark.parametrize("field", [
    b'"temperature": Infinity', b'"temperature": -Infinity', b'"temperature": 1e999',
    b'"top_p": NaN', b'"min_p": NaN', b'"repetition_penalty": NaN', b'"presence_penalty": 1e400',
    b'"logit_bias": {"5": NaN}', b'"xtc_threshold": NaN'])
def test_numbers_that_are_not_finite_are_400(server, field):
    body = b'{"messages": [{"role": "user", "content": "the"}], "max_tokens": 2, %s}' % field
    status, reply = exchange(server, body)
    assert status == 400, reply
    assert_refused(reply, "the body")


@pytest.mark.parametrize("n", [2, 1000000, 0, -1, "1", True, 1.5])
def test_n_other_than_one_is_400(server, n):
    """mlx-lm ignored `n`: n=2 and n=1000000 answered one choice."""
    status, reply = post(server, chat(n=n))
    assert status == 400, reply
    assert_refused(reply, "n must be 1")


def test_n_of_one_is_served(server):
    status, reply = post(server, chat(n=1))
    assert status == 200 and len(reply["choices"]) == 1, reply


@pytest.mark.parametrize("body, words", [
    (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', ["UTF-8"]),
    (b"[" * 100000 + b"]" * 100000, ["nests deeper"]),
    (b'{"a": ' * 150 + b"1" + b"}" * 150, ["nests deeper"]),
    (b'{"messages": [', ["not JSON"]),
    (b'{"max_tokens": ' + b"9" * 5000 + b"}", ["number too long"]),
    (b"[1, 2]", ["JSON dictionary"]),
])
def test_bodies_that_are_not_json_objects_are_400(server, body, words):
    """Bytes that are not UTF-8 and nesting past the parser's recursion closed the connection
    with no answer (UnicodeDecodeError, RecursionError in mlx-lm's do_POST)."""
    status, reply = exchange(server, body)
    assert status == 400, reply
    assert_refused(reply, *words)
    assert_answers(server)


@pytest.mark.parametrize("fields, words", [
    ({"messages": [{"role": "user", "content": "\ud800 the"}]}, ["lone surrogate"]),
    ({"stop": 5}, ["stop"]),
    ({"stop": ["the", 5]}, ["stop"]),
    ({"stop": [""]}, ["stop"]),
    ({"messages": []}, ["messages"]),
    ({"messages": "the theme"}, ["messages"]),
    ({"messages": [5]}, ["messages[0]"]),
    ({"messages": [{"role": 5, "content": "the"}]}, ["messages[0].role"]),
    ({"messages": [{"content": "the"}]}, ["messages[0].role"]),
    ({"messages": [{"role": "user", "content": 5}]}, ["messages[0].content"]),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     ["messages[0].content[0].text"]),
    ({"messages": [{"role": "user", "content": [5]}]}, ["messages[0].content[0]"]),
    ({"stream_options": "yes"}, ["stream_options"]),
    ({"chat_template_kwargs": [1]}, ["chat_template_kwargs"]),
    ({"tools": "x"}, ["tools"]),
    ({"role_mapping": 5}, ["role_mapping"]),
    ({"role_mapping": {"assistant": 5}}, ["role_mapping"]),
])
def test_fields_in_shapes_mlx_lm_fails_on_are_400_in_one_line(server, fields, words):
    """These reached mlx-lm's generation thread and came back 404, with Python's words
    ("'int' object is not iterable", "TextEncodeInput must be Union[...]")."""
    status, reply = post(server, chat(**fields))
    assert status == 400, reply
    assert_refused(reply, *words)


def test_lone_surrogate_in_a_completion_prompt_is_400(server):
    status, reply = exchange(server, b'{"prompt": "the \\udc80", "max_tokens": 2}',
                             path="/v1/completions")
    assert status == 400, reply
    assert_refused(reply, "lone surrogate")


@pytest.mark.parametrize("length, expected", [
    ("-1", 400), ("abc", 400), ("1_0", 400), ("+2", 400), (str(2**40), 413), (None, 411)])
def test_content_length_that_is_no_length_is_answered_at_once(server, length, expected):
    """Content-Length: -1 made mlx-lm read to the end of a stream the client keeps open: the
    connection waited forever. The answer comes at once, with the client still connected."""
    started = time.time()
    status, reply = exchange(server, b'{"messages": []}', length=length, timeout=10)
    assert (status, time.time() - started < 5) == (expected, True), reply
    assert "error" in reply
    assert_answers(server)


def test_body_shorter_than_its_content_length_is_408_within_the_timeout(server):
    """A Content-Length past the body left the connection waiting for bytes that never come.
    The server answers 408 after --request-timeout and closes the connection."""
    body = json.dumps(chat()).encode()
    started = time.time()
    status, reply = exchange(server, body, length=str(len(body) + 100),
                             timeout=REQUEST_TIMEOUT + 20)
    took = time.time() - started
    assert status == 408 and REQUEST_TIMEOUT - 0.5 < took < REQUEST_TIMEOUT + 10, (reply, took)
    assert_refused(reply, "did not arrive", f"{len(body)} of its {len(body) + 100} bytes")
    assert_answers(server)


def test_a_body_that_trickles_in_is_408_within_the_timeout(server):
    """The timeout bounds the whole body, not each read: a byte a second is not a body."""
    port = int(server.rsplit(":", 1)[1])
    started = time.time()
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT + 20) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        while not select.select([s], [], [], 0.5)[0]:  # a byte each half second
            assert time.time() - started < REQUEST_TIMEOUT + 10, "no answer"
            s.sendall(b" ")
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.0 408"), answer
    assert time.time() - started < REQUEST_TIMEOUT + 5


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc's VmRSS")
def test_memory_of_large_and_abandoned_requests_comes_back(served):
    """1 MB prompts (past the context, so refused after tokenizing) and clients that leave:
    the server's RSS grew by 160 MB over these 18 requests (269 to 429 MB) and did not come
    back: the frames of each refused or abandoned request were held in a reference cycle
    through mlx-lm's re-raised error until Python's cyclic GC ran, and glibc kept the ~180 MB
    that tokenizing a 1 MB prompt frees. Now: 267 to 269 MB."""
    proc, base = served
    big = json.dumps({"prompt": "the theme " * 100000, "max_tokens": 2}).encode()
    abandoned = json.dumps({"prompt": "the", "max_tokens": 10**6,
                            "logit_bias": {"2": -1000}}).encode()
    port = int(base.rsplit(":", 1)[1])

    def leave(body: bytes) -> None:  # send a request and go
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                      b"\r\n" % len(body) + body)
            time.sleep(0.3)

    def settled() -> float:  # RSS once the server has finished the requests before this one
        assert_answers(base)
        time.sleep(1)
        return rss_mb(proc.pid)

    before = settled()
    for _ in range(6):
        status, reply = exchange(base, big, path="/v1/completions", timeout=60)
        assert status == 400 and "context" in reply["error"], reply
        leave(big)
        leave(abandoned)
    after = settled()
    assert after - before < 40, (before, after)


def test_a_prompt_the_chat_template_refuses_is_400_in_one_line():
    """A chat template's own error (roles that do not alternate, say) came back 404."""
    from types import SimpleNamespace

    from jinja2 import TemplateError

    from mlx_flash.server import FlashResponseGenerator, RequestRefused

    class Tokenizer:
        has_chat_template = True

        def apply_chat_template(self, *args, **kwargs):
            raise TemplateError("Conversation roles must alternate user/assistant\n(line 2)")

    generator = object.__new__(FlashResponseGenerator)
    generator.model_provider = SimpleNamespace(
        processor=None, cli_args=SimpleNamespace(chat_template_args={}))
    request = SimpleNamespace(request_type="chat", tools=None, role_mapping=None,
                              messages=[{"role": "user", "content": "the"}] * 2)
    with pytest.raises(RequestRefused) as refused:
        generator._tokenize(Tokenizer(), request, SimpleNamespace(chat_template_kwargs=None))
    assert refused.value.status == 400
    assert str(refused.value) == ("the prompt could not be made from the request: "
                                  "Conversation roles must alternate user/assistant")


@pytest.mark.parametrize("after_context", [False, True])
def test_a_failed_request_holds_nothing_once_answered(after_context):
    """mlx-lm raises a request's error again from a variable holding it: a cycle through the
    traceback, which kept the request's frames (its prompt, its KV cache, the request) until
    the cyclic GC ran. Now they go with the error (raised before the request's context, as a
    refusal is, or after it, as a client gone in the middle of its tokens)."""
    import gc
    import weakref
    from queue import Queue

    from mlx_flash.server import FlashResponseGenerator

    class Prompt:
        pass

    def serve(rqueue: Queue) -> weakref.ref:  # the generation thread's side of a request
        prompt = Prompt()
        watched = WatchedQueue(rqueue, None)  # (the client is only polled for tokens)
        if after_context:
            watched.put("context")
        try:
            raise ClientGone("gone")
        except ClientGone as e:
            watched.put(e)
        return weakref.ref(prompt)

    class Requests:  # mlx-lm's queue of requests, each served at once
        def put(self, request: tuple) -> None:
            served.append(serve(request[0]))

    generator = object.__new__(FlashResponseGenerator)
    generator.generation_available = lambda: True
    generator.requests, served = Requests(), []
    request = Prompt()
    sent = weakref.ref(request)
    gc.disable()
    try:
        with pytest.raises(ClientGone):
            _, responses = generator.generate(request, "args")
            list(responses)
        del request
        assert (served[0](), sent()) == (None, None)
    finally:
        gc.enable()
