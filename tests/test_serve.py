"""`gptrain serve`: the real server on a free localhost port, driven over HTTP, by OpenAI's client and
against `gptrain generate`; the batching engine alone, against generate_tokens."""

import asyncio
import functools
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from gptrain.batching import Engine, Finish, PromptLogprobs, RowCache, Request, Sampling, Token
from gptrain.sampling import generate_tokens, sample_generators
from gptrain.generate import main as generate
from gptrain.serve import main
from gptrain.tokenizer import CharTokenizer
from serving import CHARS, CPU, free_port, port_is_free, random_model, running_server, serve_command, write_checkpoint

uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")  # the tests' HTTP client, in gptrain[dev]

MODERN = {"pos_emb": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "swiglu", "tie_embeddings": False}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("served") / "tiny-char", random_model())


@pytest.fixture(scope="module")
def server(checkpoint):
    with running_server(checkpoint, max_batch_size=16) as (url, app):
        yield url, app


@pytest.fixture
def url(server) -> str:
    return server[0]


def complete(url: str, **body) -> dict:
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def post_at_once(url: str, bodies: list[dict]) -> list[httpx.Response]:
    """Send every completion request at the same moment; their responses, in order."""
    async def all_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
    return asyncio.run(all_at_once())


def hold_prompts_until_tried(engine: Engine, requests: int, monkeypatch) -> None:
    """The engine feeds no prompt until `requests` submissions have been tried (taken or refused), so that how
    fast the clients' requests arrive on a busy machine cannot decide how they are batched or whether they are
    taken: all arrive before any prompt starts, or finishes and frees its row."""
    tried, all_tried = [], threading.Event()
    submit, prefill_step = engine.submit, engine._prefill_step

    def counting_submit(batch):
        try:
            submit(batch)
        finally:
            tried.append(batch)
            if len(tried) >= requests:
                all_tried.set()

    def waiting_prefill_step():
        all_tried.wait(timeout=60)  # on the engine's thread: no assert here, the results tell
        prefill_step()

    monkeypatch.setattr(engine, "submit", counting_submit)
    monkeypatch.setattr(engine, "_prefill_step", waiting_prefill_step)


def generated(capsys, checkpoint, prompt: str, *args: str) -> str:
    capsys.readouterr()
    generate(["--model_path", str(checkpoint), "--prompt", prompt, "--device", "cpu", *args])
    return capsys.readouterr().out.removesuffix("\n")  # generate ends its sample with a line break


@pytest.mark.parametrize("settings", [
    {"temperature": 0.0},
    {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 7},
    {"temperature": 1.3, "top_k": 0, "top_p": 1.0, "seed": 3},
], ids=["greedy", "sampled", "hot"])
def test_a_completion_equals_gptrain_generate(capsys, checkpoint, url, settings):
    args = [f"--{k}={v}" for k, v in settings.items()]
    expected = generated(capsys, checkpoint, "ROMEO:", "--max_new_tokens", "60", *args)
    served = complete(url, prompt="ROMEO:", max_tokens=60, **settings)
    assert served["choices"][0]["text"] == expected
    assert served["usage"] == {"prompt_tokens": 6, "completion_tokens": 60, "total_tokens": 66}
    assert served["choices"][0]["finish_reason"] == "length"


def test_n_samples_are_generates_num_samples(capsys, checkpoint, url):
    out = generated(capsys, checkpoint, "JULIET:", "--max_new_tokens", "30", "--num_samples", "3", "--seed", "5")
    expected = out.split("\n" + "-" * 40 + "\n")
    served = complete(url, prompt="JULIET:", max_tokens=30, n=3, seed=5, temperature=0.8, top_k=200)
    assert [c["text"] for c in served["choices"]] == expected and len(set(expected)) == 3
    assert served["usage"]["completion_tokens"] == 90


def stream_events(url: str, **body) -> list:
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=30) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


