"""Score a checkpoint on EleutherAI's lm-evaluation-harness tasks (HellaSwag, ARC, ... or tasks of your own).

Why: those are the figures other models are published with, so a model trained here compares with them
directly. Rather than a harness adapter of our own, the checkpoint is exported to a temporary Hugging Face
directory (as `gptrain export` writes it, with the same logits) and lm-eval scores that with its own `hf`
model type, exactly as it scores any model on the hub.

A char tokenizer has no end-of-text token, which lm-eval uses in two places: as the context of a text
scored from its first character (a loglikelihood_rolling task), where a newline stands in for it, as it
does between the documents of a char corpus; and as where generation stops, so a char checkpoint refuses
generation tasks up front, in one line. A task's text may only hold characters of the checkpoint's alphabet.

Usage: gptrain harness --model_path checkpoints/ckpt.pt --tasks hellaswag,arc_easy [--limit 100]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

from gptrain.checkpoint import load_model
from gptrain.device import resolve_device
from gptrain.errors import UserError, command
from gptrain.hf import export, target
from gptrain.extras import require
from gptrain.files import atomic_write_text


class HarnessError(UserError):
    """A request lm-evaluation-harness cannot run; the message is one line for the user."""


def parse_limit(text: str | None) -> int | float | None:
    """lm-eval's --limit: a count of examples per task, or below 1, a fraction of each task's examples."""
    if text is None:
        return None
    try:
        limit = float(text)
    except ValueError:
        limit = 0.0
    if not 0 < limit < 1 and not (limit >= 1 and limit.is_integer()):
        raise HarnessError(f"--limit must be a whole number of examples or a fraction between 0 and 1 (got {text})")
    return int(limit) if limit >= 1 else limit


def task_names(manager, spec: str, include_path: str | None) -> list[str]:
    """The task, group and tag names `spec` (comma-separated, glob patterns allowed) names, in its order;
    HarnessError naming every one that matches nothing."""
    names, unknown = [], []
    for pattern in filter(None, (s.strip() for s in spec.split(","))):
        matches = manager.match_tasks([pattern])
        unknown += [] if matches else [pattern]
        names += [m for m in matches if m not in names]
    if unknown:
        where = (f"lm-eval's own or {include_path}'s (a YAML there that does not parse is skipped)" if include_path
                 else "lm-eval's own; give --include_path for tasks of your own")
        raise HarnessError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not among {where}; "
                           f"`lm-eval ls tasks` lists them")
    if not names:
        raise HarnessError("--tasks names no task")
    return names


def char_start_id(meta: dict) -> int:
    """The id lm-eval puts before a text scored from its first character: newline, else the first character."""
    return max(meta["chars"].find("\n"), 0)


def output_types(lm_eval, names: list[str], manager) -> dict[str, str]:
    """Each task's output_type (loglikelihood, multiple_choice, generate_until, ...), groups' tasks included.
    Builds the tasks, which loads their datasets (from the cache, when lm-eval then runs them)."""
    def leaves(tasks: dict):  # lm-eval before TaskManager.load: {group: {task name: task, ...}, task name: task}
        for name, task in tasks.items():
            if isinstance(task, dict):
                yield from leaves(task)
            else:
                yield name, task
    with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints notes as it builds tasks
        if hasattr(manager, "load"):
            tasks = manager.load(names)["tasks"]
        else:
            tasks = dict(leaves(lm_eval.tasks.get_task_dict(names, manager)))
    return {name: task.OUTPUT_TYPE for name, task in tasks.items()}


def char_limit(error: Exception, meta: dict) -> HarnessError | None:
    """The one-line reason lm-eval failed on a char checkpoint, where its failure is one of a char tokenizer's
    limits; None for any other failure, which keeps its traceback."""
    if meta["name"] == "char" and "Missing [UNK]" in str(error):  # tokenizers' words of an unknown character
        return HarnessError(f"a task's text has characters outside the checkpoint's {len(meta['chars'])}-character "
                            f"vocabulary; a char model can only score text in its own alphabet")
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptrain harness", description=__doc__.splitlines()[0])
    p.add_argument("--model_path", default="checkpoints/ckpt.pt", help="checkpoint to score")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names (globs allowed)")
    p.add_argument("--limit", default=None, help="score only the first N examples of each task (or a fraction < 1); "
                                                  "for trying things out, not for figures to report")
    p.add_argument("--num_fewshot", type=int, default=None, help="examples in each prompt; default: each task's own")
    p.add_argument("--batch_size", type=int, default=16, help="requests per forward pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--include_path", default=None, help="a folder of task YAMLs, for tasks of your own")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling, few-shot choice and torch; "
                                                          "default: lm-eval's")
    p.add_argument("--output", default=None, help="JSON results file; default: beside the checkpoint, "
                                                   "ckpt.pt -> ckpt.harness.json")
    return p


@command
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    limit = parse_limit(args.limit)
    if args.batch_size < 1 or (args.num_fewshot is not None and args.num_fewshot < 0):
        raise HarnessError("--batch_size must be >= 1 and --num_fewshot >= 0")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise HarnessError(f"--include_path {args.include_path} is not a folder")
    lm_eval = require("lm_eval", "eval", "gptrain harness", error=HarnessError)
    for module in ("lm_eval.tasks", "lm_eval.utils", "accelerate", "transformers"):  # hf models need the last two
        require(module, "eval", "gptrain harness", error=HarnessError)
    device = resolve_device(args.device)
    model, checkpoint = load_model(args.model_path, device=torch.device("cpu"))  # lm-eval loads its own copy
    target(model.config)  # refuse a model export cannot write before reading the tasks
    meta = checkpoint.record.tokenizer
    if not meta:
        raise HarnessError(f"{args.model_path} records no tokenizer, which lm-eval needs to turn task text into ids")
    manager = lm_eval.tasks.TaskManager(include_path=args.include_path)  # reads every task's YAML: seconds
    names = task_names(manager, args.tasks, args.include_path)
    if meta["name"] == "char" and "generate_until" in output_types(lm_eval, names, manager).values():
        raise HarnessError("generation tasks need an end-of-text token to stop at, which a char tokenizer has "
                           "not; a char checkpoint can be scored on loglikelihood and multiple-choice tasks")
    seeds = {} if args.seed is None else {f"{kind}_seed": args.seed for kind in
                                         ("random", "numpy_random", "torch_random", "fewshot_random")}
    with tempfile.TemporaryDirectory(prefix="gptrain-harness-") as hf_dir:
        export(model, hf_dir, meta)
        del model  # lm-eval loads its own copy from hf_dir
        model_args = {"pretrained": hf_dir}
        if meta["name"] == "char":
            model_args["prefix_token_id"] = char_start_id(meta)
        try:
            with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints notes ("bootstrapping for stddev")
                results = lm_eval.simple_evaluate(
                    model="hf", model_args=model_args, tasks=names, num_fewshot=args.num_fewshot,
                    batch_size=args.batch_size, device=str(device), limit=limit, task_manager=manager,
                    log_samples=False, **seeds)
        except Exception as e:
            reason = char_limit(e, meta)
            if reason is None:
                raise
            raise reason from e
    results["config"]["model_args"] = {"model_path": str(args.model_path)}  # not the deleted temporary directory
    output = Path(args.output) if args.output else Path(args.model_path).with_suffix(".harness.json")
    atomic_write_text(output, json.dumps(results, indent=2, default=lm_eval.utils.handle_non_serializable,
                                         ensure_ascii=False) + "\n")
    print(lm_eval.utils.make_table(results))
    if "groups" in results:
        print(lm_eval.utils.make_table(results, "groups"))
    print(f"wrote the results to {output}")


if __name__ == "__main__":
    main()
