"""FP8 modules that replace transformers' fused MoE experts: FP8Experts (the standard layout: gate_up_proj [E, 2I, H],
down_proj [E, H, I], routed tokens), FP8DenseExperts (Llama 4: every token through every expert) and FP8GptOssExperts
(gpt-oss: biases, clamped SwiGLU). modules.replace_with_fp8 picks one per experts module; the parameter layout and
the FP8 matmul are _fp8_linear.py's, the grouped-GEMM fast paths kernels.py's.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from . import kernels
from ._fp8_linear import _empty_param, _scale_shape, fp8_linear
from .quantize import FP8_DTYPE


class FP8Experts(nn.Module):
    """Drop-in for transformers' fused experts (gate_up_proj [E, 2I, H], down_proj [E, H, I], act_fn).

    forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H], the same
    contract as the module it replaces: each routed token goes through its expert's gated MLP and
    the results are summed with the routing weights.
    """

    def __init__(self, experts: nn.Module, scheme: str, device="meta"):
        super().__init__()
        e, two_i, h = experts.gate_up_proj.shape
        self.num_experts, self.hidden_dim, self.intermediate_dim, self.scheme = e, h, two_i // 2, scheme
        self.expert_start = 0  # expert parallel: this module holds experts [expert_start, expert_start + num_experts)
        self.expert_parallel = False  # set by the parallel layout: top_k_index then holds global expert ids
        self.act_fn = experts.act_fn
        self.gate_up_proj = _empty_param((e, two_i, h), FP8_DTYPE, device)
        self.gate_up_proj_scale = _empty_param(_scale_shape(scheme, (e,), two_i, h), torch.float32, device)
        self.down_proj = _empty_param((e, h, two_i // 2), FP8_DTYPE, device)
        self.down_proj_scale = _empty_param(_scale_shape(scheme, (e,), h, two_i // 2), torch.float32, device)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.expert_parallel and (hidden_states.is_cuda or torch.compiler.is_compiling()):
            # The fast paths route by local expert id. A pair routed to another rank's expert goes to local
            # expert 0 with routing weight 0: it adds exactly nothing (the reference loop skips it instead).
            local = top_k_index - self.expert_start
            here = (local >= 0) & (local < self.num_experts)
            top_k_index = torch.where(here, local, torch.zeros_like(local))
            top_k_weights = torch.where(here, top_k_weights, torch.zeros_like(top_k_weights))
            args = (hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.gate_up_proj_scale, self.down_proj,
                    self.down_proj_scale, self.act_fn, self.scheme)
            out = kernels.experts_cuda(*args) if hidden_states.is_cuda else kernels.experts_fast(*args, kernels.Caps(torch_grouped=True))
            if out is not None:
                return out
            return _local_reference(self, hidden_states, top_k_index, top_k_weights)
        args = (hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.gate_up_proj_scale, self.down_proj,
                self.down_proj_scale, self.act_fn, self.scheme)
        if hidden_states.is_cuda:
            out = kernels.experts_cuda(*args)
            if out is not None:
                return out
        if torch.compiler.is_compiling():  # the reference loop syncs on expert counts: a static masked loop instead
            out = kernels.experts_fast(*args, kernels.Caps(torch_grouped=True))
            if out is not None:
                return out
        return self.reference_forward(hidden_states, top_k_index, top_k_weights)

    def gated(self, e: int, x: torch.Tensor, decode: bool) -> torch.Tensor:
        """act(gate) * up of local expert e on its tokens x [T, H]: the input of its down projection
        (calibrate.py computes the down projection's Hessian with this very function)."""
        gate, up = fp8_linear(x, self.gate_up_proj[e], self.gate_up_proj_scale[e], None, self.scheme, decode).chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def reference_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """One reference FP8 Linear pair per active expert (host loop over the expert counts)."""
        out = torch.zeros_like(hidden_states)
        flat_experts = top_k_index.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        first = self.expert_start  # tokens routed to experts another rank holds contribute nothing here
        counts = torch.bincount(flat_experts, minlength=first + self.num_experts).tolist()
        token_of = order // top_k_index.shape[-1]
        weight_of = top_k_weights.reshape(-1)[order]
        start = sum(counts[:first])
        # The decode rule by the layer's token count: every expert then gets <= MOE_GEMV_MAX_T <= GEMV_MAX_M
        # rows, which the Linear rule leaves unquantized (W8A16); above it, experts are W8A8 at any row count.
        decode = hidden_states.shape[0] <= kernels.MOE_GEMV_MAX_T
        for e, count in enumerate(counts[first : first + self.num_experts]):
            if count == 0:
                continue
            tokens = token_of[start : start + count]
            y = fp8_linear(self.gated(e, hidden_states[tokens], decode), self.down_proj[e], self.down_proj_scale[e], None,
                           self.scheme, decode)
            out.index_add_(0, tokens, (y * weight_of[start : start + count, None]).to(out.dtype))
            start += count
        return out


def _local_reference(module: FP8Experts, hidden_states, local_index, weights) -> torch.Tensor:
    start, module.expert_start = module.expert_start, 0  # ids are local already
    try:
        return module.reference_forward(hidden_states, local_index, weights)
    finally:
        module.expert_start = start


class FP8DenseExperts(FP8Experts):
    """Drop-in for experts stored transposed that run every token through every expert (Llama 4's
    Llama4TextExperts: gate_up_proj [E, H, 2I], down_proj [E, I, H], forward(hidden_states [E * T, H]) with the
    routing weights already applied to the inputs). Held in the standard FP8 layout ([E, 2I, H], [E, H, I]); the
    checkpoint's [in, out] slices are read transposed (load plan `transposed`)."""

    transposed_source = True

    def __init__(self, experts: nn.Module, scheme: str, device="meta"):
        nn.Module.__init__(self)
        e, h, two_i = experts.gate_up_proj.shape
        self.num_experts, self.hidden_dim, self.intermediate_dim, self.scheme = e, h, two_i // 2, scheme
        self.expert_start, self.expert_parallel = 0, False
        self.act_fn = experts.act_fn
        self.gate_up_proj = _empty_param((e, two_i, h), FP8_DTYPE, device)
        self.gate_up_proj_scale = _empty_param(_scale_shape(scheme, (e,), two_i, h), torch.float32, device)
        self.down_proj = _empty_param((e, h, two_i // 2), FP8_DTYPE, device)
        self.down_proj_scale = _empty_param(_scale_shape(scheme, (e,), h, two_i // 2), torch.float32, device)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.view(self.num_experts, -1, self.hidden_dim)
        out = []
        for e in range(self.num_experts):
            gate, up = fp8_linear(x[e], self.gate_up_proj[e], self.gate_up_proj_scale[e], None, self.scheme).chunk(2, dim=-1)
            out.append(fp8_linear(up * self.act_fn(gate), self.down_proj[e], self.down_proj_scale[e], None, self.scheme))
        return torch.stack(out).view(-1, self.hidden_dim)


class FP8GptOssExperts(FP8Experts):
    """Drop-in for gpt-oss's experts: stored transposed (gate_up_proj [E, H, 2I] with gate and up interleaved by column,
    down_proj [E, I, H]), with biases, and a clamped SwiGLU (`_apply_gate` of the module it replaces, with its alpha and
    limit); forward(hidden_states [T, H], router_indices [T, k], routing_weights [T, k]). FP8 in the standard layout;
    the biases stay in the model dtype."""

    transposed_source = True

    def __init__(self, experts: nn.Module, scheme: str, dtype: torch.dtype, device="meta"):
        nn.Module.__init__(self)
        e, h, two_i = experts.gate_up_proj.shape
        self.num_experts, self.hidden_dim, self.intermediate_dim, self.scheme = e, h, two_i // 2, scheme
        self.expert_start, self.expert_parallel = 0, False
        self.alpha, self.limit = experts.alpha, experts.limit
        self._apply_gate = types.MethodType(type(experts)._apply_gate, self)
        self.gate_up_proj = _empty_param((e, two_i, h), FP8_DTYPE, device)
        self.gate_up_proj_scale = _empty_param(_scale_shape(scheme, (e,), two_i, h), torch.float32, device)
        self.gate_up_proj_bias = _empty_param((e, two_i), dtype, device)
        self.down_proj = _empty_param((e, h, two_i // 2), FP8_DTYPE, device)
        self.down_proj_scale = _empty_param(_scale_shape(scheme, (e,), h, two_i // 2), torch.float32, device)
        self.down_proj_bias = _empty_param((e, h), dtype, device)

    def forward(self, hidden_states: torch.Tensor, router_indices: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        mask = torch.nn.functional.one_hot(router_indices, num_classes=self.num_experts).permute(2, 1, 0)  # [E, k, T]
        for e in (mask.sum(dim=(-1, -2)) > 0).nonzero().flatten().tolist():
            top_k_pos, token_idx = torch.where(mask[e])
            gate_up = fp8_linear(hidden_states[token_idx], self.gate_up_proj[e], self.gate_up_proj_scale[e], self.gate_up_proj_bias[e], self.scheme)
            y = fp8_linear(self._apply_gate(gate_up), self.down_proj[e], self.down_proj_scale[e], self.down_proj_bias[e], self.scheme)
            out.index_add_(0, token_idx, (y * routing_weights[token_idx, top_k_pos, None]).to(out.dtype))
        return out
