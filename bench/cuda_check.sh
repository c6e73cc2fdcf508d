#!/usr/bin/env bash
# The CUDA checks of the engine issue, as one script for a lent GPU machine (device tool).
# Needs, carried: .whl/ (bitsandbytes, transformers, peft wheels) and .device/model-arch/
# (config.json + tokenizer files of the default model). Writes logs and JSON to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, bitsandbytes as b; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', b.__version__)" \
    | tee -a "$OUT/gpu.txt"
python3 -m bench.make_arch_model .device/model-arch /tmp/default-arch || exit 1
[ -n "${SKIP_ORACLE:-}" ] || SWITCHBOARD_TEST_CUDA_BASE=/tmp/default-arch timeout 200 python3 -m pytest -q -s -m gpu \
    -p no:cacheprovider tests/test_engine_oracle.py 2>&1 | tee "$OUT/oracle.log" | tail -15
for q in ${QUANTIZE:-none nf4}; do
    timeout 170 python3 -m bench.engine_bench --source /tmp/default-arch --quantize $q \
        --suffix "_cuda_$q" 2>&1 | grep -v "it/s" | tail -12
    cp bench/results/engine_cuda_$q.json "$OUT/" 2>/dev/null
done
