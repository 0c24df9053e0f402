#!/usr/bin/env bash
# Every GPU check in one invocation on one CUDA GPU (aimed at under 8 minutes on an H100). Each step runs
# under its own time limit, so a hang costs that step alone, and prints one line: PASS or FAIL, its
# seconds and its figure. At the end: a markdown table of the steps and the benchmarks' own tables, to
# paste into docs/benchmarks.md.
#
#   bash bench/gpu_check.sh [--nanogpt DIR] [--out DIR] [--only STEP,STEP] [--dry_run]
#
#   --nanogpt DIR   a nanoGPT checkout, for the training and generation benchmarks side by side (without
#                   one, gptrain alone)
#   --out DIR       logs and data (default: /tmp/gpu_check); each step's output is in DIR/STEP.out and .log
#   --only STEPS    run only these steps, e.g. --only cuda_tests,serve (data is made when a step needs it)
#   --dry_run       print every step's command and time limit, run nothing: works on any machine
#   PYTHON=...      the interpreter (default: python3)
#
# Steps: deps (the packages the steps import), cuda_tests (tests/test_cuda.py), data (GPT-2 tokens of the
# shipped corpus: speed does not depend on the text), gpt2_124m (bench/gpu.py: bf16, torch.compile,
# tokens/s and MFU, beside nanoGPT), recipes (config/modern_124m.yaml against config/default.yaml, val loss
# after the same wall time, bench/ablate.py: a short run on a 1 MB corpus, so a smoke test of both recipes
# rather than a verdict), fsdp and fsdp_resume (torchrun on one GPU, parallelism=fsdp, then init_from=resume
# from its sharded checkpoint), batch_auto (batch_size=auto), generate (bench/generate.py: 1 and 16
# samples) and serve (bench/serve.py: 1 and 16 clients).
set -uo pipefail
cd "$(dirname "$0")/.."

out=/tmp/gpu_check nanogpt="" only="" dry=0
while (($#)); do
  case $1 in
    --out) out=$2; shift 2 ;;
    --nanogpt) nanogpt=$2; shift 2 ;;
    --only) only=",$2,"; shift 2 ;;
    --dry_run) dry=1; shift ;;
    -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
# the steps that train need the data step
[[ $only =~ ,(recipes|fsdp|fsdp_resume|batch_auto), ]] && only+="data,"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}  # the interpreter that has torch (python3 on most GPU images)
nano=()
[[ -n $nanogpt ]] && nano=(--nanogpt "$nanogpt")
data=$out/data
# The training steps' shared settings: GPT-2 124M (config/default.yaml) on the shipped corpus, a few steps
train=(data_dir="$data" log_dir="$out/logs" tensorboard=false eval_iters=2 log_interval=1 warmup_iters=2)
# Four of the default's 40 micro-batches a step: the figures are per token, the steps come 10 times sooner.
short=(tokens_per_step=49152)
results=() failed=0

# figure STEP: the line of the step's output that says how it went.
figure() {
  local o=$out/$1.out
  case $1 in
    deps|data) tail -n 1 "$o" ;;
    cuda_tests) grep -E "passed|failed|skipped|error" "$o" | tail -n 1 ;;
    gpt2_124m) awk -F' *[|] *' '$2 ~ /^(gptrain|nanoGPT)$/ {printf "%s %s tok/s, MFU %s; ", $2, $6, $7}' "$o" ;;
    recipes) awk -F' *[|] *' '$2 ~ /^(baseline|modern)$/ {printf "%s: val %s at the end, %s at equal time; ",
                                                                 $2, $4, $6}' "$o" ;;
    fsdp|batch_auto) { grep -E "^batch " "$o"; grep -E "tok/s" "$o" | tail -n 1; } | tr -s ' ' | paste -sd ';' ;;
    fsdp_resume) { grep -E "^resuming" "$o"; grep -E "tok/s" "$o" | tail -n 1; } | paste -sd ';' ;;
    generate) awk -F' *[|] *' '$2 ~ /^(ours|nanoGPT)/ {printf "%s: %s tok/s; ", $2, $5}' "$o" ;;
    serve) awk -F' *[|] *' '$2 ~ /^[0-9]+$/ {printf "%s clients: %s tok/s (%s), p99 %s s; ", $2, $4, $5, $7}' "$o" ;;
  esac
}

