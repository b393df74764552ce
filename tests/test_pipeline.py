"""A model pipelined over two ranks (two local processes, MLX's ring backend on 127.0.0.1,
started by mlx.launch) decodes what one process decodes, bit for bit, and each rank loads,
plans and reads only its own layers.

Dense (float, 4-bit, a selection mode) and MoE (qwen3_moe float and 4-bit) tiny bundles, at
no budget, the naive engine and three budgets per rank. Skipped, saying why, where the ring
backend cannot start here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tiny_moe import write_tiny_moe

from mlx_flash.errors import UnsupportedModel
from mlx_flash.pipeline import (
    RankView,
    Stage,
    budget_split,
    pipelined_types,
    proportional_split,
    split_model,
)

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
LAUNCH = Path(sys.executable).parent / "mlx.launch"
TIMEOUT = 300  # seconds for one launch of two ranks (they run every case)


def free_ports(n: int = 2) -> int:
    """A port p with p..p+n-1 free (mlx.launch's ring gives rank r port p+r)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        try:
            held = []
            for i in range(n):
                t = socket.socket()
                held.append(t)
                t.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for t in held:
                t.close()
    raise RuntimeError("no free ports")


def launch_command(args: list[str]) -> list[str]:
    """`mlx.launch -n 2 --backend ring -- python ARGS` on this machine's free ports."""
    path = os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return [str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port",
            str(free_ports()), "--env", f"PYTHONPATH={path}", "--", sys.executable, *args]


def launch(args: list[str], timeout: float = TIMEOUT, stdin: str | None = None
           ) -> subprocess.CompletedProcess:
    """`launch_command(args)` run, bounded in time (`stdin`: what every rank reads)."""
    return subprocess.run(launch_command(args), input=stdin, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def ring(tmp_path_factory) -> None:
    """Skip (saying why) unless two ranks meet over the ring backend here."""
    if not LAUNCH.exists():
        pytest.skip(f"no mlx.launch next to {sys.executable}")
    script = tmp_path_factory.mktemp("ring") / "hello.py"
    script.write_text("import mlx.core as mx\ng = mx.distributed.init()\n"
                      "print(g.size(), mx.distributed.all_sum(mx.array(1.0)).item())\n")
    try:
        run = launch([str(script)], timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("the ring backend did not start two ranks within 60 s")
    if run.returncode != 0 or run.stdout.split() != ["2", "2.0", "2", "2.0"]:
        pytest.skip(f"the ring backend cannot start here: {(run.stderr or run.stdout)[-300:]}")


@pytest.fixture(scope="module")
def moe_bundles(tmp_path_factory) -> dict[str, Path]:
    """Tiny qwen3_moe bundles (float32, 4-bit) and the float one's mlx-lm folder (its
    experts streamed from its own files)."""
    from mlx_flash.convert import convert

    out = {}
    for name, bits in (("float", None), ("q4", 4)):
        root = tmp_path_factory.mktemp(f"moe-{name}")
        write_tiny_moe(root / "src", "qwen3_moe", bits=bits)
        convert(root / "src", root / "bundle", progress=False)
        out[name] = root / "bundle"
        out[f"{name} source"] = root / "src"
    return out


CASES = ["dense float off", "dense float hybrid", "dense q4 off", "dense q4 hybrid",
         "moe float", "moe q4", "moe float source"]


@pytest.fixture(scope="module")
def decoded(ring, calibrated, quantized_tiny, moe_bundles, tmp_path_factory):
    """Every case decoded by one process and by two ranks: ({"single", 0, 1}: (results,
    logits))."""
    paths = {"dense float": calibrated, "dense q4": quantized_tiny}
    cases = []
    for case in CASES:
        kind, mode = case.rsplit(" ", 1) if case.startswith("dense") else (case, "off")
        path = moe_bundles[case[4:]] if case.startswith("moe") else paths[kind][mode]
        cases.append({"path": str(path), "mode": mode})
    root = tmp_path_factory.mktemp("pipeline")
    (root / "cases.json").write_text(json.dumps(cases))
    single, ranks = root / "single", root / "ranks"
    single.mkdir()
    ranks.mkdir()
    script = str(TESTS / "pipeline_ranks.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    subprocess.run([sys.executable, script, str(root / "cases.json"), str(single)], env=env,
                   check=True, timeout=TIMEOUT)
    run = launch([script, str(root / "cases.json"), str(ranks)])
    assert run.returncode == 0, run.stderr[-2000:]

    def read(folder: Path, rank: int) -> tuple[list, dict]:
        return (json.loads((folder / f"rank{rank}.json").read_text()),
                dict(np.load(folder / f"rank{rank}.npz")))

    return {"single": read(single, 0), 0: read(ranks, 0), 1: read(ranks, 1)}


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASES)
def test_two_ranks_decode_what_one_process_decodes(decoded, case):
    single_results, single_logits = decoded["single"]
    reference = single_logits[f"{case}_0"]  # one process, no budget
    rows = [i for i, r in enumerate(single_results) if r["case"] == case]
    for rank in (0, 1):
        results, logits = decoded[rank]
        for b, i in enumerate(rows):  # every budget: the same logits, bit for bit
            np.testing.assert_array_equal(logits[f"{case}_{b}"], reference,
                                          err_msg=f"rank {rank} {results[i]['budget']}")


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASES)
def test_each_rank_loads_and_reads_only_its_layers(decoded, case):
    single = [r for r in decoded["single"][0] if r["case"] == case]
    ranks = {rank: [r for r in decoded[rank][0] if r["case"] == case] for rank in (0, 1)}
    layers = len([k for k in single[0]["loaded"] if k != "shared"])
    # mlx-lm's even split: rank 1 the first layers, rank 0 the last
    assert ranks[1][0]["layers"] == [0, layers // 2]
    assert ranks[0][0]["layers"] == [layers // 2, layers]
    for b, one in enumerate(single):
        mine = {rank: ranks[rank][b] for rank in (0, 1)}
        for got in mine.values():
            start, end = got["layers"]
            assert {int(k) for k in got["loaded"] if k != "shared"} == set(range(start, end))
            assert got["loaded"]["shared"] == one["loaded"]["shared"]
            assert all(start <= layer < end for layer in got["cached_layers"])
            assert got["decode_tokens"] == one["decode_tokens"]  # every rank counts them
        # the layers' weights and the FFN records: split between the ranks, none twice
        for key, value in one["loaded"].items():
            if key != "shared":
                assert sum(m["loaded"].get(key, 0) for m in mine.values()) == value
        assert mine[0]["ffn_bytes"] + mine[1]["ffn_bytes"] == one["ffn_bytes"]
        if one["budget"] == "off":  # naive: every token reads its selection, layer by layer
            assert mine[0]["decode_bytes"] + mine[1]["decode_bytes"] == one["decode_bytes"]
        # what each rank's plan counts as resident: its own layers' weights and the shared
        # ones, dense or MoE (test_dense_rank_plans_only_its_layers_resident_weights: exactly)
        assert max(m["resident"] for m in mine.values()) < one["resident"]


def test_generate_command_under_mlx_launch(ring, moe_bundles):
    """The user's command line: rank 0 alone prints the text one process prints; each
    rank's stats line names its layers."""
    args = ["--model", str(moe_bundles["q4"]), "--prompt", "hi", "--max-tokens", "8"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    alone = subprocess.run([sys.executable, "-m", "mlx_flash", "generate", *args], env=env,
                           capture_output=True, text=True, timeout=TIMEOUT, check=True)
    lone = subprocess.run([sys.executable, "-m", "mlx_flash", "generate", *args, "--pipeline"],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT, check=True)
    assert lone.stdout == alone.stdout  # a group of one: the whole model, as mlx_lm
    for command in (["-m", "mlx_flash", "generate"], ["-m", "mlx_flash.generate"]):
        run = launch([*command, *args, "--pipeline"])
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout == alone.stdout and alone.stdout.strip()
        stats = sorted(line for line in run.stderr.splitlines() if line.startswith("[stats"))
        assert [s.split("]")[0] for s in stats] == [
            "[stats rank 0 of 2, layers 1-1 of 2", "[stats rank 1 of 2, layers 0-0 of 2"]


def test_chat_and_server_under_mlx_launch(ring, moe_bundles):
    """chat --pipeline: rank 0 alone answers, as one process answers; server --pipeline:
    rank 0 serves what one process serves (the other rank follows its requests)."""
    import signal
    import time
    import urllib.request

    model = ["--model", str(moe_bundles["float"]), "--max-tokens", "8"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    alone = subprocess.run([sys.executable, "-m", "mlx_flash", "chat", *model], env=env,
                           input="hello\nq\n", capture_output=True, text=True,
                           timeout=TIMEOUT, check=True)
    chat = launch(["-m", "mlx_flash", "chat", *model, "--pipeline"], stdin="hello\nq\n")
    assert chat.returncode == 0 and chat.stdout == alone.stdout, chat.stderr[-2000:]
    port = free_ports(1)
    server = subprocess.Popen(launch_command(["-m", "mlx_flash", "server", *model, "--pipeline",
                                              "--port", str(port)]), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # its ranks die with their group
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", headers={"Content-Type": "application/json"},
        data=json.dumps({"prompt": "hi", "max_tokens": 8, "temperature": 0}).encode())
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    served = json.load(answer)["choices"][0]["text"]
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.5)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    one = subprocess.run([sys.executable, "-m", "mlx_flash", "generate", *model, "--prompt",
                          "hi", "--no-chat", "--quiet"], env=env, capture_output=True,
                         text=True, timeout=TIMEOUT, check=True)
    assert served + "\n" == one.stdout


def test_split_follows_mlx_lm_and_budgets():
    group = mx.distributed.init()  # one process: a group of one
    assert budget_split(group, 8 * 2**30, 7) == [7]
    from tiny_moe import build_mlx_lm, moe_config

    model = build_mlx_lm(moe_config("qwen3_moe", 64, num_hidden_layers=3))
    stage = split_model(model, group)
    assert (stage.rank, stage.size, stage.start, stage.end) == (0, 1, 0, 3)
    assert stage.owns("model.layers.2.self_attn.q_proj.weight") and stage.owns("lm_head.weight")
    assert {"llama", "qwen2", "qwen3_moe", "deepseek_v3"} <= set(pipelined_types())


def test_budget_split_is_proportional():
    assert proportional_split([3e9, 1e9], 8) == [6, 2]
    assert proportional_split([1.0, 1.0, 1.0], 7) == [3, 2, 2]  # ties: the lowest rank
    assert proportional_split([100.0, 1.0], 4) == [3, 1]  # every rank at least one layer
    assert sum(proportional_split([5.0, 7.0, 11.0], 48)) == 48
    with pytest.raises(ValueError):
        proportional_split([1.0, 1.0, 1.0], 2)


def test_models_without_pipeline_are_refused_in_one_line(relu_bundle):
    from mlx_flash.arch import get_architecture
    from mlx_flash.bundle import Bundle

    config = Bundle.open(relu_bundle).config
    model = get_architecture(config).build(config)
    with pytest.raises(UnsupportedModel) as e:
        split_model(model, mx.distributed.init())
    assert "no pipeline()" in str(e.value) and "qwen3_moe" in str(e.value)
    assert "\n" not in str(e.value)


def test_rank_view_shows_only_its_layers(moe_bundles):
    from mlx_flash.bundle import EXPERTS, Bundle

    bundle = Bundle.open(moe_bundles["float"])
    view = RankView(bundle, Stage(0, 2, 1, 2, 2))
    assert [n for _, n in view.families[EXPERTS].segments] == [
        0, bundle.families[EXPERTS].segments[1][1]]
    assert view.config["num_hidden_layers"] == 1 and bundle.config["num_hidden_layers"] == 2
    assert all("layers.0." not in k for k in view.load_resident())
    assert view.loaded_resident_bytes(4) < sum(
        v.nbytes * 4 // v.itemsize if mx.issubdtype(v.dtype, mx.floating) else v.nbytes
        for v in bundle.load_resident().values())


def test_dense_rank_plans_only_its_layers_resident_weights(tiny_bundle):
    """A dense rank's memory plan counts the resident weights it loads: its layers' and the
    shared ones (embeddings, final norm, head), none of another rank's layers."""
    from mlx_flash.bundle import Bundle
    from mlx_flash.memory import plan_memory
    from mlx_flash.pipeline import LAYER_NAME

    bundle = Bundle.open(tiny_bundle)
    layers = int(bundle.config["num_hidden_layers"])
    assert layers >= 2
    by_layer: dict[int | None, int] = {}  # the stored tensors as float16 (itemsize 2), by layer
    for name, weight in mx.load(str(bundle.resident_path)).items():
        assert mx.issubdtype(weight.dtype, mx.floating) and weight.itemsize == 4
        found = LAYER_NAME.search(name)
        key = int(found.group(1)) if found else None
        by_layer[key] = by_layer.get(key, 0) + weight.size * 2

    def resident(view) -> int:
        return plan_memory(view, 2, 0, [], None, 256, default_full=False).resident

    assert resident(bundle) == sum(by_layer.values())
    for start, end in ((0, 1), (1, layers)):
        view = RankView(bundle, Stage(0, 2, start, end, layers))
        assert resident(view) == by_layer[None] + sum(by_layer[i] for i in range(start, end))
