"""Each recipe switch on its own over the GPT-2 baseline: val loss at equal steps and at equal wall time.

    python bench/ablate.py                                          # every switch, 3 seeds each
    python bench/ablate.py --variants rope muon --seeds 1 --max_iters 60 --eval_interval 20   # a quick check
    python bench/ablate.py --variants rope muon --variant modern=pos_emb=rope,norm=rmsnorm,mlp=relu2,optimizer=muon
    python bench/ablate.py --input corpus.txt --tokenizer gpt2 --set n_layer=4 n_head=4 n_embd=128
    python bench/ablate.py --config config/default.yaml --variants --variant modern=config/modern_124m.yaml ...

Trains --config (default: the quick start) as the file says, --set applied to every run, once per seed
for the baseline and for each variant, which adds its overrides (one switch for the built-in ones) and
nothing else. Every run trains the same max_iters and evaluates at step 0 and every --eval_interval steps
(default: a sixteenth of the run) on the config's eval_iters batches. A seed fixes the training and the
evaluation batches, so within a seed every variant sees the same data. Measured, over the seeds:
  equal steps:  the val loss of the final evaluation, at max_iters; mean ± std.
  equal time:   T = the baseline's mean time from launching the process to its final evaluation line;
                each run's val loss is that of its last evaluation printed by T, so a slower variant is
                judged on the evaluations it reached by then (fewer steps, its learning rate not yet
                decayed) and a faster one on its final evaluation (it trains no further than max_iters).
                The clock includes Python start-up, building the model, the evaluations and the
                checkpoint gptrain saves when val loss improves.
  Δ:            variant minus baseline within each seed; mean ± std of those differences.
  seconds:      launch to the final evaluation line, mean; × the baseline's.
Runs go seed by seed, every variant within a seed, so a machine that drifts in speed over the session
slows all variants alike. Not part of the test suite.
"""

import argparse
import statistics
import sys
from pathlib import Path

from side_by_side import CORPUS, GPTRAIN, ROOT, Workspace, describe_machine, print_table

sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from gptrain.config import ConfigError, load_config  # noqa: E402

VARIANTS = {
    "rope": ["pos_emb=rope"],
    "rmsnorm": ["norm=rmsnorm"],
    "qk_norm": ["qk_norm=true"],
    "relu2": ["mlp=relu2"],
    "swiglu": ["mlp=swiglu"],
    "untied": ["tie_embeddings=false"],
    "softcap": ["logit_softcap=15"],
    "zero_init": ["zero_init_proj=true"],
    "muon": ["optimizer=muon"],
    "wsd": ["lr_schedule=wsd"],
}
EVALS = 16  # evaluations per run by default, besides step 0: enough for a reading near any time T


def custom_variant(text: str) -> tuple[str, list[str]]:
    """argparse type for --variant NAME=key=value,key=value; a config file may stand among the pairs, so a
    whole recipe (config/modern_124m.yaml) can be run against the baseline's config."""
    name, _, overrides = text.partition("=")
    pairs = overrides.split(",") if overrides else []
    if not name or not pairs or not all("=" in pair or pair.endswith((".yaml", ".yml")) for pair in pairs):
        raise argparse.ArgumentTypeError(f"expected NAME=key=value[,key=value ...] (or a .yaml file among "
                                         f"them), got '{text}'")
    return name, pairs


