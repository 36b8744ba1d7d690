# RESULTS §22's figures, from the repository root after run.sh (outputs/eval-ref*: §20's shipped adapters, all sets)
P="./run.sh python experiments/paired_task_bootstrap.py --set clean --per-task"
$P --a outputs/sb42-eval-012/predictions.jsonl:v0,v1,v2 --a outputs/sb7-eval-012/predictions.jsonl:v0,v1,v2 --b outputs/eval-ref/predictions.jsonl:s0,s1,s2 --b outputs/ref7-eval-012/predictions.jsonl:r0,r1,r2 > results/sst2-rows-draws/primary.json
$P --a outputs/sb7-eval-012/predictions.jsonl:v0,v1,v2 --b outputs/ref7-eval-012/predictions.jsonl:r0,r1,r2 > results/sst2-rows-draws/d7.json
$P --a outputs/sb42-eval-012/predictions.jsonl:v0,v1,v2 --b outputs/eval-ref/predictions.jsonl:s0,s1,s2 > results/sst2-rows-draws/d42-012.json
$P --a outputs/sb42-eval-345/predictions.jsonl:v3,v4,v5 --b outputs/eval-ref-345/predictions.jsonl:s3,s4,s5 > results/sst2-rows-draws/d42-345.json
$P --a outputs/sb11-eval-012/predictions.jsonl:v0,v1,v2 --b outputs/ref11-eval-012/predictions.jsonl:r0,r1,r2 > results/sst2-rows-draws/d11.json
$P --a outputs/sb42-eval-012/predictions.jsonl:v0,v1,v2 --a outputs/sb42-eval-345/predictions.jsonl:v3,v4,v5 \
   --a outputs/sb7-eval-012/predictions.jsonl:v0,v1,v2 --a outputs/sb11-eval-012/predictions.jsonl:v0,v1,v2 \
   --b outputs/eval-ref/predictions.jsonl:s0,s1,s2 --b outputs/eval-ref-345/predictions.jsonl:s3,s4,s5 \
   --b outputs/ref7-eval-012/predictions.jsonl:r0,r1,r2 --b outputs/ref11-eval-012/predictions.jsonl:r0,r1,r2 > results/sst2-rows-draws/pooled.json
# the same 12 pairs, each draw of rows weighed once and resampled first (added after §22: --draws)
$P --a outputs/sb42-eval-012/predictions.jsonl:v0,v1,v2 --a outputs/sb42-eval-345/predictions.jsonl:v3,v4,v5 \
   --a outputs/sb7-eval-012/predictions.jsonl:v0,v1,v2 --a outputs/sb11-eval-012/predictions.jsonl:v0,v1,v2 \
   --b outputs/eval-ref/predictions.jsonl:s0,s1,s2 --b outputs/eval-ref-345/predictions.jsonl:s3,s4,s5 \
   --b outputs/ref7-eval-012/predictions.jsonl:r0,r1,r2 --b outputs/ref11-eval-012/predictions.jsonl:r0,r1,r2 \
   --draws 42,42,42,42,42,42,7,7,7,11,11,11 > results/sst2-rows-draws/pooled-by-draw.json
