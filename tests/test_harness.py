import functools
import json
import math

import pytest
import torch

from gptrain import harness
from gptrain.checkpoint import RunRecord, save_checkpoint
from gptrain.config import GPTConfig
from gptrain.model import GPT
from gptrain.tokenizer import from_meta

pytest.importorskip("lm_eval")  # gptrain[eval]
lm_eval_tasks = pytest.importorskip("lm_eval.tasks")
pytest.importorskip("accelerate")  # lm-eval's hf model type imports it; lm-eval[hf] brings it

ROWS = [
    {"question": "The cat sat on the", "choices": ["mat", "sky", "moon"], "answer": 0},
    {"question": "One, two,", "choices": ["three", "seven"], "answer": 0},
    {"question": "Roses are red, violets are", "choices": ["blue", "loud", "green"], "answer": 0},
    {"question": "The sun rises in the", "choices": ["west", "east"], "answer": 1},
]
# Tasks over the same rows: each question's choices scored (acc), the right answer's log-likelihood
# (perplexity), and the answer generated (for a char checkpoint's refusal). The datasets cache lives in the
# test's folder, and nothing is fetched.
TASKS = {
    "tiny_mc": "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
               "metric_list:\n  - metric: acc\n",
    "tiny_ll": "output_type: loglikelihood\ndoc_to_target: ' {{choices[answer]}}'\n"
               "metric_list:\n  - metric: perplexity\n  - metric: acc\n",
    "tiny_gen": "output_type: generate_until\ndoc_to_target: ' {{choices[answer]}}'\n"
                "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 8\n"
                "metric_list:\n  - metric: exact_match\n",
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def local_tasks_only(monkeypatch):
    """A TaskManager that indexes only --include_path, not lm-eval's thousands of task YAMLs (about 20 s here)."""
    monkeypatch.setattr(lm_eval_tasks, "TaskManager", functools.partial(lm_eval_tasks.TaskManager,
                                                                         include_defaults=False))


def write_tasks(folder, rows=ROWS):
    """The two tasks' YAMLs and their data, as a user's --include_path folder."""
    folder.mkdir(exist_ok=True)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for name, body in TASKS.items():
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {folder / 'cache'}\n"
            f"test_split: test\ndoc_to_text: '{{{{question}}}}'\n{body}")
    return folder


def checkpoint(folder, tokenizer: dict, vocab_size: int):
    """A tiny random model saved as training saves one; the path of its ckpt.pt."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=vocab_size)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # large weights, so choices' scores differ
    save_checkpoint(folder, model=model, record=RunRecord(tokenizer=tokenizer))
    return folder / "ckpt.pt", model


def run(capsys, *args: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `gptrain harness ARGS`."""
    capsys.readouterr()
    try:
        harness.main(["--device", "cpu", *args])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@torch.no_grad()
