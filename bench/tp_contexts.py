"""On which GPUs does each rank of a tensor-parallel load hold a CUDA context? (Each rank should hold one, on its
own GPU: a stray context on GPU 0 costs ~0.5 GiB there per rank.)

    torchrun --nproc-per-node 2 bench/tp_contexts.py CKPT_DIR [SRC_TREE]

SRC_TREE (default src) is put first on sys.path, to compare loader trees (e.g. a `git archive <rev> src` copy).
Prints one line per rank: its pid and the `nvidia-smi --query-compute-apps` rows of that pid after the load.
"""

import os
import subprocess
import sys

sys.path.insert(0, sys.argv[2] if len(sys.argv) > 2 else "src")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import fp8stream  # noqa: E402


def main() -> None:
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    fp8stream.load(sys.argv[1], tp=dist.get_world_size(), progress=False)
    torch.cuda.synchronize()
    dist.barrier()
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_bus_id,used_memory", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout
    mine = [line.strip() for line in out.splitlines() if line.split(",")[0].strip() == str(os.getpid())]
    print(f"tree {sys.path[0]} rank {rank} pid {os.getpid()}: contexts on {len(mine)} GPU(s): {mine}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
