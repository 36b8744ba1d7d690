#!/usr/bin/env bash
# A study's cells on a GPU machine that holds torch, transformers, peft, pandas, pyarrow and PyYAML but none of the
# orchestration stack (no Prefect, MLflow, DVC) and not the MiniLM package: each cell is `python -m coin.study.cell`,
# several at once on the one GPU, each stopped at a shared deadline. Copy the finished cells back and run
# `coin study` with the same --set options: their keys match, so it only aggregates (README, "Study").
#
#   bash experiments/gpu_study.sh CARRY OUT JOBS DEADLINE_S METHODS SEEDS [--set k=v ...]
#
# CARRY  what experiments/gpu_study_carry.sh packed: wheels/ (installed with --no-deps into /tmp/site),
#        data.tar.xz (-> data/), validated.tar.xz (-> the study's validated pairs), minilm/ (the bf16 MiniLM copy of
#        `bench/gpu_check.py --export-minilm`, its weights xz-compressed; unpacked to /tmp/coin-minilm, the path the
#        study's model.backbone names on both machines, so the cells' keys match)
# OUT    where the logs, the environment and the finished cells (tarred, at most 15 MiB a file) go; the adapter
#        weights of the methods in ADAPTERS_OF only (default: all), where 64 MiB cannot hold them all
# GPU_CHECK_S (optional) then runs bench/gpu_check.py --no-cell for at most that many seconds, before packing
# JOBS   cells computed at once; METHODS, SEEDS: comma lists, cells started in this order (method-major); SWEEP_VALUES
#        (optional, comma list): the study sweeps study.sweep_key (pass it with --set), one cell per value, value-major
# DEADLINE_S  seconds from the start after which running cells are stopped (a stopped cell never looks done)
# Size: the device copies the tracked tree beside CARRY, 64 MiB in all. results/ and dvc-remote/ are not read
# there (data/ comes in CARRY): where they push it over, take them out of git's index for the call and put them
# back after it; the files stay on disk (RESULTS §30):
#   git rm -r -q --cached results dvc-remote && printf '/results/\n/dvc-remote/\n' >> .git/info/exclude
#   ... the device call ...;  git reset -q && sed -i '/^\/results\/$/d;/^\/dvc-remote\/$/d' .git/info/exclude
set -u
CARRY=$1 OUT=$2 JOBS=$3 DEADLINE=$4 METHODS=$5 SEEDS=$6
shift 6
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
mkdir -p "$OUT" logs

say "installing the carried wheels"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$CARRY"/wheels/*.whl \
  || { say "wheel install failed"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
  TOKENIZERS_PARALLELISM=false TQDM_MININTERVAL=20

say "unpacking data, pairs and MiniLM"
python3 - "$CARRY" <<'EOF' || { say "unpacking failed"; exit 3; }
import hashlib, json, lzma, shutil, sys, tarfile
from pathlib import Path
carry = Path(sys.argv[1])
for name in ("data.tar.xz", "validated.tar.xz"):
    with tarfile.open(carry / name) as t:
        t.extractall(".", filter="data")
dest = Path("/tmp/coin-minilm")
dest.mkdir(parents=True, exist_ok=True)
for f in (carry / "minilm").iterdir():
    if f.name != "model.safetensors.xz":
        shutil.copy2(f, dest / f.name)
with lzma.open(carry / "minilm" / "model.safetensors.xz") as src, open(dest / "model.safetensors", "wb") as out:
    shutil.copyfileobj(src, out, 1 << 22)
want = json.loads((carry / "minilm" / "sha256.json").read_text())
for name, digest in want.items():
    got = hashlib.sha256((Path(name) if "/" in name else dest / name).read_bytes()).hexdigest()
    assert got == digest, f"{name}: sha256 {got} != {digest}"
print("sha256 checked:", ", ".join(want))
EOF

