#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, each part in one run of at most DEADLINE_S seconds (default 540):
#
#   benchmarks/gpu_check.sh vit       memory against columns, RevCol-ViT against timm's ViT, the largest batch
#                                     in 16 GiB, the CUDA tests and compiled RevCol-ViT-S
#   benchmarks/gpu_check.sh fairseq   installs fairseq from the wheels in .whl/ (a fairseq build for the GPU
#                                     machine's Python), then the Transformer throughput at 4096 tokens
#
# Run it from the repository root. Output goes to $OUT (default runs/gpu_check): PART.log with every step's
# output, and the benchmarks' CSV and PNG files. Each step runs under what is left of the deadline, so a slow
# step costs the steps after it, not the log.
set -uo pipefail
part=${1:-}
out=${OUT:-runs/gpu_check}
end=$((SECONDS + ${DEADLINE_S:-540}))
case "$part" in vit | fairseq) ;; *) echo "usage: benchmarks/gpu_check.sh vit|fairseq" >&2; exit 2 ;; esac
python3 -c 'import sys, torch; torch.cuda.is_available() or sys.exit("gpu_check.sh: no CUDA device here")' || exit 1
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

# step CAP_S NAME COMMAND...: runs COMMAND for at most CAP_S seconds, and never past the deadline.
step() {
    local cap=$1 name=$2 left=$((end - SECONDS))
    shift 2
    ((left < cap)) && cap=$left
    if ((cap <= 0)); then echo "### $name: skipped, no time left"; return; fi
    echo "### $name (at most ${cap} s): $*"
    local t0=$SECONDS
    timeout "$cap" "$@"
    echo "### $name: exit $?, $((SECONDS - t0)) s"
}

{
echo "### $(date -u +%F) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
python3 -c 'import torch, timm; print("### torch", torch.__version__, "timm", timm.__version__)'
if [ "$part" = vit ]; then
    step 120 "memory against columns" \
        python3 benchmarks/benchmark.py memory --mode columns --batch 64 --amp bf16 --out "$out/memory"
    step 240 "eager RevCol-ViT against timm's ViT" \
        python3 benchmarks/benchmark.py throughput --models "revcol_vit_s,revcol_vit_s plain,vit_small_patch16_224" \
        --out "$out/vit_throughput"
    step 120 "largest batch in 16 GiB" \
        python3 benchmarks/benchmark.py memory --mode vit-budget --models "revcol_vit_b,vit_base_patch16_224" \
        --out "$out/vit_budget"
    step 180 "CUDA tests" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_compile.py -k cuda
    step 600 "compiled RevCol-ViT-S (divide by the eager rows above)" \
        python3 benchmarks/benchmark.py throughput --models "revcol_vit_s compiled" --out "$out/vit_compiled"
else
    export PYTHONPATH=/tmp/site:$PYTHONPATH
    # The install lines prepare-fairseq-wheels.sh prints; CUDA_HOME unset, or the optional CUDA extensions fail.
    step 240 "build fairseq" bash -c 'python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
        .whl/*.whl && env -u CUDA_HOME MAX_JOBS=16 python3 -m pip wheel -q --no-deps --no-build-isolation --no-index \
        -w /tmp/fw .whl/fairseq_fixed-*.tar.gz && python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/fw/*.whl'
    step 600 "RevCol-Transformer against Transformer-big" python3 benchmarks/benchmark.py fairseq --mode throughput \
        --max-tokens 4096 --updates 150 --log-interval 30 --log-dir /tmp/fairseq_logs
    [ -d /tmp/fairseq_logs ] && tar czf "$out/fairseq_logs.tgz" -C /tmp fairseq_logs
fi
} 2>&1 | tee "$out/$part.log"
