#!/usr/bin/env bash
# A/B(/C...) of loader trees in one lease: fresh processes, alternating, bench/trace_load.py on each.
#   bash bench/ab_load.sh CKPT A_SRC,B_SRC[,C_SRC...] [ROUNDS=5] [LOADS=1] [trace_load.py options...]
# Each *_SRC: a directory holding an `fp8stream` package (e.g. src, and a copy of an older src).
# Prints "== a|b|c... run N (tree)" then trace_load's JSON line(s) per process (setup_s, stream_s, loader_other_s, ...).
set -u
ckpt=$1 trees=$2 rounds=${3:-5} loads=${4:-1}
IFS=, read -r -a srcs <<< "$trees"
labels=(a b c d e f g h)
for r in $(seq "$rounds"); do
  for i in "${!srcs[@]}"; do
    echo "== ${labels[$i]} run $r (${srcs[$i]})"
    PYTHONPATH=${srcs[$i]} python3 bench/trace_load.py "$ckpt" --loads "$loads" "${@:5}"
  done
done
