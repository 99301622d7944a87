"""Greedy text generation for the CLI, the demo and the evaluation (one place, no import circle between them)."""

from __future__ import annotations


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, compile: bool = False) -> str:
    """Greedy generation; the chat template is applied when the tokenizer has one.

    compile: transformers' static-cache recipe: generate(cache_implementation="static") compiles the
    decode step with torch.compile (mode reduce-overhead: CUDA graphs) on CUDA; the FP8 modules trace
    without graph breaks (their kernel choice is probed once, outside the graph)."""
    import torch

    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    device = next(model.parameters()).device
    ids = ids.to(device)
    kw = {}
    if compile:
        from .kernels import prepare

        prepare(device)
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                             **kw)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
