"""`gptrain serve`: the real server on a free localhost port, driven over HTTP, by OpenAI's client and
against `gptrain generate`; the batching engine alone, against generate_tokens."""

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from gptrain.batching import Engine, Finish, RowCache, Request, Sampling, Token
from gptrain.generate import generate_tokens
from gptrain.generate import main as generate
from gptrain.serve import main
from gptrain.tokenizer import CharTokenizer
from serving import CHARS, CPU, random_model, running_server, write_checkpoint

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
    decode in one batch, 16 rows a step."""
    url, app = server
    engine = app.state.engine
    prompts = [f"{name}:" for name in ("ROMEO", "JULIET", "KING", "QUEEN")] * 4
    bodies = [{"prompt": p, "max_tokens": 60 + 4 * i, "temperature": 0.0 if i % 2 else 0.9, "seed": i}
              for i, p in enumerate(prompts)]
    started = time.perf_counter()
    alone = [complete(url, **body)["choices"][0]["text"] for body in bodies]
    one_after_another = time.perf_counter() - started

    # The engine admits nothing until all 16 are queued, so that how fast the clients' requests arrive on a
    # busy machine cannot decide how many rows decode together; each step's batch size is recorded.
    submitted, all_queued, batches = [], threading.Event(), []
    submit, admit, begin_step = engine.submit, engine._admit, RowCache.begin_step

    def counting_submit(requests):
        submit(requests)
        submitted.extend(requests)
        if len(submitted) >= len(bodies):
            all_queued.set()

    def waiting_admit(request, prefills):
        assert all_queued.wait(timeout=30), "the 16 requests did not all arrive"
        admit(request, prefills)

    def recording_begin_step(cache, batch):
        batches.append(batch)
        begin_step(cache, batch)

    monkeypatch.setattr(engine, "submit", counting_submit)
    monkeypatch.setattr(engine, "_admit", waiting_admit)
    monkeypatch.setattr(RowCache, "begin_step", recording_begin_step)

    async def all_at_once() -> list[dict]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            responses = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
        assert all(r.status_code == 200 for r in responses)
        return [r.json() for r in responses]

    started = time.perf_counter()
    together = asyncio.run(all_at_once())
    at_once = time.perf_counter() - started
    assert [r["choices"][0]["text"] for r in together] == alone
    assert at_once < one_after_another / 2, (at_once, one_after_another)  # 16 take less than 8 alone would
    assert max(batches) == 16, f"rows per decode step: {batches}"
    assert len(batches) <= 1 + max(b["max_tokens"] for b in bodies)  # one step per token, not per request


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

    async def all_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))

    good, failed = [], None
    for body, response in zip(bodies, asyncio.run(all_at_once())):
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
