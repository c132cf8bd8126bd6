"""`x-llama serve`: a real uvicorn server on 127.0.0.1 (background thread) over a tiny trained run, driven by the
official `openai` client and by httpx for the bad inputs. Greedy completions must equal `generate` on the same
prompt, whether a request runs alone, with others sent together, or joins a batch that is already decoding."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn

from axon_shared.config import ConfigError
from x_llama import Llama, LlamaConfig
from x_llama.cli import main
from x_llama.generation import generate
from x_llama.serve import Engine, Job, Sampling, ServeConfig, batch_sizes, create_app, resolve_api_key
from x_llama.train import load_pretrained

from .conftest import tiny_train_args

KEY = "test-key"
LONG_PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife."
PROMPTS = ["In the beginning", "To be, or not to be", "And the LORD said", "It was the best of times", "Call me", "The", "Once upon", "Q"]


@pytest.fixture(scope="module")
def served(tokenizer_path, tmp_path_factory):
    """(base url, model, tokenizer, app): a tiny run served by uvicorn in a thread on a free port."""
    run_dir = tmp_path_factory.mktemp("serve") / "tiny-run"
    main(tiny_train_args(tokenizer_path, run_dir))
    model, tokenizer, _ = load_pretrained(run_dir)
    app = create_app(model, tokenizer, run_dir.name, ServeConfig(checkpoint=str(run_dir), max_batch=16), api_key=KEY)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", model, tokenizer, app
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served[0], headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as h:
        yield h


def reference(served, prompt: str, max_tokens: int) -> str:
    """What `generate` (greedy, alone) continues the prompt with, as text."""
    _, model, tokenizer, _ = served
    ids = tokenizer.encode(prompt, bos=True)
    new = generate(model, [ids], max_tokens, eos_id=tokenizer.eos_id)[0]
    prefix = tokenizer.decode(ids)
    return tokenizer.decode(ids + new)[len(prefix) :]


def complete(client, prompt: str, max_tokens: int = 12, **kwargs):
    return client.completions.create(model="tiny-run", prompt=prompt, max_tokens=max_tokens, temperature=0, **kwargs)


def test_models_and_health(client, http):
    assert [m.id for m in client.models.list().data] == ["tiny-run"]
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-run"


def test_greedy_completions_equal_generate(served, client):
    for prompt in PROMPTS[:4]:
        out = complete(client, prompt, 15)
        assert out.choices[0].text == reference(served, prompt, 15)
        assert out.choices[0].finish_reason in ("length", "stop")
        assert out.usage.prompt_tokens == len(served[2].encode(prompt, bos=True))


def test_streaming_matches_and_ends_with_done(served, client, http):
    stream = complete(client, PROMPTS[1], 20, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == reference(served, PROMPTS[1], 20)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    usage = complete(client, PROMPTS[1], 7, stream=True, stream_options={"include_usage": True}, n=2)
    *choices, last = list(usage)
    assert last.usage.completion_tokens == 14 and {c.choices[0].index for c in choices} == {0, 1}
    body = {"model": "tiny-run", "prompt": "Call me", "max_tokens": 5, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_logprobs_are_the_sampled_tokens(served, client):
    _, model, tokenizer, _ = served
    ids = tokenizer.encode(PROMPTS[0], bos=True)
    expected = generate(model, [ids], 6, eos_id=tokenizer.eos_id, return_logprobs=True).logprobs[0]
    lp = complete(client, PROMPTS[0], 6, logprobs=2).choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(expected, abs=1e-4)
    assert all(len(top) == 2 and max(top.values()) == pytest.approx(v, abs=1e-4) for top, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_concurrent_requests_are_batched_and_equal_sequential(served, client, http):
    lengths = [5, 17, 9, 12, 3, 20, 8, 14]
    sequential = [complete(client, p, m).choices[0].text for p, m in zip(PROMPTS, lengths)]
    before = http.get("/health").json()["max_rows"]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda pm: complete(client, *pm).choices[0].text, zip(PROMPTS, lengths)))
    assert together == sequential
    assert sequential[1] == reference(served, PROMPTS[1], 17)
    assert http.get("/health").json()["max_rows"] > max(before, 1)  # decoded together, not one after another


def test_requests_join_a_batch_that_is_decoding(served, client, http):
    """A short-prompt request decodes slowly; a long-prompt one (the running rows shift right to make room) and a
    short one (the new row is padded) join it mid-way: all three give what they give alone."""
    engine = served[3].state.server.engine
    joined = http.get("/health").json()["joined_while_decoding"]
    engine.step_delay = 0.01
    try:
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(complete, client, PROMPTS[7], 60)
            while http.get("/health").json()["active_rows"] == 0:
                time.sleep(0.005)
            second = pool.submit(complete, client, LONG_PROMPT, 20)
            third = complete(client, PROMPTS[4], 10).choices[0].text
            first, second = first.result().choices[0].text, second.result().choices[0].text
    finally:
        engine.step_delay = 0.0
    assert http.get("/health").json()["joined_while_decoding"] >= joined + 2
    assert [first, second, third] == [reference(served, p, m) for p, m in ((PROMPTS[7], 60), (LONG_PROMPT, 20), (PROMPTS[4], 10))]


def drive(engine: Engine, plan: dict[int, list[tuple[list[int], int]]]) -> tuple[list[Job], list[tuple[int, int, int, int]]]:
    """Run the engine step by step (no thread, no HTTP), submitting the plan's (prompt, max_tokens) requests at their
    steps; returns the jobs and, after each decoding step, (cache length, cache rows, active rows, address of the
    cache's keys)."""
    loop = asyncio.new_event_loop()
    jobs, trace = [], []
    with torch.inference_mode():
        for step in range(400):
            for prompt, max_tokens in plan.get(step, []):
                jobs.append(Job(prompt, Sampling(max_tokens), 1, loop, "cpu"))
                engine.submit(jobs[-1])
            admitted = engine._admit()
            if admitted:
                engine._prefill(admitted)
            if engine.rows:
                engine._step()
                cache = engine.cache
                trace.append((cache.length, cache.batch_size, len(engine.rows), cache.k.data_ptr()) if cache is not None else (0, 0, 0, 0))
            if step > max(plan) and not engine.rows and not engine.waiting:
                break
    loop.close()
    return jobs, trace


def engine_plan(tokenizer) -> dict[int, list[tuple[list[int], int]]]:
    """Requests join at chosen steps and rows leave; the cache must be compacted when the slots would run out (the
    first row spans slots up to 102, the last joins at step 80 and needs 60 more slots of 128)."""
    encode = lambda text: tokenizer.encode(text, bos=True)
    return {
        0: [(encode("Q"), 100)],
        3: [(encode(LONG_PROMPT), 30), (encode("The"), 12)],
        4: [(encode("Once upon"), 12)],
        6: [(encode("Call me"), 8)],
        80: [(encode(LONG_PROMPT), 60)],
    }


def assert_rows_equal_generate(jobs: list[Job], model, tokenizer) -> None:
    for job in jobs:
        expected = generate(model, [job.prompt], job.sampling.max_tokens, eos_id=tokenizer.eos_id)[0]
        assert job.rows[0].new == expected and job.rows[0].finished


def test_engine_rows_joining_leaving_and_compacting_equal_generate(served):
    """The engine driven step by step: the queue waits for a free row (max_batch=3), the cache is compacted, and
    every row's tokens equal `generate` on its prompt alone."""
    _, model, tokenizer, _ = served
    engine = Engine(model, tokenizer, max_batch=3)
    jobs, trace = drive(engine, engine_plan(tokenizer))
    assert engine.stats["max_rows"] == 3 and max(length for length, *_ in trace) <= model.config.max_seq_len
    assert_rows_equal_generate(jobs, model, tokenizer)


def test_compiled_engine_pads_rows_compiles_at_start_and_equals_generate(served):
    """--compile: steps of up to compile_max_rows=4 rows run Llama.decode_step's compiled graph at batch 1, 2 or 4 (three
    rows in a graph of four, with a padding row), steps of 5 rows run eagerly. warm_up compiles the three sizes before
    serving, so no step compiles (dynamo builds no new graph while the requests run); rows join a padded cache, leave,
    cross between the two kinds of step and are compacted, and every row's tokens still equal eager `generate` on its
    prompt alone."""
    from torch._dynamo.utils import counters

    _, model, tokenizer, _ = served
    engine = Engine(model, tokenizer, max_batch=5, compile=True, compile_max_rows=4)
    assert engine.sizes == [1, 2, 4]
    engine.warm_up()
    graphs = counters["stats"]["unique_graphs"]
    jobs, trace = drive(engine, engine_plan(tokenizer))
    assert counters["stats"]["unique_graphs"] == graphs, "a decoding step compiled after warm_up"
    assert {(rows, active) for _, rows, active, _ in trace} >= {(1, 1), (2, 2), (4, 3), (5, 5)}  # 3 rows padded to 4; 5 eager
    assert engine.stats["joined_while_decoding"] >= 2
    assert_rows_equal_generate(jobs, model, tokenizer)


def test_compiled_engine_decodes_joining_rows_in_free_rows_without_copying_the_cache(served):
    """Rows leave and join while 3-4 rows are active, which a compiled graph of 4 rows holds: a finished row's cache
    row stays in place (free: decoded, logits unread) and a joining request is written into it, so the cache is never
    reallocated. The joiners land in rows that held other requests (a short prompt, and a long one that shifts the
    running rows right), and every row's tokens still equal `generate` alone: the old keys are masked."""
    _, model, tokenizer, _ = served
    engine = Engine(model, tokenizer, max_batch=4, compile=True, compile_max_rows=4)
    engine.warm_up()
    encode = lambda text: tokenizer.encode(text, bos=True)
    plan = {
        0: [(encode("Q"), 6), (encode("Call me"), 40), (encode("The"), 45)],
        1: [(encode("Once upon"), 12)],
        10: [(encode("And the LORD said"), 8)],
        16: [(encode(LONG_PROMPT), 15)],
    }
    jobs, trace = drive(engine, plan)
    assert [rows for _, rows, _, _ in trace[:25]] == [4] * 25 and {active for _, _, active, _ in trace[:25]} == {3, 4}
    assert len({address for _, rows, _, address in trace if rows == 4}) == 1, "the cache was copied while its rows fit one graph"
    assert engine.stats["joined_while_decoding"] == 3
    assert_rows_equal_generate(jobs, model, tokenizer)


def test_batch_sizes_and_compile_refuses_what_decode_step_cannot_run(served):
    assert batch_sizes(32) == [1, 2, 4, 8, 16, 32] and batch_sizes(12) == [1, 2, 4, 8, 12] and batch_sizes(1) == [1]
    _, _, tokenizer, _ = served
    alibi = Llama(LlamaConfig.from_preset("tiny", vocab_size=512, max_seq_len=64, position="alibi"))
    with pytest.raises(ConfigError, match="compile=True decodes with Llama.decode_step.*position.*--compile false"):
        Engine(alibi, tokenizer, compile=True)
    Engine(alibi, tokenizer)  # eager serving runs it


def test_stop_sequences_n_and_seed(served, client):
    full = reference(served, PROMPTS[0], 20)
    stop = full[5:8]
    out = complete(client, PROMPTS[0], 20, stop=[stop, "\x00never"]).choices[0]
    assert out.text == full[: full.find(stop)] and out.finish_reason == "stop"
    sample = dict(model="tiny-run", prompt=PROMPTS[3], max_tokens=10, temperature=1.2, top_p=0.9, seed=7, n=3)
    a, b = client.completions.create(**sample), client.completions.create(**sample)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and [c.index for c in a.choices] == [0, 1, 2]


def test_praxis_input(served, http):
    response = http.post("/input", json={"prompt": PROMPTS[1], "max_new_tokens": 11})
    assert response.status_code == 200 and response.json() == {"response": reference(served, PROMPTS[1], 11)}
    sampled = http.post("/input", json={"prompt": PROMPTS[1], "do_sample": True, "top_k": 5, "temperature": 0.7, "max_new_tokens": 4})
    assert sampled.status_code == 200 and isinstance(sampled.json()["response"], str)


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/completions", {"prompt": 5}, 400, "prompt"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt"),
        ("/v1/completions", {}, 400, "prompt"),
        ("/v1/completions", {"prompt": "word " * 300}, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 10_000}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "temperature": -0.1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
        ("/v1/completions", {"prompt": "hi", "stop": [1]}, 400, "stop"),
        ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
        ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 9}, 400, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
        ("/input", {"prompt": "hi", "max_new_tokens": -1}, 400, "max_new_tokens"),
        ("/input", {"prompt": "hi", "num_beams": 4}, 400, "num_beams"),
        ("/input", {"prompt": ["hi", "there"]}, 400, "prompt"),
    ],
)
def test_bad_requests_name_the_field(http, path, body, status, param):
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]
    assert http.get("/health").status_code == 200


