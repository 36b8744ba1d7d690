cd /tmp/wt-cal
P="env PYTHONPATH=/work/main/src:/work/main OMP_NUM_THREADS=1 .venv/bin/python /work/main/experiments/paired_task_bootstrap.py --set clean --per-task"
$P --a outputs/sb42-eval-012/predictions.jsonl:v0,v1,v2 --a outputs/sb7-eval-012/predictions.jsonl:v0,v1,v2 --b outputs/eval-ref/predictions.jsonl:s0,s1,s2 --b outputs/ref7-eval-012/predictions.jsonl:r0,r1,r2 > /tmp/sb-an/primary.json
$P --a outputs/sb7-eval-012/predictions.jsonl:v0,v1,v2 --b outputs/ref7-eval-012/predictions.jsonl:r0,r1,r2 > /tmp/sb-an/d7.json
$P --a outputs/sb42-eval-012/predictions.jsonl:v0,v1,v2 --b outputs/eval-ref/predictions.jsonl:s0,s1,s2 > /tmp/sb-an/d42-012.json
