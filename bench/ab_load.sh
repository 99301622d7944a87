#!/usr/bin/env bash
# A/B of two loader trees in one lease: fresh processes, alternating, bench/trace_load.py on each.
#   bash bench/ab_load.sh CKPT A_SRC B_SRC [ROUNDS=5] [LOADS=1] [trace_load.py options...]
# A_SRC / B_SRC: directories holding an `fp8stream` package (e.g. src, and a copy of an older src).
# Prints "== a|b run N" then trace_load's JSON line(s) per process (setup_s, stream_s, loader_other_s, ...).
set -u
ckpt=$1 a=$2 b=$3 rounds=${4:-5} loads=${5:-1}
for r in $(seq "$rounds"); do
  for v in a b; do
    if [ $v = a ]; then p=$a; else p=$b; fi
    echo "== $v run $r ($p)"
    PYTHONPATH=$p python3 bench/trace_load.py "$ckpt" --loads "$loads" "${@:6}"
  done
done