def test_malformed_bodies_auth_and_routes(served, http):
    url = served[0]
    assert http.post("/v1/completions", content=b'{"prompt": "hi",', headers={"content-type": "application/json"}).status_code == 400
    assert http.post("/v1/completions", json=["hi"]).status_code == 400
    huge = http.post("/v1/completions", content=b"x" * 10_000_000, headers={"content-type": "application/json"})
    assert huge.status_code == 413 and "limit" in huge.json()["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 401
    wrong = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
    assert http.get("/v2/nothing").status_code == 404
    assert http.get("/health").json()["status"] == "ok"


def test_client_disconnect_mid_stream_frees_its_row(served, http):
    engine = served[3].state.server.engine
    cancelled = http.get("/health").json()["cancelled"]
    engine.step_delay = 0.02
    try:
        body = {"prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as response:
            next(line for line in response.iter_lines() if line.startswith("data: "))
        deadline = time.time() + 1.5  # well before the 100 tokens (>= 2 s) would have finished
        while time.time() < deadline and http.get("/health").json()["active_rows"]:
            time.sleep(0.02)
        health = http.get("/health").json()
    finally:
        engine.step_delay = 0.0
    assert health["active_rows"] == 0 and health["cancelled"] == cancelled + 1


def test_client_that_gives_up_on_a_plain_request_frees_its_row(served, http):
    engine = served[3].state.server.engine
    cancelled = http.get("/health").json()["cancelled"]
    engine.step_delay = 0.02
    try:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0}, timeout=0.3)
        deadline = time.time() + 1.5
        while time.time() < deadline and http.get("/health").json()["active_rows"]:
            time.sleep(0.02)
        health = http.get("/health").json()
    finally:
        engine.step_delay = 0.0
    assert health["active_rows"] == 0 and health["cancelled"] == cancelled + 1