@pytest.mark.parametrize("body", [
    {"prompt": "ROMEO:", "max_tokens": 50, "temperature": 0.9, "seed": 1},
    {"prompt": ["ROMEO:", "First Citizen:"], "max_tokens": 40, "n": 2, "temperature": 1.0, "seed": 2, "echo": True},
    {"prompt": "KING", "max_tokens": 80, "temperature": 0.0, "stop": ["e", "th"]},
], ids=["one", "several", "stop"])
def test_streaming_yields_the_same_text_as_not_streaming(url, body):
    whole = complete(url, **body)
    events = stream_events(url, **body, stream_options={"include_usage": True})
    texts = ["" for _ in whole["choices"]]
    for event in events[:-1]:
        (choice,) = event["choices"]
        texts[choice["index"]] += choice["text"]
    assert texts == [c["text"] for c in whole["choices"]]
    assert events[-1]["usage"] == whole["usage"] and events[-1]["choices"] == []
    finishes = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"][0]["finish_reason"]]
    assert sorted(finishes) == sorted(c["finish_reason"] for c in whole["choices"])
    tokens = [e for e in events[:-1] if not e["choices"][0]["finish_reason"]]
    assert len(tokens) == whole["usage"]["completion_tokens"] + (len(texts) if body.get("echo") else 0)


def test_a_stop_sequence_ends_the_text_before_it(url):
    free = complete(url, prompt="KING", max_tokens=80, temperature=0)["choices"][0]["text"]
    stop = free[20:23]
    cut = complete(url, prompt="KING", max_tokens=80, temperature=0, stop=stop)["choices"][0]
    assert cut["text"] == free[:free.index(stop)] and cut["finish_reason"] == "stop"