def loglikelihood(model: GPT, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Our model's log-probability of `continuation`'s tokens after `context`'s, and whether each of them
    is the argmax. (Continuations start with a space, so no token spans the two.)"""
    start = len(tokenizer.encode(context))
    ids = tokenizer.encode(context) + tokenizer.encode(continuation)
    x = torch.tensor([ids[:-1]])
    logits, _ = model(x, x)  # with targets, every position's logits
    logprobs = torch.log_softmax(logits[0, start - 1:].float(), dim=-1)
    targets = torch.tensor(ids[start:])
    return logprobs.gather(1, targets[:, None]).sum().item(), bool((logprobs.argmax(-1) == targets).all())


def test_scores_match_our_models_own_loglikelihoods(capsys, tmp_path, local_tasks_only):
    """Tasks of our own through --include_path; lm-eval's table and JSON hold our model's own figures."""
    path, model = checkpoint(tmp_path, {"name": "gpt2"}, vocab_size=50304)
    tasks = write_tasks(tmp_path / "tasks")
    code, out, err = run(capsys, "--model_path", str(path), "--tasks", "tiny_mc,tiny_ll",
                         "--include_path", str(tasks), "--batch_size", "3")
    assert code == 0, err
    table, last = out.rstrip("\n").rsplit("\n", 1)
    assert last == f"wrote the results to {tmp_path / 'ckpt.harness.json'}"
    rows, task = set(), None
    for line in table.splitlines()[2:]:  # below the header; a task's name is on its first metric's row only
        cells = [cell.strip() for cell in line.split("|")]
        task = cells[1] or task
        rows.add((task, cells[5]))
    assert {("tiny_mc", "acc"), ("tiny_ll", "perplexity"), ("tiny_ll", "acc")} <= rows, table
    results = json.loads((tmp_path / "ckpt.harness.json").read_text())["results"]

    tokenizer = from_meta({"name": "gpt2"})
    # multiple choice: " " + each choice after the question (lm-eval's default target_delimiter)
    picked = [max(range(len(row["choices"])),
                  key=lambda i: loglikelihood(model, tokenizer, row["question"], " " + row["choices"][i])[0])
              for row in ROWS]
    assert math.isfinite(results["tiny_mc"]["acc,none"])
    assert results["tiny_mc"]["acc,none"] == pytest.approx(sum(
        p == row["answer"] for p, row in zip(picked, ROWS)) / len(ROWS))
    # loglikelihood: the target as the YAML spells it, space first; perplexity is exp of minus the mean
    # log-likelihood, acc whether every token of it is the model's argmax
    scored = [loglikelihood(model, tokenizer, row["question"], " " + row["choices"][row["answer"]]) for row in ROWS]
    assert results["tiny_ll"]["perplexity,none"] == pytest.approx(
        math.exp(-sum(ll for ll, _ in scored) / len(ROWS)), rel=1e-4)
    assert results["tiny_ll"]["acc,none"] == sum(greedy for _, greedy in scored) / len(ROWS)


def test_a_char_checkpoint_scores_loglikelihoods_and_refuses_text_outside_its_alphabet(capsys, tmp_path,
                                                                                       local_tasks_only):
    chars = "".join(sorted({c for row in ROWS for c in row["question"] + " " + "".join(row["choices"])}))
    path, model = checkpoint(tmp_path, {"name": "char", "chars": chars}, vocab_size=len(chars))
    tasks = write_tasks(tmp_path / "tasks")
    code, out, err = run(capsys, "--model_path", str(path), "--tasks", "tiny_ll", "--include_path", str(tasks),
                         "--output", str(tmp_path / "char.json"))
    assert code == 0, err
    tokenizer = from_meta({"name": "char", "chars": chars})
    scored = [loglikelihood(model, tokenizer, row["question"], " " + row["choices"][row["answer"]])[0] for row in ROWS]
    results = json.loads((tmp_path / "char.json").read_text())["results"]
    assert results["tiny_ll"]["perplexity,none"] == pytest.approx(math.exp(-sum(scored) / len(ROWS)), rel=1e-4)

    write_tasks(tasks, [*ROWS, {"question": "Zebras are", "choices": ["striped", "plain"], "answer": 0}])
    code, out, err = run(capsys, "--model_path", str(path), "--tasks", "tiny_ll", "--include_path", str(tasks))
    assert code == 2 and out == "" and "Traceback" not in err  # above the error, lm-eval's progress bars
    assert err.splitlines()[-1] == (f"error: a task's text has characters outside the checkpoint's {len(chars)}-"
                                    f"character vocabulary; a char model can only score text in its own alphabet")


def test_a_char_checkpoint_refuses_generation_tasks_up_front(capsys, tmp_path, local_tasks_only, monkeypatch):
    """A char tokenizer has no end-of-text token for generation to stop at: the task's output_type says so
    before anything runs, in one line."""
    chars = "".join(sorted({c for row in ROWS for c in row["question"] + " " + "".join(row["choices"])}))
    path, _ = checkpoint(tmp_path, {"name": "char", "chars": chars}, vocab_size=len(chars))
    tasks = write_tasks(tmp_path / "tasks")

    def never(*args, **kwargs):
        raise AssertionError("lm-eval ran: the refusal came too late")

    monkeypatch.setattr(harness, "export", never)
    monkeypatch.setattr("lm_eval.simple_evaluate", never)
    code, out, err = run(capsys, "--model_path", str(path), "--tasks", "tiny_ll,tiny_gen", "--include_path", str(tasks))
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.splitlines()[-1] == ("error: generation tasks need an end-of-text token to stop at, which a char "
                                    "tokenizer has not; a char checkpoint can be scored on loglikelihood and "
                                    "multiple-choice tasks")  # above it, datasets' progress bars as it loads them
    assert not (tmp_path / "ckpt.harness.json").exists()


def test_unknown_tasks_are_one_line(capsys, tmp_path, local_tasks_only):
    path, _ = checkpoint(tmp_path, {"name": "gpt2"}, vocab_size=50304)
    tasks = write_tasks(tmp_path / "tasks")
    code, out, err = run(capsys, "--model_path", str(path), "--tasks", "tiny_mc,no_such_task,tiny_zz*",
                         "--include_path", str(tasks))
    assert code == 2 and out == ""
    assert err.startswith("error: unknown tasks no_such_task, tiny_zz*: not among lm-eval's own or ")
    assert err.count("\n") == 1
    assert not (tmp_path / "ckpt.harness.json").exists()


@pytest.mark.parametrize("limit", ["0", "-3", "1.5", "ten"])
def test_a_bad_limit_is_one_line(capsys, tmp_path, limit):
    code, out, err = run(capsys, "--tasks", "hellaswag", "--limit", limit, "--model_path", str(tmp_path / "x.pt"))
    assert code == 2 and out == ""
    assert err == f"error: --limit must be a whole number of examples or a fraction between 0 and 1 (got {limit})\n"


def test_limits_parse_as_lm_eval_takes_them():
    assert harness.parse_limit("10") == 10 and isinstance(harness.parse_limit("10"), int)
    assert harness.parse_limit("0.25") == 0.25 and harness.parse_limit(None) is None
