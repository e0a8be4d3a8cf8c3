#!/usr/bin/env bash
# Evaluates a translation run as the RevCol paper and Ott et al. (2018) report it: averages the last LAST
# checkpoints, translates the test set with beam 4 and length penalty 0.6, and prints tokenized compound-split
# BLEU plus, when DATA_BIN/test.raw.<tgt> exists, detokenized sacreBLEU with its signature.
#
#   examples/translation/evaluate_translation.sh DATA_BIN CHECKPOINT_DIR [extra fairseq-generate flags, e.g. --cpu]
#
# Environment: LAST (checkpoints to average, saved with --save-interval-updates; default 5),
# REMOVE_BPE (subword_nmt or sentencepiece; default subword_nmt), MAX_TOKENS (per generation batch; 8000).
# Writes CHECKPOINT_DIR/averaged_last$LAST.pt, generate-test.txt (+ .hyp/.ref) and bleu.json.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 DATA_BIN CHECKPOINT_DIR [extra fairseq-generate flags]" >&2
    exit 2
fi
DATA_BIN=$1
CHECKPOINT_DIR=$2
shift 2
LAST=${LAST:-5}
REMOVE_BPE=${REMOVE_BPE:-subword_nmt}
MAX_TOKENS=${MAX_TOKENS:-8000}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python
    [[ -x "$REPO/.venv/bin/python" ]] && PYTHON="$REPO/.venv/bin/python"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [[ ! -d "$DATA_BIN" ]]; then
    echo "error: data directory $DATA_BIN does not exist" >&2
    exit 1
fi
test_index=$(find "$DATA_BIN" -maxdepth 1 -name 'test.*-*.*.idx' -print -quit)
if [[ -z "$test_index" ]]; then
    echo "error: $DATA_BIN has no binarized test split (test.<src>-<tgt>.*.idx): run fairseq-preprocess first" >&2
    exit 1
fi
pair=$(basename "$test_index" | cut -d. -f2)
target_lang=${pair#*-}

averaged="$CHECKPOINT_DIR/averaged_last$LAST.pt"
"$PYTHON" "$HERE/average_checkpoints.py" "$CHECKPOINT_DIR" --last "$LAST" --output "$averaged"

# --required-batch-size-multiple 1: fairseq-fixed 0.12.3.1 silently drops a last batch smaller than the
# multiple (8 by default), i.e. up to 7 test sentences. The output replaces an earlier one only when complete.
output="$CHECKPOINT_DIR/generate-test.txt"
if ! "$PYTHON" -m fairseq_cli.generate "$DATA_BIN" --user-dir "$REPO/revcol_fairseq" --path "$averaged" \
        --gen-subset test --beam 4 --lenpen 0.6 --remove-bpe "$REMOVE_BPE" \
        --max-tokens "$MAX_TOKENS" --required-batch-size-multiple 1 "$@" > "$output.tmp"; then
    rm -f "$output.tmp"
    echo "error: fairseq-generate failed (above); $output is unchanged" >&2
    exit 1
fi
mv "$output.tmp" "$output"
tail -n 1 "$output"

raw_reference=()
if [[ -f "$DATA_BIN/test.raw.$target_lang" ]]; then
    raw_reference=(--raw-ref "$DATA_BIN/test.raw.$target_lang")
fi
"$PYTHON" "$HERE/score_translations.py" "$output" --lang "$target_lang" \
    --json "$CHECKPOINT_DIR/bleu.json" "${raw_reference[@]}"
