"""GPTQ rounding of one weight matrix to fp8 codes with fixed scales, and its output error: pure torch math."""

from __future__ import annotations

import torch

from .quantize import FP8_DTYPE, round_fp8

DAMP = 0.1  # H += DAMP * mean(diag H) * I (GPTQ's percdamp; 0.1 beat 0.01 on SmolLM2-135M, ACCURACY.md)


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag) * I)^-1, damping raised until it is positive definite."""
    k = h.shape[0]
    mean_diag = h.diagonal().mean().item()
    eye = torch.eye(k, dtype=h.dtype)
    for _ in range(8):
        l, info = torch.linalg.cholesky_ex(h + eye * (damp * mean_diag))
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(l), upper=True)
        damp *= 10
    raise ValueError("calibration Hessian is not positive definite even with strong damping")


def gptq_fp8(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, *, damp: float = DAMP, block: int = 128,
             act_order: bool = True) -> torch.Tensor:
    """GPTQ rounding of w [N, K] to float8_e4m3fn codes with fixed scales.

    h: [K, K] second moment of the inputs (X^T X, any positive multiple); scale: float32 broadcastable to
    [N, K] ([N, 1] per channel, [1, 1] per tensor, [N, K] expanded blocks), w ~= codes * scale.
    Columns never seen by the calibration data (diag H = 0) are rounded plainly. With act_order the
    columns are processed in order of decreasing diag H (the largest inputs first); the codes are
    returned in the original column order. The result is plain rounding when H is diagonal.
    """
    if w.dim() != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"gptq_fp8: weight {tuple(w.shape)} and Hessian {tuple(h.shape)} do not match")
    n, k = w.shape
    W = w.float().clone()
    S = scale.float().expand(n, k)
    H = h.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H, S = W[:, perm], H[perm][:, perm], S[:, perm]
    # Real Hessians drive the updates into float32 denormals, which the CPU computes ~15x slower: flush them
    # (values below 1e-38 of a weight update; torch's default, off, is restored afterwards). The loop is
    # thousands of small vector ops: one intra-op thread runs it 5-8x faster than several on a busy CPU.
    flushed = torch.set_flush_denormal(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        codes = _gptq_columns(W, S, _inverse_hessian_factor(H, damp), block)
    finally:
        torch.set_num_threads(threads)
        if flushed:
            torch.set_flush_denormal(False)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes.to(FP8_DTYPE)


def _gptq_columns(W: torch.Tensor, S: torch.Tensor, U: torch.Tensor, block: int) -> torch.Tensor:
    n, k = W.shape
    codes = torch.empty(n, k, dtype=torch.float32)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.empty(n, i2 - i1)
        for i in range(i2 - i1):
            col, s = W1[:, i], S[:, i1 + i]
            c = round_fp8(col, s).float()
            codes[:, i1 + i] = c
            err = (col - c * s) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return codes


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T): the squared output error on the inputs whose second moment is H."""
    d = (w.float() - w_hat.float()).detach()
    return float(((d @ h.float()) * d).sum())