def test_the_openai_client_works_unchanged(url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    (model,) = client.models.list().data
    assert model.id == "tiny-char" and model.model_extra["tokenizer"] == "char"
    completion = client.completions.create(model=model.id, prompt="ROMEO:", max_tokens=20, temperature=0)
    assert len(completion.choices[0].text) == 20 and completion.usage.completion_tokens == 20
    pieces = [c.choices[0].text for c in client.completions.create(model=model.id, prompt="ROMEO:", max_tokens=20,
                                                                    temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == completion.choices[0].text
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model.id, prompt="ROMEO:", max_tokens=20, temperature=5)
    assert e.value.status_code == 400 and "temperature" in e.value.message


def test_echo_and_logprobs_score_a_prompt_as_lm_eval_harness_asks(url):
    """local-completions scores a continuation with echo, logprobs=1 and max_tokens=1 on the token ids."""
    ids = CharTokenizer(CHARS).encode("ROMEO: hello")
    served = complete(url, prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True, seed=1234)
    logprobs = served["choices"][0]["logprobs"]
    assert served["choices"][0]["text"].startswith("ROMEO: hello")
    assert len(logprobs["token_logprobs"]) == len(ids) + 1 and logprobs["token_logprobs"][0] is None
    model = random_model()
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]), torch.tensor([ids[1:] + [-1]]))
    expected = torch.log_softmax(logits[0, :-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(logprobs["token_logprobs"][1:-1]), expected, atol=1e-4)
    greedy = logprobs["top_logprobs"][-1]  # the generated token was the greedy one: it heads its top list
    assert logprobs["token_logprobs"][-1] == max(greedy.values())


def test_concurrent_requests_decode_together(server, monkeypatch):
    """16 requests at once, each with its own length: all succeed, each reads as it does alone, and they
    decode in one batch: 16 rows a step, as many steps as the longest needs, each row-step one token of a
    request. (What that gains in wall time is bench/serve.py's to measure, not a test's.)"""
    url, app = server
    engine = app.state.engine
    prompts = [f"{name}:" for name in ("ROMEO", "JULIET", "KING", "QUEEN")] * 4
    bodies = [{"prompt": p, "max_tokens": 60 + 4 * i, "temperature": 0.0 if i % 2 else 0.9, "seed": i}
              for i, p in enumerate(prompts)]
    alone = [complete(url, **body)["choices"][0]["text"] for body in bodies]

    hold_prompts_until_tried(engine, len(bodies), monkeypatch)
    batches, begin_step = [], RowCache.begin_step

    def recording_begin_step(cache, batch):
        batches.append(batch)
        begin_step(cache, batch)

    monkeypatch.setattr(RowCache, "begin_step", recording_begin_step)
    together = post_at_once(url, bodies)
    assert all(r.status_code == 200 for r in together)
    assert [r.json()["choices"][0]["text"] for r in together] == alone
    assert max(batches) == 16, f"rows per decode step: {batches}"
    assert len(batches) <= 1 + max(b["max_tokens"] for b in bodies)  # one step per token, not per request
    assert sum(batches) == sum(b["max_tokens"] - 1 for b in bodies)  # each prompt's forward gives its first


def test_a_prompt_whose_prefill_fails_fails_alone_and_the_server_carries_on(server, monkeypatch):
    """Out of memory on one client's prompt: that client gets a 500, the clients decoding beside it get their
    whole answers, and the next request is served as usual."""
    url, app = server
    model = app.state.engine.model
    bodies = [{"prompt": p, "max_tokens": 40, "temperature": 0} for p in ("ROMEO:", "BOOM", "KING:", "QUEEN:")]
    alone = [complete(url, **b)["choices"][0]["text"] for b in bodies if b["prompt"] != "BOOM"]
    boom, forward = CharTokenizer(CHARS).encode("BOOM"), model.forward

    def forward_out_of_memory_on_boom(idx, *args, **kwargs):
        if idx.size(0) == 1 and idx[0].tolist() == boom:
            raise torch.OutOfMemoryError("CUDA out of memory (pretend)")
        return forward(idx, *args, **kwargs)

    monkeypatch.setattr(model, "forward", forward_out_of_memory_on_boom)

    good, failed = [], None
    for body, response in zip(bodies, post_at_once(url, bodies)):
        if body["prompt"] == "BOOM":
            failed = error_of(response, 500)
        else:
            assert response.status_code == 200, response.text
            good.append(response.json()["choices"][0]["text"])
    assert failed["message"] == "generation failed: OutOfMemoryError: CUDA out of memory (pretend)"
    assert good == alone
    assert complete(url, prompt="ROMEO:", max_tokens=40, temperature=0)["choices"][0]["text"] == alone[0]


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "ROMEO:" * 20, "max_tokens": 20}, "prompt"),  # 120 + 20 tokens: more than the context of 128
    ({"prompt": "ROMEO: 日本"}, "prompt"),  # not in the char vocabulary
    ({"prompt": [1, 2, 999]}, "prompt"),
    ({"prompt": "a", "temperature": 2.5}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_k": -1}, "top_k"),
    ({"prompt": "a", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "logprobs": 6}, "logprobs"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "a", "seed": "seven"}, "seed"),
    ({"prompt": "a", "stream": "yes"}, "stream"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_requests_get_openai_shaped_errors(url, body, param):
    error = error_of(httpx.post(f"{url}/v1/completions", json=body), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_every_problem_is_reported_at_once_and_unknown_fields_are_ignored(url):
    error = error_of(httpx.post(f"{url}/v1/completions", json={"temperature": -1, "n": 1.5}), 400)
    assert all(name in error["message"] for name in ("temperature", "n must", "prompt"))
    too_long = error_of(httpx.post(f"{url}/v1/completions", json={"prompt": "a" * 100, "max_tokens": 29}), 400)
    assert too_long["code"] == "context_length_exceeded" and "128 tokens" in too_long["message"]
    assert error_of(httpx.post(f"{url}/v1/completions", content=b"{not json"), 400)["param"] is None
    assert error_of(httpx.get(f"{url}/v1/nothing"), 404)
    ok = complete(url, prompt="a" * 100, max_tokens=28, user="me", presence_penalty=0.5, frequency_penalty=None)
    assert ok["usage"]["total_tokens"] == 128


def test_beyond_max_queue_requests_get_429_and_every_accepted_one_is_answered(checkpoint, monkeypatch):
    """2 rows and 2 places in the queue, 12 requests at once: 4 are taken, 8 get 429 with Retry-After in
    OpenAI's error shape, and each taken one completes with the text it has alone. A request for more
    sequences than the server can ever hold is a 400, since retrying would not help."""
    with running_server(checkpoint, max_batch_size=2, max_queue=2) as (url, app):
        engine = app.state.engine
        bodies = [{"prompt": p, "max_tokens": 30 + i, "temperature": 0.8, "seed": i}
                  for i, p in enumerate(["ROMEO:", "JULIET:", "KING:", "QUEEN:"] * 3)]
        alone = [complete(url, **body)["choices"][0]["text"] for body in bodies]

        hold_prompts_until_tried(engine, len(bodies), monkeypatch)
        responses = post_at_once(url, bodies)
        too_many = error_of(httpx.post(f"{url}/v1/completions", json={"prompt": "a", "n": 5}), 400)
    taken = [i for i, r in enumerate(responses) if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(taken) == 4 and len(refused) == 8, [r.status_code for r in responses]
    for response in refused:
        error = error_of(response, 429)
        assert error["code"] == "rate_limit_exceeded" and response.headers["retry-after"] == "1"
    assert [responses[i].json()["choices"][0]["text"] for i in taken] == [alone[i] for i in taken]
    assert too_many["param"] == "n" and "at most 4 sequences" in too_many["message"]


def test_slide_continues_past_the_context_as_gptrain_generate_does(capsys, tmp_path):
    """On a context of 64, 150 tokens, from a prompt inside the context and from one longer than it: refused as
    OpenAI's API would, and with "slide" what `gptrain generate` writes, each token past the context
    conditioned on the last 64."""
    checkpoint = write_checkpoint(tmp_path / "tiny-64", random_model(block_size=64))
    long_prompt = "ROMEO: Is the day so young? " * 4  # 112 characters
    with running_server(checkpoint) as (url, _):
        for prompt in ("ROMEO:", long_prompt):
            body = {"prompt": prompt, "max_tokens": 150, "temperature": 0.8, "top_k": 20, "seed": 3}
            refused = error_of(httpx.post(f"{url}/v1/completions", json=body), 400)
            assert refused["code"] == "context_length_exceeded"
            expected = generated(capsys, checkpoint, prompt, "--max_new_tokens", "150", "--temperature", "0.8",
                                 "--top_k", "20", "--seed", "3")
            assert complete(url, **body, slide=True)["choices"][0]["text"] == expected


def test_lm_eval_scores_the_served_model_as_gptrain_harness_scores_its_checkpoint(tmp_path, monkeypatch):
    """README section 10: lm-evaluation-harness's local-completions model against the server, on local
    tasks, gives `gptrain harness`'s scores for the same checkpoint: accuracy exactly, perplexity to 0.1%
    (here to 1e-5)."""
    lm_eval = pytest.importorskip("lm_eval")
    lm_eval_tasks = pytest.importorskip("lm_eval.tasks")
    pytest.importorskip("accelerate")  # gptrain harness scores with lm-eval's hf model type
    from test_harness import checkpoint as gpt2_checkpoint, write_tasks  # its local tasks and tiny GPT-2

    from gptrain import export, harness

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # only the tasks of --include_path: indexing lm-eval's thousands of task files takes 20 s
    local_tasks = functools.partial(lm_eval_tasks.TaskManager, include_defaults=False)
    monkeypatch.setattr(lm_eval_tasks, "TaskManager", local_tasks)
    # GPT-2's own 50,257 ids: a padded vocabulary's ids past them are never sampled and the server's
    # log-probabilities leave them out, where the exported model's keep them, a difference only untrained
    # padding rows make (random ones hold 47/50304 of the probability)
    path, _ = gpt2_checkpoint(tmp_path / "tiny-gpt2", {"name": "gpt2"}, vocab_size=50257)
    tasks, names = write_tasks(tmp_path / "tasks"), ["tiny_mc", "tiny_ll"]
    harness.main(["--model_path", str(path), "--tasks", ",".join(names), "--include_path", str(tasks),
                  "--device", "cpu", "--output", str(tmp_path / "harness.json")])
    expected = json.loads((tmp_path / "harness.json").read_text())["results"]
    export.main(["--model_path", str(path), "--out", str(tmp_path / "hf")])  # the tokenizer lm-eval counts with
    with running_server(path) as (url, _):
        served = lm_eval.simple_evaluate(
            model="local-completions", tasks=names, task_manager=local_tasks(include_path=str(tasks)),
            model_args={"model": "tiny-gpt2", "base_url": f"{url}/v1/completions", "num_concurrent": 4,
                        "tokenizer_backend": "huggingface", "tokenizer": str(tmp_path / "hf"), "max_length": 63},
            log_samples=False)["results"]
    for task, metric in [("tiny_mc", "acc"), ("tiny_ll", "acc")]:
        assert served[task][f"{metric},none"] == expected[task][f"{metric},none"], (task, metric)
    perplexity = expected["tiny_ll"]["perplexity,none"]
    # the README promises 0.1%; float32 rounding apart, the two compute the same (measured: 2e-7)
    assert served["tiny_ll"]["perplexity,none"] == pytest.approx(perplexity, rel=1e-5) and perplexity > 1


def test_a_client_that_leaves_mid_stream_frees_its_row(server, monkeypatch):
    url, app = server
    engine = app.state.engine
    decode = engine._decode

    def slow_decode():  # 5 ms a token, so that the stream is still going when the client leaves
        decode()
        time.sleep(0.005)

    monkeypatch.setattr(engine, "_decode", slow_decode)
    with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                      json={"prompt": "ROMEO:", "max_tokens": 120, "stream": True}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 5
        while not engine.rows:  # the first token can reach us just before its row joins the batch
            assert time.monotonic() < deadline
            time.sleep(0.001)
        (request,) = engine.rows
    deadline = time.monotonic() + 5
    while engine.rows:
        assert time.monotonic() < deadline, "the row of a client that left is still decoding"
        time.sleep(0.01)
    assert request.cancelled and len(request.tokens) < 120
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert len(complete(url, prompt="ROMEO:", max_tokens=10)["choices"][0]["text"]) == 10


def test_the_api_key_is_enforced_when_set(checkpoint):
    with running_server(checkpoint, api_key="s3cret") as (url, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            error = error_of(httpx.post(f"{url}/v1/completions", json={"prompt": "a"}, headers=headers), 401)
            assert error["code"] == "invalid_api_key"
            error_of(httpx.get(f"{url}/v1/models", headers=headers), 401)
        assert httpx.get(f"{url}/health").status_code == 200  # for load balancers
        assert httpx.get(f"{url}/").status_code == 200  # the page itself asks for the key
        good = {"Authorization": "Bearer s3cret"}
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "a"}, headers=good).status_code == 200
        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(model="tiny-char", prompt="a", max_tokens=3).usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()


def test_gptrain_serve_as_users_start_it_takes_its_key_from_the_environment(checkpoint, tmp_path):
    """The command itself, on its defaults but the port: it binds to 127.0.0.1, takes the API key from
    $GPTRAIN_API_KEY (401 without it, 200 with it) and exits 0 on Ctrl-C."""
    port, log = free_port(), tmp_path / "serve.log"
    with serve_command(log, "--model_path", str(checkpoint), "--port", str(port), env={"GPTRAIN_API_KEY": "s3cret"}):
        assert f"Uvicorn running on http://127.0.0.1:{port}" in log.read_text()
        url, body = f"http://127.0.0.1:{port}", {"prompt": "ROMEO:", "max_tokens": 5, "temperature": 0}
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        assert error_of(httpx.post(f"{url}/v1/completions", json=body), 401)["code"] == "invalid_api_key"
        served = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}, timeout=30)
        assert served.status_code == 200 and served.json()["model"] == "tiny-char"
        assert len(served.json()["choices"][0]["text"]) == 5


