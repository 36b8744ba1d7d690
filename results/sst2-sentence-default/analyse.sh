#!/usr/bin/env bash
# The plan's outcomes from the two studies (run from the repository root: ./run.sh bash results/sst2-sentence-default/analyse.sh V R)
# V, R: the variant's and the reference's study directories (cells coin-s6, coin-s7, coin-s8).
set -euo pipefail
V=${1:-outputs/study-mw-variant}; R=${2:-outputs/study-mw-reference}; OUT=results/sst2-sentence-default
cells() { echo "$1/cells/coin-s6,$1/cells/coin-s7,$1/cells/coin-s8"; }
P=experiments/paired_task_bootstrap.py
python $P --a "$(cells "$V")" --b "$(cells "$R")" --per-task > $OUT/all-tasks.json                    # 7-task average, per task (A: sst2)
python $P --a "$(cells "$V")" --b "$(cells "$R")" --tasks cola,mrpc,qnli,rte,wnli,mnli > $OUT/six-tasks.json   # B
python experiments/compare_variants.py "coin, sst2 rows of 7+ words=$V:coin" "coin (shipped)=$R:coin" \
    --pairs-may-differ --out $OUT
