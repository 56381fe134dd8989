#!/bin/sh
# Wheels that bench_gpu.py needs on a GPU machine whose Python (3.12) has torch, transformers, peft and
# accelerate but not TRL, its datasets library or dpo_core's pydantic: downloaded here into .whl/, in the
# versions this repository's tests pin against (benchmarks/contenders.py reads TRL 1.16's DPOConfig).
# On the GPU machine, with .whl carried there:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   PYTHONUNBUFFERED=1 python3 benchmarks/bench_gpu.py --all --json "$OUT/gpu-all.json"
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl
for spec in trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 \
        pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$spec"
done
ls .whl
