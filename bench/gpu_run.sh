#!/bin/sh
# The GPU run (issue 14's "a GPU run when one is lent"), as one device call (bench/GPU.md):
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#         && PYTHONPATH=/tmp/site:$PWD sh bench/gpu_run.sh
# with .whl carried (bench/gpu_wheels.sh). Writes into $OUT (else bench/runs/gpu): versions, the GPU tests'
# log, and the in-process comparison of the decode loop, whole-request batches and transformers'
# continuous batching on the 0.5B-shaped model.
# DEVICE=cpu MODEL_SIZE=small run the same steps on a machine without a GPU (how it was checked).
set -u
out=${OUT:-bench/runs/gpu}
device=${DEVICE:-cuda}
size=${MODEL_SIZE:-0.5b}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
python3 -c "import torch, transformers, peft, pydantic; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() \
and torch.cuda.get_device_name(0), 'transformers', transformers.__version__, 'peft', peft.__version__, 'pydantic', \
pydantic.__version__)" 2>&1 | tee "$out/versions.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$out/versions.txt"
# (test_fallback.py's bitsandbytes tests are left here: the image has no bitsandbytes, and its wheel is too big)
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/loading/test_on_gpu.py tests/loading/test_placement.py \
    2>&1 | tee "$out/gpu-tests.log" | tail -15
# one client: 16 chats per round (each ~64 sequential steps); 16 and 64 clients: 128 per round
timeout 200 python3 -m bench.continuous --model-size "$size" --device "$device" --clients 1 --requests 16 --rounds 2 \
    --max-batch 64 --max-tokens 64 --engines static,continuous,transformers-cb --results "$out/gpu-$size-1.md" \
    2>&1 | tee "$out/gpu-$size-1.log" | grep -v "it/s"
timeout 240 python3 -m bench.continuous --model-size "$size" --device "$device" --clients 16,64 --requests 128 \
    --rounds 2 --max-batch 64 --max-tokens 64 --engines static,continuous,transformers-cb \
    --results "$out/gpu-$size.md" 2>&1 | tee "$out/gpu-$size.log" | grep -v "it/s"
cat "$out/gpu-$size-1.md" "$out/gpu-$size.md" 2>/dev/null
