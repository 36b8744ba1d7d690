# RESULTS §22, run from the repository root with data-sb/ made as PLAN.md says (a copy of data/ whose
# glue/sst2.train.jsonl holds the 2,422 balanced sentence rows). §20's shipped adapters are outputs/ref/adapter-s0..5.
rm -rf data-sb && cp -r data data-sb && ./run.sh python - <<'PY'
import random
from coin.data.pairs import input_words, load_examples
from coin.data.tasks import get_task
spec = get_task("sst2")
lines = open("data/glue/sst2.train.jsonl").read().splitlines()
pool = load_examples("data", spec)
by = {}
for i, ex in enumerate(pool):
    if input_words(ex, spec) >= 7:
        by.setdefault(ex.label, []).append(i)
n = min(len(v) for v in by.values())                       # 1,211
rng = random.Random("balance:sst2")
keep = sorted(j for label in sorted(by) for j in rng.sample(by[label], n))
open("data-sb/glue/sst2.train.jsonl", "w").write("\n".join(lines[i] for i in keep) + "\n")   # sha256 53486f4e...
PY
prep() { # out data seed
  ./run.sh coin pairs --set paths.out_dir=$1 --set paths.data_dir=$2 --set seed=$3 && ./run.sh coin validate --set paths.out_dir=$1 --set paths.data_dir=$2 --set seed=$3 || { echo "PREP $1 RC=1"; exit 1; }
}
trn() { # out data seeds...
  o=$1; d=$2; shift 2
  for s in "$@"; do
    /usr/bin/time -f "real %e train $o s$s" ./run.sh coin train --set paths.out_dir=$o --set paths.data_dir=$d --set seed=$s
    echo "TRAIN $o s$s RC=$?"
    rm -rf $o/adapter-s$s; cp -r $o/train/coin/adapter $o/adapter-s$s
  done
}
ev() { # out tag seeds...
  o=$1; t=$2; shift 2; m=""
  for s in "$@"; do m="$m --model $t$s=$o/adapter-s$s"; done
  /usr/bin/time -f "real %e eval $o" ./run.sh coin evaluate --set paths.out_dir=$o --set 'evaluate.instruction_sets=[clean]' $m --out $o-eval-$(echo $@|tr -d ' ')
  echo "EVAL $o RC=$?"
}
prep outputs/sb42 data-sb 42; trn outputs/sb42 data-sb 0 1 2; ev outputs/sb42 v 0 1 2
prep outputs/ref7 data 7; trn outputs/ref7 data 0 1 2; ev outputs/ref7 r 0 1 2
prep outputs/sb7 data-sb 7; trn outputs/sb7 data-sb 0 1 2; ev outputs/sb7 v 0 1 2
prep outputs/ref11 data 11; trn outputs/ref11 data 0 1 2; ev outputs/ref11 r 0 1 2
prep outputs/sb11 data-sb 11; trn outputs/sb11 data-sb 0 1 2; ev outputs/sb11 v 0 1 2
trn outputs/sb42 data-sb 3 4 5; ev outputs/sb42 v 3 4 5
echo ALLDONE
