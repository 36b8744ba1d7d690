#!/usr/bin/env bash
# Set-up: the project step of run.sh (requirements.lock + `-e .[dev]`) by pip against uv, side by side in one run.
# Each rep makes two fresh venvs with torch (run.sh's first step, untimed), then times the project install in each,
# alternating which installer goes first; both start from cold caches (pip --no-cache-dir, an empty UV_CACHE_DIR),
# as on a fresh machine. Prints a Markdown table and the pip/uv ratio per rep.
#   bench/bench_setup.sh [REPS]        (default 1; about 3.5 min per rep on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
REPS="${1:-1}"
PY="${COIN_PYTHON:-python3.11}"
UV_SPEC=$(sed -n 's/^UV_SPEC="\(.*\)"$/\1/p' run.sh)   # the version run.sh pins
export PIP_DISABLE_PIP_VERSION_CHECK=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

venv() {  # fresh venv with pip upgraded and torch (+ uv for the uv arm), untimed
  "$PY" -m venv "$1"
  "$1/bin/python" -m pip install -q --upgrade pip 2>/dev/null
  "$1/bin/python" -m pip install -q "${COIN_TORCH_SPEC:-torch==2.13.0}" "$UV_SPEC" 2>/dev/null
}

timed() {  # seconds of one project install: timed <installer> <venv>; a failed install stops the bench (its log on
  # stderr), since its time would be meaningless: the exit status is checked here because `set -e` does not reach
  # into the $(...) that calls this
  local t0 t1 rc=0 log="$work/$1-$(basename "$2").log"
  t0=$(date +%s.%N)
  if [[ $1 == pip ]]; then
    "$2/bin/python" -m pip install -q --no-cache-dir -c requirements.lock -e ".[dev]" >"$log" 2>&1 || rc=$?
  else
    UV_CACHE_DIR="$work/uv-cache-$RANDOM" "$2/bin/uv" pip install -q --compile-bytecode --python "$2/bin/python" \
      -c requirements.lock -e ".[dev]" >"$log" 2>&1 || rc=$?
  fi
  t1=$(date +%s.%N)
  if (( rc )); then
    { echo "bench_setup: the $1 install into $2 failed (exit $rc); its last lines:"; tail -20 "$log"; } >&2
    return "$rc"
  fi
  echo "$t1 - $t0" | bc
}

echo "| rep | order | pip (s) | uv (s) | pip / uv | same packages |"
echo "|---:|---|---:|---:|---:|---|"
for rep in $(seq 1 "$REPS"); do
  venv "$work/pip-$rep"; venv "$work/uv-$rep"
  if (( rep % 2 )); then order="pip, uv"; p=$(timed pip "$work/pip-$rep") || exit 1; u=$(timed uv "$work/uv-$rep") || exit 1
  else order="uv, pip"; u=$(timed uv "$work/uv-$rep") || exit 1; p=$(timed pip "$work/pip-$rep") || exit 1; fi
  same=yes  # else the differing lines go to stderr
  if ! diff <("$work/pip-$rep/bin/python" -m pip freeze 2>/dev/null | grep -v '^-e\|^#\|^uv==' | sort) \
            <("$work/uv-$rep/bin/python" -m pip freeze 2>/dev/null | grep -v '^-e\|^#\|^uv==' | sort) >&2; then
    same=no
  fi
  printf '| %d | %s | %.1f | %.1f | %.2fx | %s |\n' "$rep" "$order" "$p" "$u" "$(echo "$p / $u" | bc -l)" "$same"
done
