#!/usr/bin/env bash
# The prepared GPU check (issue 5): run once on a CUDA machine, from the repository root.
# GPU tests, then the benchmark's CUDA rows in float16 at simulated acceptance 0.2..0.95.
set -uo pipefail
out=${OUT:-/tmp/sybil-gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD  # the GPU machine has no registry: use what it has installed
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
python3 -m pytest -q tests/test_cuda_graphs.py 2>&1 | tee "$out/gpu-tests.txt" | tail -5
for a in 0.2 0.5 0.8 0.95; do
  python3 -m bench.throughput --device cuda --dtype float16 --weights random --target gpt2-medium --draft gpt2 \
    --simulate-acceptance "$a" --k 1,2,4,8,auto --prompts 2 --max-new-tokens 64 --repeats 3 \
    --json "$out/bench-$a.json" 2>/dev/null | tee "$out/bench-$a.md"
done
