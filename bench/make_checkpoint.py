"""Write a random-bf16 checkpoint with the exact tensor names and shapes of the real hub checkpoint.

    python bench/make_checkpoint.py CONFIG_DIR OUT_DIR [--shard-gib 4] [--jobs 4] [--dry-run]

Names and shapes come from transformers itself, the way save_pretrained writes them: the model is
built on the meta device, tied weights are dropped, and revert_weight_conversion turns fused
parameters (e.g. experts.gate_up_proj) back into the on-disk per-expert keys. No per-model table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def on_disk_tensors(config_dir: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    config = AutoConfig.from_pretrained(config_dir, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = model.state_dict()
    for key in model._keys_to_ignore_on_save or ():
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)
    state = revert_weight_conversion(model, state)  # sorted in save_pretrained's key order
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def nbytes(shape, dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def plan_shards(tensors: dict, shard_bytes: int) -> list[list[str]]:
    """Greedy, in key order, like transformers' split_torch_state_dict_into_shards."""
    shards, size = [[]], 0
    for key, (shape, dtype) in tensors.items():
        b = nbytes(shape, dtype)
        if shards[-1] and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += b
    return shards


def write_shard(path: Path, keys: list[str], tensors: dict, device: str, seed: int) -> None:
    from safetensors.torch import save_file

    gen = torch.Generator(device=device).manual_seed(seed)
    data = {}
    for key in keys:
        shape, dtype = tensors[key]
        if dtype.is_floating_point:
            t = torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(0.02)
        else:
            t = torch.zeros(shape, dtype=dtype, device=device)
        data[key] = t.cpu()
    save_file(data, str(path), metadata={"format": "pt"})


_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}


def write_sparse_shard(path: Path, keys: list[str], tensors: dict) -> None:
    """The real safetensors header and a sparse (all-zero, no disk blocks) data section: for timing the
    setup (headers, plan) of a huge checkpoint on a small disk. Not loadable as weights that mean anything."""
    header, at = {"__metadata__": {"format": "pt"}}, 0
    for key in keys:
        shape, dtype = tensors[key]
        n = nbytes(shape, dtype)
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + at)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config_dir", help="directory holding config.json")
    ap.add_argument("out_dir", nargs="?", help="checkpoint directory to write (not needed with --dry-run)")
    ap.add_argument("--shard-gib", type=float, default=4.0)
    ap.add_argument("--jobs", type=int, default=4, help="shards generated/written at once (host memory ~ jobs x shard)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where random values are generated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="print the tensor count and bytes, write nothing")
    ap.add_argument("--sparse", action="store_true", help="real headers, all-zero sparse data (setup timing only)")
    args = ap.parse_args(argv)
    if not args.dry_run and not args.out_dir:
        ap.error("out_dir is required unless --dry-run")

    t0 = time.perf_counter()
    tensors = on_disk_tensors(args.config_dir)
    total = sum(nbytes(s, d) for s, d in tensors.values())
    shards = plan_shards(tensors, int(args.shard_gib * 2**30))
    print(f"{args.config_dir}: {len(tensors)} tensors, {total} bytes ({total / 2**30:.2f} GiB), {len(shards)} shards")
    if args.dry_run:
        return 0

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # save_file releases the GIL: writes overlap
        jobs = [pool.submit(write_sparse_shard, out / n, keys, tensors) if args.sparse else
                pool.submit(write_shard, out / n, keys, tensors, args.device, args.seed + i)
                for i, (n, keys) in enumerate(zip(names, shards))]
        for job in jobs:
            job.result()
    shutil.copyfile(Path(args.config_dir) / "config.json", out / "config.json")
    weight_map = {key: name for name, keys in zip(names, shards) for key in keys}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")  # last: marks it complete
    seconds = time.perf_counter() - t0
    print(f"wrote {out}: {len(tensors)} tensors, {total / 2**30:.2f} GiB in {len(shards)} shards, "
          f"{seconds:.1f} s ({total / seconds / 1e9:.2f} GB/s, values generated on {args.device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