def spread(values: list[float], digits: int = 4, sign: str = "") -> str:
    """mean ± sample std (the mean alone for one value)."""
    mean = statistics.fmean(values)
    return f"{mean:{sign}.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def at_time(evals: list[tuple[float, int, float]], limit: float) -> tuple[int, float]:
    """(step, val loss) of the last evaluation printed by `limit` seconds after launch."""
    reached = [(step, loss) for seconds, step, loss in evals if seconds <= limit]
    return reached[-1] if reached else (0, float("nan"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="config/shakespeare_char.yaml", help="gptrain's config, relative to the "
                   "repository root (default: config/shakespeare_char.yaml)")
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS), metavar="NAME",
                   help=f"built-in variants to run besides the baseline (default: all: {' '.join(VARIANTS)}; "
                   "none named: only the baseline and --variant)")
    p.add_argument("--variant", type=custom_variant, action="append", default=[], metavar="NAME=K=V,K=V",
                   help="another variant with these overrides (a .yaml file among them: a whole recipe), e.g. a "
                   "combination; repeatable")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every run, the "
                   "baseline's included (after --config, before a variant's)")
    p.add_argument("--seeds", type=int, default=3, help="runs of each variant, seeds from the config's on "
                   "(default: 3)")
    p.add_argument("--max_iters", type=int, help="steps of every run, and lr_decay_iters with it (default: the "
                   "config's); fewer only to check this script quickly")
    p.add_argument("--eval_interval", type=int, help=f"steps between evaluations (default: max_iters / {EVALS})")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--input", type=Path, help="a text file to prepare with `gptrain prepare` "
                        "(default: data/tinyshakespeare.txt)")
    source.add_argument("--data_dir", type=Path, help="an already prepared data directory instead of --input")
    p.add_argument("--tokenizer", default="char", help="--input's tokenizer: char or gpt2 (default: char)")
    args = p.parse_args()
    variants = {"baseline": [], **{name: VARIANTS[name] for name in args.variants}}
    for name, overrides in args.variant:
        if name in variants:
            p.error(f"--variant {name}: that name is taken")
        variants[name] = overrides

    # Settle every run's settings before training any: a typo in the last variant fails now, not in an hour.
    horizon = [f"max_iters={args.max_iters}", f"lr_decay_iters={args.max_iters}"] if args.max_iters else []
    try:
        plan = load_config([str(ROOT / args.config), *args.set, *horizon])
    except ConfigError as e:
        p.error(str(e))
    if not isinstance(plan.max_iters, int):
        p.error("max_iters=auto gives each variant its own steps by its parameters: pass --max_iters")
    settings = [*args.set, *horizon, f"eval_interval={args.eval_interval or max(1, plan.max_iters // EVALS)}",
                "tensorboard=false"]
    seeds = [plan.seed + i for i in range(args.seeds)]
    for name, overrides in variants.items():
        try:
            config = load_config([str(ROOT / args.config), *settings, *overrides])
        except ConfigError as e:
            p.error(f"variant {name}: {e}")
        if config.max_iters != plan.max_iters:
            p.error(f"variant {name} changes max_iters: every run trains the same steps")

    runs = {name: [] for name in variants}  # each run's evaluations, seed by seed
    with Workspace() as work:
        corpus = (args.input or CORPUS).resolve()
        data_dir = args.data_dir.resolve() if args.data_dir else work.prepare_gptrain(args.tokenizer, corpus)
        common = [args.config, f"data_dir={data_dir}", *settings]
        for i, seed in enumerate(seeds):
            for name, overrides in variants.items():
                evals = work.run_gptrain([*common, *overrides, f"seed={seed}"]).evals(GPTRAIN)
                if not evals or evals[-1][1] != plan.max_iters:
                    raise SystemExit(f"{name}, seed {seed}: no evaluation at step {plan.max_iters}")
                runs[name].append(evals)
                print(f"seed {seed} ({i + 1}/{len(seeds)}), {name}: val loss {evals[-1][2]:.4f} at step "
                      f"{plan.max_iters:,}, {evals[-1][0]:.1f} s after launch", file=sys.stderr, flush=True)
        shown = work.shown(work.gptrain_command([*common, f"seed={seeds[0]}"]))

    limit = statistics.fmean(evals[-1][0] for evals in runs["baseline"])
    final = {name: [evals[-1][2] for evals in done] for name, done in runs.items()}
    timed = {name: [at_time(evals, limit) for evals in done] for name, done in runs.items()}
    timed_loss = {name: [loss for _, loss in readings] for name, readings in timed.items()}
    seconds = {name: statistics.fmean(evals[-1][0] for evals in done) for name, done in runs.items()}

    def versus(name: str, losses: dict[str, list[float]]) -> str:
        if name == "baseline":
            return ""
        return spread([ours - theirs for ours, theirs in zip(losses[name], losses["baseline"])], sign="+")

    rows = [[name, " ".join(overrides) or "(GPT-2)", spread(final[name]), versus(name, final),
             spread(timed_loss[name]), versus(name, timed_loss),
             f"{statistics.fmean(step for step, _ in timed[name]):,.0f}",
             f"{seconds[name]:.1f}" + (f" (×{seconds[name] / seconds['baseline']:.2f})" if name != "baseline" else "")]
            for name, overrides in variants.items()]
    print_table(["variant", "overrides", f"val loss at {plan.max_iters:,} steps", "Δ", f"val loss at {limit:.1f} s",
                 "Δ", "step at that time", "seconds to last eval"], rows, text_columns=2)
    print()
    data = (f"`{args.data_dir}`" if args.data_dir else f"`{args.input or CORPUS.relative_to(ROOT)}` prepared with "
            f"`--tokenizer {args.tokenizer}` into $WORK/gptrain_{args.tokenizer}")
    print(f"- Baseline: `{shown}`; each variant adds its overrides; seeds {', '.join(map(str, seeds))}. "
          f"Data: {data}.")
    print(f"- Mean ± std over {len(seeds)} seed(s); Δ = variant - baseline within each seed. Equal time: each "
          f"run's last evaluation printed within {limit:.1f} s of launch (the baseline's mean time to its last), "
          f"at the mean step shown; times include start-up and evaluations.")
    print(describe_machine())


if __name__ == "__main__":
    main()
