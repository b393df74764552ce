"""Serve a flash bundle with mlx-lm's OpenAI-compatible server, then ask it something.

    python examples/serve.py [--model BUNDLE_OR_MODEL] [--port PORT]

Starts `python -m mlx_flash server` (mlx-lm's server; the model loads through mlx_flash), waits
until it answers, sends one chat completion request with the standard library, prints the
reply and stops the server. Any OpenAI client pointed at http://127.0.0.1:PORT/v1 works alike.
"""

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=None, help="bundle, GGUF file or model folder")
parser.add_argument("--port", type=int, default=0, help="port to serve on (default: a free one)")
parser.add_argument("--prompt", default="Name three primary colors.")
args = parser.parse_args()

port = args.port
if port == 0:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
command = [sys.executable, "-m", "mlx_flash", "server", "--port", str(port)]  # on 127.0.0.1
if args.model:
    command += ["--model", args.model]
server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
base = f"http://127.0.0.1:{port}"
try:
    for _ in range(240):  # the first start may convert the default model
        try:
            urllib.request.urlopen(f"{base}/health", timeout=1)
            break
        except OSError:
            if server.poll() is not None:
                sys.exit(f"the server exited with code {server.returncode}")
            time.sleep(0.5)
    else:
        sys.exit("the server did not start within 120 s")
    request = urllib.request.Request(
        f"{base}/v1/chat/completions",
        data=json.dumps({"messages": [{"role": "user", "content": args.prompt}],
                         "max_tokens": 40, "temperature": 0}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        reply = json.load(r)
    print(reply["choices"][0]["message"]["content"])
    print(f"usage: {reply['usage']}")
finally:
    server.terminate()
    server.wait(timeout=30)
