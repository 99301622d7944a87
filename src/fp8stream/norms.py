"""RMSNorm in one kernel on CUDA, for the norm modules whose forward is transformers' standard RMSNorm.

Why: transformers' RMSNorm runs as six to seven kernels in eager mode and inside fp8stream's captured decode step
(to float32, pow, mean, add + rsqrt, mul, to the input dtype, times the weight). At decode every one of them is
a launch of a few microseconds on a 4096-wide row; an 8B Llama has 65 norms per step, about 400 launches.
At prefill each is a pass over the activations in float32. One Triton program per row does the same arithmetic
(float32 sum of squares, rsqrt, rounding to the input dtype before the weight, as the model code rounds).

Only modules whose forward is exactly the standard one (the text below; Llama, Mistral, Qwen2/3, Mixtral and
the other models transformers generates from them) are changed, and only their `forward` (the module, its
parameters and its name stay). Anything else (Gemma's 1 + weight, a weight in another dtype than the input, the
CPU, torch.compile tracing) runs the model's own forward.
"""

from __future__ import annotations

import inspect
import os
import textwrap
import types

import torch
from torch import nn

from . import _kernel_caps

_STANDARD_BODY = (
    "input_dtype = hidden_states.dtype",
    "hidden_states = hidden_states.to(torch.float32)",
    "variance = hidden_states.pow(2).mean(-1, keepdim=True)",
    "hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)",
    "return self.weight * hidden_states.to(input_dtype)",
)
_checked: dict[type, bool] = {}
# FP8STREAM_FUSED_NORMS=0: leave every norm to the model's code (an A/B switch for the benchmarks).
ENABLED = os.environ.get("FP8STREAM_FUSED_NORMS", "1") != "0"


def _is_standard(cls: type) -> bool:
    if cls not in _checked:
        try:
            src = textwrap.dedent(inspect.getsource(cls.forward)).splitlines()
        except (OSError, TypeError):
            src = []
        body = tuple(line.strip() for line in src[1:] if line.strip() and not line.strip().startswith(("#", '"""')))
        _checked[cls] = body == _STANDARD_BODY
    return _checked[cls]


def fuse_rms_norms(model: nn.Module) -> int:
    """Give every standard RMSNorm module of `model` the one-kernel forward; returns how many."""
    n = 0
    if not ENABLED:
        return 0
    for m in model.modules():
        if "forward" not in vars(m) and isinstance(getattr(m, "weight", None), torch.Tensor) and \
                hasattr(m, "variance_epsilon") and _is_standard(type(m)):
            m.forward = types.MethodType(_forward, m)
            n += 1
    return n


def _forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if (hidden_states.is_cuda and hidden_states.dtype == w.dtype and w.dim() == 1 and hidden_states.shape[-1] == w.numel()
            and not torch.compiler.is_compiling()):
        tk = _kernel_caps.triton_kernels()
        if tk is not None:
            return rms_norm(hidden_states, w, float(self.variance_epsilon), tk)
    return type(self).forward(self, hidden_states)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, tk) -> torch.Tensor:
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    block = max(16, 1 << (n - 1).bit_length())
    tk.rms_norm_kernel[(x2.shape[0],)](x2, weight, out, n, x2.stride(0), out.stride(0), eps, BLOCK=block,
                                       num_warps=min(16, max(1, block // 512)))
    return out.reshape(x.shape)