def test_gptrain_serve_listens_on_port_8000_by_default(checkpoint, tmp_path):
    if not port_is_free(8000):
        pytest.skip("port 8000 is taken on this machine")
    log = tmp_path / "serve.log"
    with serve_command(log, "--model_path", str(checkpoint), env={"GPTRAIN_API_KEY": ""}):
        assert "Uvicorn running on http://127.0.0.1:8000" in log.read_text()
        assert httpx.get("http://127.0.0.1:8000/health").json() == {"status": "ok"}
        assert httpx.get("http://127.0.0.1:8000/v1/models").json()["data"][0]["context_length"] == 128


def test_bad_settings_and_a_missing_checkpoint_are_one_line_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--model_path", str(tmp_path / "missing.pt")])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: checkpoint not found: {tmp_path / 'missing.pt'}\n"
    with pytest.raises(SystemExit):
        main(["--max_batch_size", "0", "--port", "70000"])
    assert capsys.readouterr().err.startswith("error: --port must be from 0 to 65535; --max_batch_size must be >= 1")


def recorder(events: list):
    """An emit that records a request's events in `events` (it runs on the engine's thread: no asserts)."""
    return events.append


def the_finish(events: list) -> Finish:
    """A request's one Finish, which must be its last event."""
    finishes = [e for e in events if isinstance(e, Finish)]
    assert len(finishes) == 1 and events[-1] is finishes[0], events
    return finishes[0]


