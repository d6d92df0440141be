#!/usr/bin/env bash
# One call on the lent GPU of the reproduction (issues 16-17): the steps named, in order, until SECONDS
# after the start, then what results/published/ gained (never a checkpoint) is packed into $OUT/results.tgz for
# `tar xzf FILES_AT/results.tgz` here. Every step resumes where an earlier call stopped, so a later call
# with the same steps goes on. Carry .whl (scripts/device_env.sh) and .carry/data (the corpus's xz).
# Runs on a lent GPU are the published rows, so every step writes to results/published/ (not the
# user's default, results/local/), and unpacking the archive here puts them where they belong.
#   bash scripts/device_call.sh 560 gputests compile sweep:architectures run:architectures
# steps: gputests | diag | compile (eager vs compiled curves) | sweep:ABLATION | run:ABLATION[:VARIANT,...]
#        | medium:VARIANT,...  (gpu-medium runs of the trend)
set -u
end=$(( $(date +%s) + $1 )); shift
. scripts/device_env.sh || exit 1
export MOEBENCH_SHARED_DATA=$PWD/.carry/data MOEBENCH_DATA=/tmp/moebench-data
stamp=$(mktemp); touch "$stamp"
PUB=results/published; mkdir -p $PUB
left() { echo $(( end - $(date +%s) )); }
for step in "$@"; do
  t=$(left)
  if [ "$t" -lt 45 ]; then echo "== $step: not started, $t s left"; continue; fi
  echo "== $step: $t s left, $(date +%T)"
  case $step in
    gputests)      # the failures by name even when the time limit cuts the run short
      timeout $(( t < 300 ? t : 300 )) python3 -m pytest -q -p no:cacheprovider -m gpu -rf --tb=line \
        --deselect tests/test_distributed.py 2>&1 | tee "$OUT/gputests.log" | grep -E "^FAILED|^E |passed|failed" | tail -20 ;;
    diag)          # does a compiled step learn, and which fast path breaks it (scripts/compile_diag.py)
      timeout $(( t < 240 ? t : 240 )) python3 scripts/compile_diag.py 2>&1 | grep -v -i warn | tail -12 ;;
    compile)
      python3 -m moebench data prepare --corpus small 2>&1 | tail -1
      for flag in --no-compile --compile; do
        timeout $(( $(left) / 2 )) python3 -m moebench train MoE-Mamba_25M --tokens 6M --batch 32 --ctx 1024 \
          --lr 1e-3 --ema-alpha 0.05 $flag --data "$MOEBENCH_DATA/small" --out $PUB/compile_check 2>&1 | tail -2
      done
      python3 scripts/compare_curves.py $PUB/compile_check ;;
    sweep:*)
      timeout $t python3 -m moebench sweep lr --ablation "${step#sweep:}" --preset gpu-small --out $PUB 2>&1 | tail -25 ;;
    run:*)
      a=${step#run:}; only=""; [ "$a" != "${a%%:*}" ] && only="--only ${a#*:}"
      timeout $t python3 -m moebench run "${a%%:*}" --preset gpu-small $only --resume --out $PUB 2>&1 | tail -25 ;;
    medium:*)
      timeout $t python3 -m moebench run architectures --preset gpu-medium --only "${step#medium:}" --resume --out $PUB 2>&1 | tail -25 ;;
    *) echo "unknown step $step" ;;
  esac
done
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
# one archive: $OUT keeps no folders as deep as results/published/sweeps/runs/RUN/curve.csv
find $PUB -type f -newer "$stamp" ! -name 'ckpt.pt*' ! -name '*.lock' > "$stamp.list"
tar czf "$OUT/results.tgz" -T "$stamp.list" && echo "results.tgz: $(wc -l < "$stamp.list") files (tar xzf FILES_AT/results.tgz here)"
