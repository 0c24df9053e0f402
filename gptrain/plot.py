"""Draw the loss curves of one or more runs into one PNG, against tokens seen, so runs of any batch compare.

Each RUN_DIR holds the metrics.jsonl that training writes (one JSON record per log step) and the
config.yaml it records. Records of older runs carry no "tokens": then tokens seen = step x tokens per step,
computed from config.yaml as training does.

Usage: gptrain plot RUN_DIR [RUN_DIR ...] -o curves.png [--title T]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import yaml  # PyYAML comes with omegaconf

from gptrain.errors import UserError, command
from gptrain.extras import require
from gptrain.metrics import METRICS, PLOT_PANELS, POINTS, SMOOTHED, STEP, TOKENS

LOSSES = [metric for metric in METRICS if metric.panel == "loss"]  # a run must have one of them to be plotted


class PlotError(UserError):
    """A run folder that cannot be plotted; the message is one line for the user."""


class Series(NamedTuple):
    step: np.ndarray
    tokens: np.ndarray
    value: np.ndarray


def tokens_per_step(config: dict) -> int:
    """Tokens in one optimizer step, from a run's config.yaml: tokens_per_step, or when that is null,
    batch_size x block_size x gradient_accumulation_steps (as train.py computes it)."""
    if config.get("tokens_per_step") is not None:
        return int(config["tokens_per_step"])
    keys = ("batch_size", "block_size", "gradient_accumulation_steps")
    values = [config.get(k) for k in keys]
    if not all(isinstance(v, int) for v in values):
        raise PlotError(f"config.yaml needs tokens_per_step, or integer {', '.join(keys)} (got {values})")
    return values[0] * values[1] * values[2]


def _read_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise PlotError(f"{run_dir}/metrics.jsonl has no 'tokens' and there is no {path} to compute them from")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PlotError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise PlotError(f"{path} is not a mapping of settings")
    return config


def load_run(run_dir: str | Path) -> dict[str, Series]:
    """Each metric of a run's metrics.jsonl as a Series (step, tokens seen, value), ordered by step.

    A resumed run appends records from its checkpoint's step on, so a step that goes back replaces what
    the run had logged from there on. Null values (a non-finite number) are left out.
    """
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir} has no metrics.jsonl")
    points: dict[str, list[tuple[int, float, float]]] = {}
    per_step = None  # read from config.yaml only when a record lacks "tokens"
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record[STEP])
            except (ValueError, KeyError, TypeError):
                raise PlotError(f"{path}:{line_number} is not a JSON record with a step") from None
            tokens = record.get(TOKENS)
            if tokens is None:
                per_step = per_step or tokens_per_step(_read_config(run_dir))
                tokens = step * per_step
            for key, value in record.items():
                if key in (STEP, TOKENS) or not isinstance(value, (int, float)):
                    continue
                series = points.setdefault(key, [])
                while series and series[-1][0] >= step:  # a resume logs these steps again
                    series.pop()
                series.append((step, tokens, value))
    if not points:
        raise PlotError(f"{path} holds no metrics")
    return {key: Series(*(np.array(column, dtype=float) for column in zip(*rows))) for key, rows in points.items()}


def smooth(values: np.ndarray, weight: float = 0.6) -> np.ndarray:
    """An exponential moving average, debiased so the first points are not pulled toward zero."""
    out, average = np.empty_like(values), 0.0
    for i, value in enumerate(values):
        average = weight * average + (1 - weight) * value
        out[i] = average / (1 - weight ** (i + 1))
    return out


def _tokens_label(x: float, _position=None) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:g}{suffix}"
    return f"{x:g}"


def draw(runs: dict[str, dict[str, Series]], out: str | Path, title: str | None = None) -> None:
    """Write one PNG: a panel for each of PLOT_PANELS that some run has a metric of (train and val loss; val
    bits per byte), each metric against tokens seen, one colour per run."""
    figure = require("matplotlib.figure", "plot", "gptrain plot", error=PlotError)
    ticker = require("matplotlib.ticker", "plot", "gptrain plot", error=PlotError)

    panels = [(name, ylabel, [metric for metric in METRICS if metric.panel == name])
              for name, ylabel in PLOT_PANELS.items()]
    panels = [panel for panel in panels if any(m in metrics for m in panel[2] for metrics in runs.values())]
    tokens = np.concatenate([s.tokens for metrics in runs.values() for s in metrics.values()])
    positive = tokens[tokens > 0]
    log_x = positive.size > 0 and positive.max() / positive.min() > 100  # spans orders of magnitude

    # Figure without pyplot: no display, no global state; savefig renders with Agg
    fig = figure.Figure(figsize=(6.5 * len(panels), 4.5), layout="tight")
    axes = fig.subplots(1, len(panels), squeeze=False, sharex=True)[0]  # one token range: panels line up
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (name, ylabel, plotted) in zip(axes, panels):
        for colour, metrics in zip(colours, runs.values()):
            for metric in plotted:
                if metric not in metrics or metric.unless in metrics:
                    continue
                s = metrics[metric]
                keep = s.tokens > 0 if log_x else np.ones_like(s.tokens, dtype=bool)  # log x cannot show 0
                x, y = s.tokens[keep], s.value[keep]
                if metric.style == POINTS:
                    ax.plot(x, y, color=colour, linewidth=1.5, marker="o", markersize=3.5)
                else:
                    ax.plot(x, smooth(y) if metric.style == SMOOTHED else y, color=colour, linewidth=0.8, alpha=0.7)
        ax.set_title(name)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(ylabel)
        if log_x:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(_tokens_label))
        ax.grid(True, which="major", alpha=0.3)
    # the legend: a colour per run, then a grey sample of each style (empty lines draw nothing)
    for colour, label in zip(colours, runs):
        axes[0].plot([], [], color=colour, linewidth=2, label=label)
    axes[0].plot([], [], color="grey", linewidth=0.8, label="train (smoothed)")
    axes[0].plot([], [], color="grey", linewidth=1.5, marker="o", markersize=3.5, label="val")
    axes[0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=120)
    except ValueError as e:  # a format matplotlib does not write, such as -o curves.txt
        raise PlotError(f"cannot write {out}: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptrain plot", description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's folder, holding metrics.jsonl")
    p.add_argument("-o", "--out", default="curves.png", help="the PNG to write (folders created)")
    p.add_argument("--title", default=None, help="a title over the figure")
    return p


@command
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    require("matplotlib", "plot", "gptrain plot", error=PlotError)  # before reading any run
    runs = {}
    for run_dir in args.run_dirs:
        name = Path(run_dir).resolve().name
        metrics = load_run(run_dir)
        if not any(metric in metrics for metric in LOSSES):
            raise PlotError(f"{run_dir}/metrics.jsonl holds no train or val loss")
        runs[name if name not in runs else run_dir] = metrics  # two folders of one name: the path as given
    draw(runs, args.out, args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
