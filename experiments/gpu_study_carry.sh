#!/usr/bin/env bash
# Pack what experiments/gpu_study.sh needs on a GPU machine into CARRY (a folder the device copy carries):
#   bash experiments/gpu_study_carry.sh CARRY STUDY_OUT_DIR
# STUDY_OUT_DIR: the study's out_dir (relative to the project root), whose validated/ the local `coin study`
# wrote (its pairs and validation run first, before any cell). Needs the MiniLM package here (the bf16 copy) and
# pip access to PyPI for the wheels: the versions requirements.lock pins for what a cell imports beyond what the
# GPU image holds (pydantic and its parts), and for transformers and peft (the image's are older).
set -eu
CARRY=$1 STUDY=$2
PY=${PYTHON:-python}
rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/minilm"
pin() { grep -i "^$1==" requirements.lock; }
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$CARRY/wheels" \
  "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" "$(pin typing-inspection)" \
  "$(pin typing_extensions)" "$(pin transformers)" "$(pin peft)"
tar -cf - data | xz -T0 -9 > "$CARRY/data.tar.xz"
tar -cf - "$STUDY/validated/valid.jsonl" | xz -T0 -9 > "$CARRY/validated.tar.xz"
$PY bench/gpu_check.py --export-minilm /tmp/coin-minilm-export >/dev/null
for f in /tmp/coin-minilm-export/*; do
  case $f in *.safetensors) xz -T0 -9 -c "$f" > "$CARRY/minilm/$(basename "$f").xz" ;; *) cp "$f" "$CARRY/minilm/" ;; esac
done
$PY - "$CARRY" "$STUDY" <<'PYEOF'
import hashlib, json, sys
from pathlib import Path
carry, study = Path(sys.argv[1]), sys.argv[2]
digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path("/tmp/coin-minilm-export").iterdir()}
digests[f"{study}/validated/valid.jsonl"] = hashlib.sha256(Path(study, "validated", "valid.jsonl").read_bytes()).hexdigest()
(carry / "minilm" / "sha256.json").write_text(json.dumps(digests, indent=1))
PYEOF
du -sh "$CARRY"/* "$CARRY"  # the parts, then the total (du counts a file once: the total first hid the parts)
# what a device call copies: the tracked tree, untracked files git does not ignore, and CARRY; 64 MiB at most
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r stat -c %s -- 2>/dev/null \
  | awk '{s += $1} END {print s + 0}')
carried=$(du -sb "$CARRY" | cut -f1)
total=$(( tree + carried ))
echo "a device call copies $(( total / 1048576 )) MiB: the working tree $(( tree / 1048576 )) MiB + CARRY $(( carried / 1048576 )) MiB"
if (( total > 64 * 1048576 )); then
  echo "over the 64 MiB a device call takes: results/ and dvc-remote/ are not read there; take them out of git's" \
       "index for the call (experiments/gpu_study.sh's header shows how), or carry less" >&2
fi
