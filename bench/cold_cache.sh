#!/usr/bin/env bash
# Cold page cache: fp8stream's load against the storage's own read speed (dd), same files, same run.
#   OUT=/path/to/results [MODEL=llama-3.1-8b] [CKPT_ROOT=/tmp] bash bench/cold_cache.sh
# Writes the random checkpoint to disk (not tmpfs), then for each reader: flush the files from the page
# cache (posix_fadvise DONTNEED after sync, plus drop_caches when writable), read, time it.
#   dd x1      one dd per shard, one after another (bs=16M)
#   dd xN      one dd per shard, all shards at once
#   fp8stream  fp8stream.load(..., device=cuda) per-channel (wall clock, includes setup)
#   warm       fp8stream.load again with the files now in the page cache
set -euo pipefail
: "${OUT:?set OUT to the results directory}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
MODEL=${MODEL:-llama-3.1-8b}
CKPT="${CKPT_ROOT:-/tmp}/fp8stream-cold/$MODEL"
mkdir -p "$OUT"
log="$OUT/cold_cache_$MODEL.log"

[ -f "$CKPT/model.safetensors.index.json" ] || "$PY" bench/make_checkpoint.py "bench/configs/$MODEL" "$CKPT" --shard-gib 4 --jobs 8 >/dev/null
sync
bytes=$(du -cb "$CKPT"/*.safetensors | tail -1 | cut -f1)

flush() {
  sync
  "$PY" - "$CKPT" <<'EOF'
import os, sys, glob
for f in glob.glob(os.path.join(sys.argv[1], "*.safetensors")):
    fd = os.open(f, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
EOF
  if [ -w /proc/sys/vm/drop_caches ]; then echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; fi
}
cached() {  # fraction of the files' pages resident in the page cache (mincore)
  "$PY" - "$CKPT" <<'EOF'
import ctypes, glob, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
tot = res = 0
for f in glob.glob(os.path.join(sys.argv[1], "*.safetensors")):
    n, fd = os.path.getsize(f), os.open(f, os.O_RDONLY)
    addr = libc.mmap(None, n, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
    pages = (n + 4095) // 4096
    vec = (ctypes.c_ubyte * pages)()
    libc.mincore(addr, n, vec)
    res += bytes(vec).count(1)
    tot += pages
    libc.munmap(addr, n)
    os.close(fd)
print(f"{res / max(tot, 1):.3f}")
EOF
}
t() { local a b; a=$(date +%s.%N); "$@" >/dev/null 2>&1; b=$(date +%s.%N); awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", b - a }'; }

{
  echo "model $MODEL, $bytes bytes in $(ls "$CKPT"/*.safetensors | wc -l) shards at $CKPT ($(df -h "$CKPT" | tail -1 | awk '{print $1}'))"
  echo "drop_caches writable: $([ -w /proc/sys/vm/drop_caches ] && echo yes || echo no)"
  flush; echo "resident before dd x1: $(cached)"
  s=$(t bash -c "for f in $CKPT/*.safetensors; do dd if=\$f of=/dev/null bs=16M; done")
  echo "dd x1 (shards one after another): $s s, $(awk -v b="$bytes" -v s="$s" 'BEGIN { printf "%.2f", b / s / 1e9 }') GB/s"
  flush; echo "resident before dd xN: $(cached)"
  s=$(t bash -c "for f in $CKPT/*.safetensors; do dd if=\$f of=/dev/null bs=16M & done; wait")
  echo "dd xN (all shards at once): $s s, $(awk -v b="$bytes" -v s="$s" 'BEGIN { printf "%.2f", b / s / 1e9 }') GB/s"
  # the Python side imports everything (torch, transformers, the model's modeling code) BEFORE the
  # flush, so the cold timing is the checkpoint's bytes, not the interpreter's files
  "$PY" - "$CKPT" "$bytes" <<'EOF'
import glob, os, sys, time, torch
import fp8stream
from fp8stream.load_plan import build_meta_model
from fp8stream.loader import _load_config
path, nbytes = sys.argv[1], int(sys.argv[2])
build_meta_model(_load_config(__import__("pathlib").Path(path)), torch.bfloat16)
torch.empty(1, device="cuda"); torch.cuda.synchronize()

def flush():
    os.sync()
    for f in glob.glob(os.path.join(path, "*.safetensors")):
        fd = os.open(f, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
    try:
        open("/proc/sys/vm/drop_caches", "w").write("3")
    except OSError:
        pass

for label in ("cold", "warm"):
    if label == "cold":
        flush()
    t0 = time.perf_counter()
    m = fp8stream.load(path, device="cuda", progress=False)
    torch.cuda.synchronize()
    s = time.perf_counter() - t0
    r = m.fp8stream_report
    print(f"fp8stream {label}: {s:.2f} s wall ({r.load_seconds:.2f} s streaming), {nbytes / s / 1e9:.2f} GB/s of checkpoint wall, "
          f"{nbytes / r.load_seconds / 1e9:.2f} GB/s streaming, peak-final {(r.peak_bytes - r.final_bytes) / 2**20:.0f} MiB, "
          f"host peak {r.host_peak_bytes / 2**30:.2f} GiB")
    del m; torch.cuda.empty_cache()
EOF
} 2>&1 | tee "$log"
[ "${KEEP_CKPT:-0}" = 1 ] || rm -rf "$CKPT"