say "environment"
{ nvidia-smi; python3 -c "
import sys, importlib.metadata as md, torch
print(sys.version)
for p in ('torch', 'transformers', 'peft', 'accelerate', 'pydantic', 'pandas', 'pyarrow', 'numpy', 'tokenizers',
          'huggingface_hub', 'safetensors', 'PyYAML', 'typing_extensions'):
    try: print(p, md.version(p))
    except Exception as e: print(p, 'missing', e)
print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')
import coin.study.cell  # the whole import chain of a cell
import pyarrow.parquet  # the evaluation's Parquet engine: pandas loads it only when a cell saves, after its work
print('coin.study.cell imports')
" || echo "ENVIRONMENT CHECK FAILED"; nproc --all; free -g; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if grep -q "ENVIRONMENT CHECK FAILED" "$OUT/env.txt"; then
  say "the environment check failed (env.txt): no cell started"; exit 3
fi

cells=()  # method:seed[:sweep value]; with SWEEP_VALUES, value-major in its order
for v in ${SWEEP_VALUES:-_}; do v=${v//,/ }; for w in $v; do
  for m in ${METHODS//,/ }; do for s in ${SEEDS//,/ }; do cells+=("$m:$s${SWEEP_VALUES:+:$w}"); done; done
done; done
say "${#cells[@]} cells, $JOBS at a time, deadline ${DEADLINE} s: ${cells[*]}"
export T0 DEADLINE
printf '%s\n' "${cells[@]}" | xargs -P "$JOBS" -I{} bash -c '
  IFS=: read -r m s v <<< "$1"; shift
  name=$m-s$s${v:+-$v}; sweep=(); [ -n "$v" ] && sweep=(--sweep-value "$v")
  left=$(( T0 + DEADLINE - $(date +%s) ))
  if [ "$left" -le 20 ]; then echo "$name: not started (deadline)"; exit 0; fi
  t=$(date +%s)
  timeout -k 5 "$left" python3 -m coin.study.cell --params params.yaml --method "$m" --seed "$s" "${sweep[@]}" "$@" \
    > "logs/$name.log" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - t )) s (started at $(( t - T0 )) s)"
' _ {} "$@" | tee "$OUT/cells.txt"
say "cells phase over"

if [ -n "${GPU_CHECK_S:-}" ]; then  # bench/gpu_check.py's training-step rows on the idle GPU, within GPU_CHECK_S seconds
  say "bench/gpu_check.py --no-cell, at most $GPU_CHECK_S s"
  timeout -k 5 "$GPU_CHECK_S" python3 bench/gpu_check.py --no-cell --out "$OUT/gpu.md" > logs/gpu_check.log 2>&1
  say "gpu_check exit $?"
fi

say "packing: cells (without adapter weights) and the logs, then the adapter weights, in 15 MiB parts"
# a cell stopped by the deadline leaves its work directory (.tmp-<cell>-<key>): it comes back without its
# checkpoints, so a cell whose training had finished (train.json) is only evaluated by the next `coin study` there
tar --exclude='.lock-*' --exclude='checkpoints' --exclude='adapter_model.safetensors' -cf - outputs/*/cells logs \
  | xz -T0 -6 > /tmp/cells.tar.xz
# ADAPTERS_OF (comma list, default every method): whose adapter weights come back, where 64 MiB cannot hold them all
for f in $(find outputs/*/cells -name checkpoints -prune -o -name adapter_model.safetensors -print); do
  m=$(basename "$(dirname "$(dirname "$f")")"); m=${m#.tmp-}; m=${m%-s*}
  case ",${ADAPTERS_OF:-$m}," in *",$m,"*) echo "$f" ;; esac
done | tar -cf - -T - | xz -T0 -1 > /tmp/adapters.tar.xz
split -b 15M /tmp/cells.tar.xz "$OUT/cells.tar.xz."
split -b 15M /tmp/adapters.tar.xz "$OUT/adapters.tar.xz."
ls -la "$OUT"
say "done"
