"""Wall time, start-up included, for gptrain's quick start to reach the val loss nanoGPT's README CPU run ends at.

    python bench/time_to_loss.py --nanogpt ~/nanoGPT                       # one run of each
    python bench/time_to_loss.py --nanogpt ~/nanoGPT --full --repeat 3
    python bench/time_to_loss.py --nanogpt ~/nanoGPT --nano_max_iters 250 --ours max_iters=250   # a quick check

Each repetition first runs nanoGPT's README CPU recipe as it is (config/train_shakespeare_char.py with
--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0; only
out_dir moved), timed from launching the process to its last evaluation line ("step 2000: ... val loss
X"); X is the target. Then gptrain with --config as the file says (out_dir, log_dir and data_dir moved to
the work directory; --ours adds overrides), timed from launch to its first evaluation with val loss <= X,
where it is stopped; --full lets it finish and reports its final val loss and total time as well.
Ratio = gptrain's time / nanoGPT's (< 1: gptrain is faster). Both train on the same token files (each
trainer's own `prepare` makes identical ones) but each draws its own evaluation batches, so equal
losses agree to about 0.01. The CPU's kind (native bfloat16 or not) is printed with a bf16 / fp32
matmul check; --no_native_bf16 runs both trainers on the path without it. Not part of the test suite.
"""

import argparse
import sys

from cpu import add_bf16_option, bf16_paths
from side_by_side import GPTRAIN, NANOGPT, Workspace, describe_machine, median, nanogpt_dir, print_table


def nanogpt_recipe(max_iters: int) -> list[str]:
    """nanoGPT's README CPU run, which has max_iters 2000; the work directory adds out_dir."""
    return ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
            "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
            f"--max_iters={max_iters}", f"--lr_decay_iters={max_iters}", "--dropout=0.0"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nanogpt", type=nanogpt_dir, required=True, help="a nanoGPT checkout (only read)")
    p.add_argument("--config", default="config/shakespeare_char.yaml", help="gptrain's config, relative to the "
                   "repository root (default: config/shakespeare_char.yaml)")
    p.add_argument("--ours", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for gptrain, after --config")
    p.add_argument("--nano_max_iters", type=int, default=2000, help="nanoGPT's max_iters and lr_decay_iters "
                   "(default: 2000, the recipe's); fewer only to check this script quickly")
    p.add_argument("--full", action="store_true", help="let gptrain finish instead of stopping it at the target")
    p.add_argument("--repeat", type=int, default=1, help="runs of each, alternating (default: 1)")
    add_bf16_option(p)
    args = p.parse_args()
    bf16 = bf16_paths(force=args.no_native_bf16)  # before any measured process starts

    recipe = nanogpt_recipe(args.nano_max_iters)
    rows, ratios = [], []
    with Workspace(args.nanogpt) as work:
        data_dir, _ = work.prepare("char")
        ours = [args.config, f"data_dir={data_dir}", *args.ours]
        for i in range(args.repeat):
            nano_evals = work.run_nanogpt(recipe).evals(NANOGPT)
            if not nano_evals:
                raise SystemExit("nanoGPT printed no evaluation line")
            nano_s, nano_step, target = nano_evals[-1]
            print(f"run {i + 1}/{args.repeat}, nanoGPT: val loss {target:.4f} at step {nano_step} after {nano_s:.1f} s",
                  file=sys.stderr, flush=True)

            def reached(line: str) -> bool:
                return (m := GPTRAIN.eval_line.match(line)) is not None and float(m[2]) <= target

            result = work.run_gptrain(ours, stop=None if args.full else reached)
            evals = result.evals(GPTRAIN)
            hit = next(((s, step, loss) for s, step, loss in evals if loss <= target), None)
            final = evals[-1]
            reading = (f"val loss {hit[2]:.4f} at step {hit[1]} after {hit[0]:.1f} s" if hit
                       else f"target not reached, final val loss {final[2]:.4f}")
            print(f"run {i + 1}/{args.repeat}, gptrain: {reading}", file=sys.stderr, flush=True)
            row = [str(i + 1), f"{nano_s:.1f} s (step {nano_step:,})", f"{target:.4f}",
                   f"{hit[0]:.1f} s (step {hit[1]:,}, {hit[2]:.4f})" if hit else "not reached",
                   f"**{hit[0] / nano_s:.2f}**" if hit else "-"]
            if args.full or not hit:
                row += [f"{final[2]:.4f} (step {final[1]:,})", f"{result.seconds:.1f} s"]
            rows.append(row)
            ratios += [hit[0] / nano_s] if hit else []

    headers = ["run", "nanoGPT to its last eval", "target val loss", "gptrain to val <= target",
               "ratio (gptrain / nanoGPT)"]
    if any(len(row) > len(headers) for row in rows):
        headers += ["gptrain final val loss", "gptrain total"]
        rows = [row + [""] * (len(headers) - len(row)) for row in rows]
    if len(rows) > 1 and ratios:
        label = "median" if len(ratios) == len(rows) else f"median of the {len(ratios)} that reached it"
        rows.append([label, "", "", "", f"**{median(ratios):.2f}**"] + [""] * (len(headers) - 5))
    print_table(headers, rows)
    print()
    print(f"- gptrain: `{work.shown(work.gptrain_command(ours))}`")
    print(f"- nanoGPT: `{work.shown(work.nanogpt_command(recipe))}`")
    print("- Times run from launching each process (Python start-up, imports, data and model set-up included) to the "
          "moment its evaluation line was printed; both evaluate at step 0 and every eval_interval steps.")
    print(f"- {bf16}")
    print(describe_machine(args.nanogpt))


if __name__ == "__main__":
    main()
