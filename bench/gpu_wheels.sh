#!/bin/sh
# Wheels for the lent GPU machines (bench/GPU.md), into .whl/ (git-ignored): the versions this checkout
# runs of what their image lacks or holds at another version. Their image has torch, numpy, pyyaml,
# pytest and most of transformers' needs, but no pydantic, an older transformers (5.17) and a
# huggingface_hub (1.33) that transformers 5.25 does not take. Ray (79 MB) is over the 64 MiB a call
# can carry, so the GPU run is in-process (bench/gpu_run.sh). About 24 MiB.
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl
pin() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
for name in transformers huggingface_hub tokenizers peft accelerate safetensors pydantic pydantic_core \
            annotated-types typing-inspection typing_extensions kernels tomlkit httpx2 httpcore2 truststore; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$name==$(pin "$name")"
done
du -sh .whl
