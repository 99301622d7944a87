"""norms.py: which RMSNorm modules get the one-kernel forward, and (CUDA) that it computes the model's own norm."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_checkpoint

import fp8stream
from fp8stream import norms

CUDA = torch.cuda.is_available()


def _fused(model):
    return [m for m in model.modules() if getattr(vars(m).get("forward"), "__func__", None) is norms._forward]


def test_only_the_standard_rms_norm_is_taken():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    assert norms._is_standard(LlamaRMSNorm) and norms._is_standard(Qwen3RMSNorm)
    assert not norms._is_standard(GemmaRMSNorm)  # 1 + weight: another forward
    assert not norms._is_standard(torch.nn.LayerNorm)


def test_fused_forward_falls_back_off_cuda(tmp_path):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    path, _ = make_checkpoint("qwen3", tmp_path / "q")
    model = fp8stream.load(path, device="cpu", progress=False)
    assert not _fused(model)  # load fuses on CUDA only
    ids = torch.randint(3, 250, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
        n = norms.fuse_rms_norms(model)
        after = model(ids).logits
    # per layer: input, post-attention, q_norm, k_norm; and the final norm
    assert n == 2 * 4 + 1 and norms.fuse_rms_norms(model) == 0  # the second call finds them done
    assert torch.equal(before, after)  # CPU: the model's own forward
    m = LlamaRMSNorm(8)
    assert norms.fuse_rms_norms(m) == 1 and _fused(m) == [m]


@pytest.mark.skipif(not CUDA, reason="the Triton kernel needs a GPU (run on the device)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 4096), (3, 37, 4096), (2, 5, 8, 128), (7, 300)])
def test_cuda_kernel_is_the_models_norm(shape, dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    m = LlamaRMSNorm(shape[-1], eps=1e-5).to("cuda", dtype)
    with torch.no_grad():
        m.weight.mul_(2 * torch.rand_like(m.weight))
    x = (3 * torch.randn(shape, device="cuda")).to(dtype)
    with torch.no_grad():
        ref = m(x)
        got = norms.rms_norm(x, m.weight, 1e-5, norms._kernel_caps.triton_kernels())
    assert got.shape == ref.shape and got.dtype == ref.dtype
    # the sum of squares adds in another order: at most one rounding step apart, nearly always equal
    ulp = ref.float().abs().clamp_min(1e-3) * (2 ** -7 if dtype == torch.bfloat16 else 2 ** -10)
    assert ((got.float() - ref.float()).abs() <= 2 * ulp).all()
    assert (got == ref).float().mean() > 0.97


@pytest.mark.skipif(not CUDA, reason="the Triton kernel needs a GPU (run on the device)")
def test_cuda_load_fuses_norms_and_keeps_the_logits(tmp_path):
    path, _ = make_checkpoint("qwen3", tmp_path / "q")
    model = fp8stream.load(path, device="cuda", progress=False)
    fused = _fused(model)
    assert len(fused) == 2 * 4 + 1
    ids = torch.randint(3, 250, (2, 9), device="cuda")
    with torch.no_grad():
        got = model(ids).logits.float()
        for m in fused:
            del m.forward
        ref = model(ids).logits.float()
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()