def test_a_failing_step_fails_its_requests_and_the_server_stays_up(served, client, http, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(served[1], "forward", broken)
    response = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    assert response.status_code == 500 and "simulated failure" in response.json()["error"]["message"]
    monkeypatch.undo()
    assert http.get("/health").json()["active_rows"] == 0
    assert complete(client, PROMPTS[0], 4).choices[0].text == reference(served, PROMPTS[0], 4)


def test_serve_command_names_the_model_after_the_run_directory(served, monkeypatch):
    """`x-llama serve` end to end up to uvicorn: the model id, the host default, $AXON_API_KEY, --compile (warmed up
    before serving); the engine loop runs on the calling thread and ends when the HTTP server stops; a server that
    never started is an error that says so."""
    run_dir = served[3].state.server.cfg.checkpoint
    servers = []

    def fake_run(self, sockets=None):  # uvicorn.Server.run, in the serve command's HTTP thread
        servers.append((self, threading.current_thread()))
        self.started = True

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    monkeypatch.setenv("AXON_API_KEY", "k")
    main(["serve", "--checkpoint", run_dir, "--port", "8123", "--compile", "true", "--max_batch", "8", "--compile_max_rows", "2"])
    ((http, thread),) = servers
    assert http.config.host == "127.0.0.1" and http.config.port == 8123 and thread is not threading.main_thread()
    server = http.config.app.state.server
    assert server.model_id == "tiny-run" and server.api_key == "k"
    assert server.engine.compile and server.engine.sizes == [1, 2] and server.engine.stopping
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)  # e.g. the port is taken
    with pytest.raises(SystemExit, match="did not start on 127.0.0.1:8123"):
        main(["serve", "--checkpoint", run_dir, "--port", "8123"])


def test_config_and_api_key_from_environment(monkeypatch):
    with pytest.raises(ConfigError, match="port"):
        ServeConfig(port=70000)
    with pytest.raises(ConfigError, match="max_batch"):
        ServeConfig(max_batch=0)
    assert ServeConfig().host == "127.0.0.1"
    monkeypatch.setenv("AXON_API_KEY", "from-env")
    assert resolve_api_key(ServeConfig()) == "from-env" and resolve_api_key(ServeConfig(api_key="flag")) == "flag"
    with pytest.raises(SystemExit, match="port"):
        main(["serve", "--port", "-1"])