# step NAME LIMIT_S COMMAND...: run the command under its time limit (then killed), stdout to NAME.out and
# stderr to NAME.log, and print its result line.
step() {
  local name=$1 limit=$2; shift 2
  [[ -z $only || $only == *",$name,"* ]] || return 0
  if ((dry)); then
    echo "step $name (limit ${limit}s): $(printf '%q ' "$@")"
    return 0
  fi
  local start=$SECONDS status result fig
  timeout --kill-after=20 "$limit" "$@" >"$out/$name.out" 2>"$out/$name.log"
  status=$?
  if ((status == 0)); then result=PASS
  elif ((status == 124 || status == 137)); then result="FAIL (timed out at ${limit}s)"
  else result="FAIL (exit $status)"
  fi
  local seconds=$((SECONDS - start))
  fig=$(figure "$name" 2>/dev/null | cut -c1-300)
  if [[ $result != PASS ]]; then
    failed=$((failed + 1))
    fig="$fig see $out/$name.log: $(tail -n 1 "$out/$name.log" | cut -c1-200)"
  fi
  echo "$result $name (${seconds}s): $fig"
  results+=("| $name | $result | $seconds | ${fig//|//} |")
}

if ((!dry)); then
  mkdir -p "$out"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
  echo "gptrain $(git rev-parse --short HEAD 2>/dev/null || echo '(no git)'), $(date -u '+%Y-%m-%d %H:%M') UTC"
fi

# what the steps import: the core dependencies, the serve extra, and httpx for bench/serve.py's clients
step deps 60 $py -c "import importlib.util as u, sys; need = 'torch numpy tiktoken omegaconf yaml tqdm starlette \
uvicorn httpx'.split(); missing = [m for m in need if u.find_spec(m) is None]; \
print('missing: ' + ' '.join(missing) if missing else 'all there: ' + ' '.join(need)); sys.exit(bool(missing))"
step cuda_tests 300 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py
step data 120 $py -m gptrain.cli prepare --input data/tinyshakespeare.txt --tokenizer gpt2 --out_dir "$data" \
  --overwrite
step gpt2_124m 360 $py bench/gpu.py --steps 12 "${nano[@]}"
step recipes 300 $py bench/ablate.py --config config/default.yaml --variants --variant \
  modern=config/modern_124m.yaml --data_dir "$data" --seeds 1 --max_iters 60 --eval_interval 15 \
  --set device=cuda compile=false "${short[@]}" warmup_iters=6 eval_iters=10
step fsdp 240 $py -m torch.distributed.run --standalone --nproc_per_node=1 train.py "${train[@]}" \
  "${short[@]}" out_dir="$out/fsdp" parallelism=fsdp compile=false max_iters=10 eval_interval=10
step fsdp_resume 180 $py -m torch.distributed.run --standalone --nproc_per_node=1 train.py "${train[@]}" \
  "${short[@]}" out_dir="$out/fsdp" parallelism=fsdp compile=false max_iters=14 eval_interval=14 init_from=resume
step batch_auto 240 $py train.py "${train[@]}" out_dir="$out/auto" batch_size=auto compile=false max_iters=3 \
  eval_interval=3
step generate 180 $py bench/generate.py --device cuda --tokens 200 --samples 16 --repeat 2 "${nano[@]}"
step serve 180 $py bench/serve.py levels --device cuda --clients 1 16 --requests 4 --max_tokens 64
((dry)) && exit 0

echo
echo "| step | result | seconds | figure |"
echo "| --- | --- | ---: | --- |"
printf '%s\n' "${results[@]}"
for name in gpt2_124m recipes generate serve; do
  [[ -s $out/$name.out ]] && printf '\n### %s\n\n%s\n' "$name" "$(cat "$out/$name.out")"
done
exit $((failed > 0))
