#!/usr/bin/env bash
# The GPU checks, in one run on a CUDA machine: the test suite (its CUDA tests included), then GPT-2 124M
# training speed and MFU at the default config with bf16 + torch.compile, DDP and FSDP. Usage: bash bench/gpu_check.sh [OUT_DIR]
set -uo pipefail
out=${1:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_train.py tests/test_generate.py tests/test_model.py 2>&1 | tail -n 15

# GPT-2 tokens of the shipped corpus stand in for OpenWebText: throughput does not depend on the text.
python3 -m gptrain.cli prepare --input data/tinyshakespeare.txt --tokenizer gpt2 --out_dir "$out/data" --overwrite >/dev/null
for compile in True False; do
  echo "== GPT-2 124M, default config (batch 12 x 1024, accum 40), bf16, compile=$compile"
  python3 train.py data_dir="$out/data" out_dir="$out/ckpt" log_dir="$out/logs" compile=$compile \
    max_iters=12 eval_interval=1000 eval_iters=1 log_interval=2 tensorboard=false 2>&1 | grep -E "parameters|iter (4|6|8|10|12) "
done
for parallelism in ddp fsdp; do
  echo "== GPT-2 124M, default config, bf16, compile=True, torchrun on 1 GPU, parallelism=$parallelism"
  python3 -m torch.distributed.run --standalone --nproc_per_node=1 train.py data_dir="$out/data" out_dir="$out/ckpt_$parallelism" \
    log_dir="$out/logs" parallelism=$parallelism max_iters=12 eval_interval=1000 eval_iters=1 log_interval=2 \
    tensorboard=false 2>&1 | grep -E "parameters|iter (4|6|8|10|12) |error"
done
echo "== fp16 with the gradient scaler, batch 16 as in the README"
python3 train.py data_dir="$out/data" out_dir="$out/ckpt" log_dir="$out/logs" dtype=float16 batch_size=16 compile=False \
  gradient_accumulation_steps=8 max_iters=10 eval_interval=10 eval_iters=2 log_interval=5 tensorboard=false 2>&1 | tail -n 4
python3 generate.py --model_path "$out/ckpt/ckpt.pt" --prompt "ROMEO:" --max_new_tokens 20 --seed 1 && echo "generate OK"
