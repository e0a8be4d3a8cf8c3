#!/usr/bin/env bash
# Trains RevCol-Transformer (Table 10) on WMT with the paper's schedule and Ott et al. (2018)'s optimizer.
#
#   GPUS=8 examples/translation/train_wmt.sh en-de DATA_BIN SAVE_DIR [extra fairseq-train flags]
#   GPUS=8 examples/translation/train_wmt.sh en-fr DATA_BIN SAVE_DIR [extra fairseq-train flags]
#
# en-de: WMT'16 En-De, 300K updates of 28,672 tokens; arch revcol_transformer (dropout 0.3), lr 5e-4: the
#        setting of Ott et al. for this batch size (8 GPUs x 3584 tokens; fairseq examples/scaling_nmt).
# en-fr: WMT'14 En-Fr, 200K updates of 86,016 tokens (3x the En-De batch); arch revcol_transformer_wmt_en_fr
#        (dropout 0.1). lr 7e-4 is our choice between Ott et al.'s 5e-4 (28K-token batches) and 1e-3 (400K).
# Both: Adam (0.9, 0.98), inverse-sqrt schedule with 4000 warmup updates from 1e-7, label smoothing 0.1,
# no weight decay, no gradient clipping, all embeddings shared, --fp16.
#
# The batch is split over GPUS (1 to 8) as --max-tokens per GPU x --update-freq: at most 3584 tokens per GPU
# per step (what fits a 16 GB V100 in Ott et al.), accumulated until GPUS x max_tokens x update_freq reaches
# the paper's batch (exactly for 1, 2, 4 and 8 GPUs, within 0.1% otherwise). --max-tokens caps a batch, so the
# tokens of a real batch are a little lower, as in the paper. DATA_BIN must hold fairseq-preprocess's output
# (prepare_wmt.py, beside this script). DRY_RUN=1 prints the command instead of running it. Checkpoints every
# SAVE_INTERVAL updates (default 2000; the last 10 kept for averaging), JSON log lines in SAVE_DIR/train.log,
# TensorBoard event files in SAVE_DIR/tensorboard.
set -euo pipefail

if [[ $# -lt 3 || ( $1 != en-de && $1 != en-fr ) ]]; then
    echo "usage: GPUS=<1..8> $0 en-de|en-fr DATA_BIN SAVE_DIR [extra fairseq-train flags]" >&2
    exit 2
fi
TASK=$1
DATA_BIN=$2
SAVE_DIR=$3
shift 3
GPUS=${GPUS:-8}
SAVE_INTERVAL=${SAVE_INTERVAL:-2000}
if ! [[ $GPUS =~ ^[1-8]$ ]]; then
    echo "error: GPUS must be 1 to 8, got '$GPUS'" >&2
    exit 2
fi
REPO=$(cd "$(dirname "$0")/../.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python
    [[ -x "$REPO/.venv/bin/python" ]] && PYTHON="$REPO/.venv/bin/python"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [[ $TASK == en-de ]]; then
    ARCH=revcol_transformer BATCH_TOKENS=28672 MAX_UPDATE=300000 LR=5e-4
else
    ARCH=revcol_transformer_wmt_en_fr BATCH_TOKENS=86016 MAX_UPDATE=200000 LR=7e-4
fi
# fairseq-train would fail on missing data with a traceback in every one of its GPU processes.
for file in dict.en.txt "dict.${TASK#en-}.txt" "train.$TASK.en.idx" "valid.$TASK.en.idx"; do
    if [[ ! -f "$DATA_BIN/$file" ]]; then
        echo "error: $DATA_BIN/$file does not exist: binarize the data first (examples/translation/prepare_wmt.py, docs/translation.md)" >&2
        exit 1
    fi
done
TOKENS_PER_GPU_LIMIT=3584
UPDATE_FREQ=$(( (BATCH_TOKENS + GPUS * TOKENS_PER_GPU_LIMIT - 1) / (GPUS * TOKENS_PER_GPU_LIMIT) ))
MAX_TOKENS=$(( BATCH_TOKENS / (GPUS * UPDATE_FREQ) ))

command=("$PYTHON" -m fairseq_cli.train "$DATA_BIN" --user-dir "$REPO/revcol_fairseq" --arch "$ARCH"
    --share-all-embeddings --distributed-world-size "$GPUS" --fp16
    --optimizer adam --adam-betas "(0.9, 0.98)" --clip-norm 0.0 --weight-decay 0.0
    --lr "$LR" --lr-scheduler inverse_sqrt --warmup-updates 4000 --warmup-init-lr 1e-07
    --criterion label_smoothed_cross_entropy --label-smoothing 0.1
    --max-tokens "$MAX_TOKENS" --update-freq "$UPDATE_FREQ" --max-update "$MAX_UPDATE"
    --save-dir "$SAVE_DIR" --save-interval-updates "$SAVE_INTERVAL" --keep-interval-updates 10
    --no-epoch-checkpoints --log-format json --log-interval 100 --log-file "$SAVE_DIR/train.log"
    --tensorboard-logdir "$SAVE_DIR/tensorboard" "$@")

echo "batch: $GPUS GPUs x $MAX_TOKENS tokens x update-freq $UPDATE_FREQ" \
     "= $(( GPUS * MAX_TOKENS * UPDATE_FREQ )) tokens (paper: $BATCH_TOKENS)"
if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi
mkdir -p "$SAVE_DIR"
exec "${command[@]}"