def token_ids(events: list) -> list[int]:
    return [e.id for e in events if isinstance(e, Token)]


def finished(events: list) -> bool:
    return bool(events) and isinstance(events[-1], Finish)


def wait_until_finished(*events: list, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not all(finished(e) for e in events):
        assert time.monotonic() < deadline, "the engine did not finish every request"
        time.sleep(0.005)


def alone(model, prompt: list[int], n: int) -> list[int]:
    """Greedy generation of `prompt` by itself, without the engine."""
    return torch.cat(list(generate_tokens(model, torch.tensor([prompt]), n, temperature=0)), dim=1)[0].tolist()


@pytest.mark.parametrize("switches", [{}, MODERN], ids=["gpt2", "modern"])
def test_rows_that_join_and_leave_a_batch_read_as_they_would_alone(switches, monkeypatch):
    """Greedy requests of different prompt lengths, each equal to generate_tokens on that prompt alone: per-row
    positions and the mask are right. Each later request is submitted from the engine's own thread once an
    earlier one has produced so many tokens, so it joins a batch mid-decode at a known point; with 3 rows,
    the last two wait for rows to free up, and take them over at other lengths."""
    model, tokenizer = random_model(block_size=64, **switches), CharTokenizer(CHARS)
    engine = Engine(model, tokenizer, max_batch_size=3, device=CPU)
    prompts = [tokenizer.encode(p) for p in ("A", "ROMEO: Is the day", "KING:", "To be, or not", "Hm")]
    lengths = [40, 12, 30, 25, 45]
    events: dict[int, list] = {i: [] for i in range(len(prompts))}
    then = {(0, 5): [1], (1, 3): [2], (2, 4): [3, 4]}  # (request, its tokens so far): the requests to submit
    requests = []

    def recorder_that_submits(i: int):
        record = recorder(events[i])

        def emit(event):
            record(event)
            later = then.get((i, len(token_ids(events[i]))), []) if isinstance(event, Token) else []
            if later:
                engine.submit([requests[j] for j in later])
        return emit

    requests += [Request(prompt, Sampling(temperature=0, max_tokens=n), recorder_that_submits(i))
                 for i, (prompt, n) in enumerate(zip(prompts, lengths))]
    batches, begin_step = [], RowCache.begin_step

    def recording_begin_step(cache, batch):
        batches.append(batch)
        begin_step(cache, batch)

    monkeypatch.setattr(RowCache, "begin_step", recording_begin_step)
    engine.submit(requests[:1])
    engine.start()
    try:
        wait_until_finished(*events.values())
    finally:
        engine.stop()
    assert all(events.values()), "a request was never submitted"
    assert len({tuple(token_ids(e)[:10]) for e in events.values()}) == len(prompts)  # mixed-up rows would show
    for i, (prompt, n) in enumerate(zip(prompts, lengths)):
        assert the_finish(events[i]) == Finish("length")
        assert token_ids(events[i]) == alone(model, prompt, n), f"request {i}"
    # one row, then two, then three; the batch stays full as request 3 takes over the row of request 1
    assert batches[:30] == [1] * 4 + [2] * 2 + [3] * 24 and max(batches) == 3, batches


def test_a_failing_prefill_fails_only_its_own_request(monkeypatch):
    """Out of memory on one prompt's prefill: that prompt's requests fail, once each; those admitted in the
    same step, before and after it, decode as they would alone; and the engine goes on serving."""
    model, tokenizer = random_model(block_size=64), CharTokenizer(CHARS)
    boom = tokenizer.encode("BOOM")
    forward, prefills_of_boom = model.forward, []

    def forward_out_of_memory_on_boom(idx, *args, **kwargs):
        if idx.size(0) == 1 and idx[0].tolist() == boom:
            prefills_of_boom.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory (pretend)")
        return forward(idx, *args, **kwargs)

    monkeypatch.setattr(model, "forward", forward_out_of_memory_on_boom)
    engine = Engine(model, tokenizer, max_batch_size=8, device=CPU)
    asked = [("ROMEO:", 20), ("KING:", 1), ("BOOM", 10), ("BOOM", 10), ("JULIET:", 25)]  # BOOM with n=2
    events: dict[int, list] = {i: [] for i in range(len(asked) + 1)}
    requests = [Request(tokenizer.encode(p), Sampling(temperature=0, max_tokens=n), recorder(events[i]))
                for i, (p, n) in enumerate(asked)]
    after = Request(tokenizer.encode("QUEEN:"), Sampling(temperature=0, max_tokens=15), recorder(events[5]))
    engine.submit(requests)  # before the engine starts: its first step admits them all
    engine.start()
    try:
        wait_until_finished(*(events[i] for i in range(len(asked))))
        engine.submit([after])
        wait_until_finished(events[5])
    finally:
        engine.stop()
    for i in (2, 3):
        assert events[i] == [Finish("error", "OutOfMemoryError: CUDA out of memory (pretend)")]
    assert len(prefills_of_boom) == 1  # the second sample of the prompt did not try again
    for i, (p, n) in [*enumerate(asked), (5, ("QUEEN:", 15))]:
        if p != "BOOM":
            assert token_ids(events[i]) == alone(model, tokenizer.encode(p), n), p
            assert the_finish(events[i]) == Finish("length")


def test_a_failing_decode_step_fails_the_rows_still_decoding_once(monkeypatch):
    """A step fails after one of its rows has finished: that row keeps its one Finish ("length"), the other
    fails, and the engine goes on serving."""
    model, tokenizer = random_model(block_size=64), CharTokenizer(CHARS)
    engine = Engine(model, tokenizer, max_batch_size=4, device=CPU)
    events: dict[int, list] = {0: [], 1: [], 2: []}
    short = Request(tokenizer.encode("ROMEO:"), Sampling(temperature=0, max_tokens=2), recorder(events[0]))
    failing = Request(tokenizer.encode("KING:"), Sampling(temperature=0, max_tokens=10), recorder(events[1]))
    accept = engine._accept

    def accept_or_fail(request, token, logits):
        if request is failing and request.tokens:  # its first decoded token: after `short` took its last
            raise RuntimeError("boom")
        return accept(request, token, logits)

    monkeypatch.setattr(engine, "_accept", accept_or_fail)
    after = Request(tokenizer.encode("QUEEN:"), Sampling(temperature=0, max_tokens=5), recorder(events[2]))
    engine.submit([short, failing])  # before the engine starts: its first step admits both
    engine.start()
    try:
        wait_until_finished(events[0], events[1])
        engine.submit([after])
        wait_until_finished(events[2])
    finally:
        engine.stop()
    assert len(token_ids(events[0])) == 2 and the_finish(events[0]) == Finish("length")
    assert len(token_ids(events[1])) == 1 and the_finish(events[1]) == Finish("error", "RuntimeError: boom")
    assert token_ids(events[2]) == alone(model, tokenizer.encode("QUEEN:"), 5)


@pytest.mark.parametrize("switches", [{}, MODERN], ids=["gpt2", "modern"])
def test_a_long_prompt_goes_in_a_chunk_a_step_between_the_decode_steps(switches, monkeypatch):
    """A 100-token prompt arrives while another request decodes. With prefill_chunk=16 it goes in as six
    forwards of 16 tokens and one of 4, each followed by a decode step of the running row, which so waits for
    one chunk at a time, never for the whole prompt. The prompt's log-probabilities, computed a chunk at a
    time after the cached ones, equal one forward over the whole prompt; both requests read as alone."""
    model, tokenizer = random_model(block_size=128, **switches), CharTokenizer(CHARS)
    engine = Engine(model, tokenizer, max_batch_size=4, prefill_chunk=16, device=CPU)
    forward, shapes = model.forward, []

    def recording_forward(idx, *args, **kwargs):
        shapes.append(tuple(idx.shape))
        return forward(idx, *args, **kwargs)

    monkeypatch.setattr(model, "forward", recording_forward)
    short_prompt = tokenizer.encode("ROMEO:")
    long_prompt = tokenizer.encode(("First Citizen: Before we proceed any further, hear me speak. " * 2)[:100])
    events: dict[int, list] = {0: [], 1: []}
    long = Request(long_prompt, Sampling(temperature=0, max_tokens=10, logprobs=0, echo_logprobs=True),
                   recorder(events[1]))

    def record_then_submit(event):  # the long prompt arrives once the short one has 5 tokens
        events[0].append(event)
        if isinstance(event, Token) and len(token_ids(events[0])) == 5:
            engine.submit([long])

    engine.submit([Request(short_prompt, Sampling(temperature=0, max_tokens=40), record_then_submit)])
    engine.start()
    try:
        wait_until_finished(*events.values())
    finally:
        engine.stop()
    chunks = [i for i, (_, length) in enumerate(shapes) if length > 1][1:]  # after the short prompt's
    assert [shapes[i] for i in chunks] == [(1, 16)] * 6 + [(1, 4)], shapes
    # after each chunk the short row decodes a token; after the last, the long prompt's row decodes beside it
    assert [shapes[i + 1] for i in chunks] == [(1, 1)] * 6 + [(2, 1)], shapes
    assert token_ids(events[0]) == alone(model, short_prompt, 40)
    assert token_ids(events[1]) == alone(model, long_prompt, 10)
    (scored,) = [e for e in events[1] if isinstance(e, PromptLogprobs)]
    with torch.no_grad():
        logits, _ = forward(torch.tensor([long_prompt]), torch.tensor([long_prompt[1:] + [-1]]))
    expected = torch.log_softmax(logits[0, :-1], -1).gather(-1, torch.tensor(long_prompt[1:])[:, None])[:, 0]
    assert scored.logprobs[0] is None and len(scored.logprobs) == len(long_prompt)
    assert torch.allclose(torch.tensor(scored.logprobs[1:]), expected, atol=1e-5)


def test_a_request_past_the_context_slides_alone(monkeypatch):
    """Past a context of 64, a sliding request recomputes its window each token; a new request for the same
    prompt arriving meanwhile gets a prefill of its own (not that window), and both read as they do alone."""
    model, tokenizer = random_model(block_size=64), CharTokenizer(CHARS)
    # one window a step: the first request's next window waits, not yet begun, when the second is admitted
    engine = Engine(model, tokenizer, max_batch_size=4, prefill_chunk=64, device=CPU)
    prompt, events, (first, second) = tokenizer.encode("ROMEO:"), {0: [], 1: []}, sample_generators(2, 5, CPU)
    later = Request(prompt, Sampling(temperature=1.0, max_tokens=10), recorder(events[1]), second)
    forward, fed = model.forward, []

    def recording_forward(idx, *args, **kwargs):
        fed.append(idx[0].tolist())
        return forward(idx, *args, **kwargs)

    monkeypatch.setattr(model, "forward", recording_forward)

    def record_then_submit(event):  # the second request arrives while the first slides
        events[0].append(event)
        if isinstance(event, Token) and len(token_ids(events[0])) == 70:
            engine.submit([later])

    engine.submit([Request(prompt, Sampling(temperature=1.0, max_tokens=90, slide=True), record_then_submit, first)])
    engine.start()
    try:
        wait_until_finished(*events.values())
    finally:
        engine.stop()
    assert fed.count(prompt) == 2  # each request's prompt was fed: the second did not take the first's window
    for i, n in [(0, 90), (1, 10)]:  # generate_tokens slides the same way
        streams = sample_generators(2, 5, CPU)[i:i + 1]
        expected = generate_tokens(model, torch.tensor([prompt]), n, temperature=1.0, generators=streams)
        assert token_ids(events[i]) == torch.cat(list(expected), dim=1)[0].tolist(), f"request {i}"


def test_a_stop_sequence_is_held_back_until_it_cannot_be_one():
    request = Request([0], Sampling(stop=("abc", "xy")), emit=None)
    released = []
    for piece in ["12a", "b", "9", "x", "z", "ab", "c", "tail"]:
        request.text += piece
        out, stopped = request.release(finished=False)
        released.append(out)
        if stopped:
            break
    assert released == ["12", "", "ab9", "", "xz", "", ""] and stopped
    assert "".join(released) == "12ab9xz"
