cd /tmp/wt-cal
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
