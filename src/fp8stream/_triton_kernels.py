"""Triton kernels behind fp8stream.kernels (imported lazily, only when a CUDA tensor needs them).

Only the long-standing Triton API is used (load/store/dot/max/where), so the kernels build with the
Triton that ships with torch 2.6+ and run under TRITON_INTERPRET=1 on CPU tensors for debugging.

quant_rows_kernel    one program per row: amax over the row (or a given amax), scale = max(amax/448,
                     tiny), q = fp8(clamp(x / scale)); optionally gathers its input row through an index
                     (MoE: tokens sorted by expert), computes act(gate) * up on the fly (the MoE
                     activation between the two grouped GEMMs) and multiplies the stored scale by a
                     per-row factor (routing weight), which only the GEMM's output scaling sees.
quant_groups_kernel  the same for 1x128 groups along K (fp8_per_block activations); scale strides are
                     free, so the column-major [M, K/128] layout blockwise cuBLAS wants is written directly.
fp8_gemm_kernel      C = (A * sa) @ (B * sb)^T (+ bias): dense or grouped (rows sorted by group, B [E, N, K]),
                     rowwise scales applied in the epilogue or 1x128 x 128x128 block scales applied per K block.
fp8_gemv1_kernel     W8A16 for one row (batch-1 decode) without tensor cores: small BN, more programs; with
                     EXPERTS, one program row per routed (token, expert) pair (MoE decode: the expert's
                     weight by id, act(gate) * up and the routing weight fused in).
fp8_gemv_kernel      small M (decode): C = X @ (B * sb)^T (+ bias) with X as it comes (W8A16: no activation
                     quantization) and B's FP8 bytes widened in registers; one kernel per Linear. At a
                     handful of rows the weight bytes are the time; a fused per-token quantization needs
                     the row amax before the first weight byte is used, which measured 1.3-2x slower
                     (bench/sweep_gemv.py). Split-K (SPLIT): K cut into S ranges, one program each, float32
                     partials summed by gemv_reduce_kernel; more programs where N alone gives too few.
gemv_reduce_kernel   the split-K epilogue: sum of the partials in split order, rowwise scale, bias, cast.
rms_norm_kernel      one program per row: transformers' standard RMSNorm (float32 mean of squares, rsqrt, the
                     normalized row rounded to the input dtype, then times the weight) in one pass (norms.py).
"""

import triton
import triton.language as tl

# Globals read inside @triton.jit functions must be constexpr (newer Triton rejects plain globals).
_TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny
_FP8_MAX = tl.constexpr(448.0)


@triton.jit
def _load_act(x_row, offs, mask, I_OFF, ACT: tl.constexpr):
    if ACT:  # silu(gate) * up, rounded like the eager model code (each op rounds to the activation dtype)
        g = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_row + I_OFF + offs, mask=mask, other=0.0).to(tl.float32)
        h = (g / (1.0 + tl.exp(-g))).to(x_row.dtype.element_ty).to(tl.float32)
        return (h * u).to(x_row.dtype.element_ty).to(tl.float32)
    else:
        return tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def quant_rows_kernel(x_ptr, idx_ptr, amax_ptr, rw_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, amax_stride, I_OFF,
                      HAS_IDX: tl.constexpr, GIVEN_AMAX: tl.constexpr, ACT: tl.constexpr, HAS_RW: tl.constexpr,
                      BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0)
    if HAS_IDX:
        src = tl.load(idx_ptr + row).to(tl.int64)
    else:
        src = row.to(tl.int64)
    x_row = x_ptr + src * stride_xm
    q_row = q_ptr + row.to(tl.int64) * stride_qm
    cols = tl.arange(0, BLOCK_K)
    if ONE_PASS:  # the whole row in registers (BLOCK_K >= K): read once, amax, quantize, store
        mask = cols < K
        v = _load_act(x_row, cols, mask, I_OFF, ACT)
        if GIVEN_AMAX:
            amax = tl.load(amax_ptr + row.to(tl.int64) * amax_stride).to(tl.float32)
        else:
            amax = tl.max(tl.abs(v), axis=0)
        scale = tl.maximum(amax / _FP8_MAX, _TINY)
        q = tl.minimum(tl.maximum(v / scale, -_FP8_MAX), _FP8_MAX)
        tl.store(q_row + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        if GIVEN_AMAX:
            amax = tl.load(amax_ptr + row.to(tl.int64) * amax_stride).to(tl.float32)
        else:
            acc = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs = k0 + cols
                v = _load_act(x_row, offs, offs < K, I_OFF, ACT)
                acc = tl.maximum(acc, tl.abs(v))
            amax = tl.max(acc, axis=0)
        scale = tl.maximum(amax / _FP8_MAX, _TINY)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + cols
            mask = offs < K
            v = _load_act(x_row, offs, mask, I_OFF, ACT)
            q = tl.minimum(tl.maximum(v / scale, -_FP8_MAX), _FP8_MAX)
            tl.store(q_row + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    if HAS_RW:
        scale = scale * tl.load(rw_ptr + row).to(tl.float32)
    tl.store(s_ptr + row, scale)


@triton.jit
def quant_groups_kernel(x_ptr, idx_ptr, q_ptr, s_ptr, K, G, stride_xm, stride_qm, s_stride_m, s_stride_g, I_OFF,
                        HAS_IDX: tl.constexpr, ACT: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr):
    row = tl.program_id(0)
    gb = tl.program_id(1)
    if HAS_IDX:
        src = tl.load(idx_ptr + row).to(tl.int64)
    else:
        src = row.to(tl.int64)
    x_row = x_ptr + src * stride_xm
    g = gb * BLOCK_G + tl.arange(0, BLOCK_G)
    c = tl.arange(0, GROUP)
    offs = g[:, None] * GROUP + c[None, :]
    mask = (g[:, None] < G) & (offs < K)
    v = _load_act(x_row, offs, mask, I_OFF, ACT)
    amax = tl.max(tl.abs(v), axis=1)
    scale = tl.maximum(amax / _FP8_MAX, _TINY)
    q = tl.minimum(tl.maximum(v / scale[:, None], -_FP8_MAX), _FP8_MAX)
    tl.store(q_ptr + row.to(tl.int64) * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row.to(tl.int64) * s_stride_m + g * s_stride_g, scale, mask=g < G)


@triton.jit
def _row_tile(pid_m, starts_ptr, ends_ptr, M, E, GROUPED: tl.constexpr, BM: tl.constexpr, E_P2: tl.constexpr):
    # (group e, first row m0, end of the rows the tile may store, whether program pid_m has a tile). Grouped: tiles of
    # each group are numbered consecutively, group e's ending at the inclusive cumsum of ceil(rows / BM) up to e,
    # computed here from the group bounds (E_P2 values in registers) rather than by torch ops before the launch (four
    # launches of host time per GEMM). The grid has an upper bound of tiles; programs past the last one have none
    # (their e is clamped so the loads stay in bounds).
    if GROUPED:
        es = tl.arange(0, E_P2)
        in_e = es < E
        g_start = tl.load(starts_ptr + es, mask=in_e, other=0)
        g_end = tl.load(ends_ptr + es, mask=in_e, other=0)
        tiles = (g_end - g_start + BM - 1) // BM
        t_end = tl.where(in_e, tl.cumsum(tiles, axis=0), 2147483647)
        e = tl.sum((t_end <= pid_m).to(tl.int32), axis=0)
        has_tile = e < E
        e = tl.minimum(e, E - 1)
        here = es == e
        row_start = tl.sum(tl.where(here, g_start, 0), axis=0)
        row_end = tl.sum(tl.where(here, g_end, 0), axis=0)
        first_tile = tl.sum(tl.where(here, t_end - tiles, 0), axis=0)
        m0 = row_start + (pid_m - first_tile) * BM
    else:
        e = pid_m * 0
        has_tile = pid_m >= 0
        row_end = M
        m0 = pid_m * BM
    return e, m0, row_end, has_tile


@triton.jit
def _store_tile(acc, rm, rn, row_end, N, e, as_ptr, stride_as_m, bs_ptr, stride_bs_e, stride_bs_n, bias_ptr, c_ptr,
                stride_cm, out_rows_ptr, ROW_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, SCATTER: tl.constexpr):
    # The GEMMs' epilogue: rowwise scales (ROW_SCALES; block scales were applied per K step), bias, masked store of
    # rows [.., row_end) and columns [.., N) of the tile; with SCATTER, row r goes to output row out_rows[r] (an MoE's
    # down GEMM writes its rows back in (token, slot) order: no separate index_copy pass over the output).
    mask_m = rm < row_end
    mask_n = rn < N
    rm64 = rm.to(tl.int64)
    if ROW_SCALES:
        sa = tl.load(as_ptr + rm64 * stride_as_m, mask=mask_m, other=0.0)
        sb = tl.load(bs_ptr + e * stride_bs_e + rn * stride_bs_n, mask=mask_n, other=0.0)
        acc = acc * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if SCATTER:
        rm64 = tl.load(out_rows_ptr + rm64, mask=mask_m, other=0).to(tl.int64)
    tl.store(c_ptr + rm64[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, bias_ptr, starts_ptr, ends_ptr, out_rows_ptr,
                    M, N, K, E,
                    stride_am, stride_as_m, stride_as_k,
                    stride_be, stride_bn, stride_bk,
                    stride_bs_e, stride_bs_n, stride_bs_k,
                    stride_cm,
                    GROUPED: tl.constexpr, BLOCKWISE: tl.constexpr, HAS_BIAS: tl.constexpr, SCATTER: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, E_P2: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, m0, row_end, has_tile = _row_tile(pid_m, starts_ptr, ends_ptr, M, E, GROUPED, BM, E_P2)
    if not has_tile:
        return
    rm = m0 + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mask_m = rm < row_end
    mask_n = rn < N
    rm64 = rm.to(tl.int64)
    a_ptrs = a_ptr + rm64[:, None] * stride_am + rk[None, :]
    b_base = b_ptr + e.to(tl.int64) * stride_be
    b_ptrs = b_base + rn[None, :].to(tl.int64) * stride_bn + rk[:, None] * stride_bk
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kmask = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_n[None, :] & kmask[:, None], other=0.0)
        if BLOCKWISE:
            kb = k0 // 128
            sa = tl.load(as_ptr + rm64 * stride_as_m + kb * stride_as_k, mask=mask_m, other=0.0)
            sb = tl.load(bs_ptr + e * stride_bs_e + ((pid_n * BN) // 128) * stride_bs_n + kb * stride_bs_k)
            acc += tl.dot(a, b) * (sa[:, None] * sb)
        else:
            acc += tl.dot(a, b)
        a_ptrs += BK
        b_ptrs += BK * stride_bk
    _store_tile(acc, rm, rn, row_end, N, e, as_ptr, stride_as_m, bs_ptr, stride_bs_e, stride_bs_n, bias_ptr, c_ptr,
                stride_cm, out_rows_ptr, not BLOCKWISE, HAS_BIAS, SCATTER)



@triton.jit
def fp8_gemv_kernel(x_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K, K_PER_SPLIT,
                    stride_xm, stride_wn, stride_ws_n, stride_ws_k, stride_om,
                    BLOCKWISE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # x as it comes (bf16 / fp16; fp32 in full precision), the FP8 weight widened in registers.
    # SPLIT (split-K): program (n, s) covers K columns [s * K_PER_SPLIT, (s + 1) * K_PER_SPLIT) and stores its float32
    # partial product, unscaled for rowwise scales, at out_ptr + s * M * N (out [S, M, N]); gemv_reduce_kernel sums them.
    # Why: at N = 1024-4096 one program per 32 columns leaves most SMs idle while K streams through a few of them.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mask_m = rm < M
    mask_n = rn < N
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + (k_start + rk)[None, :]
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + (k_start + rk)[:, None]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(k_start, k_end, BK):
        kmask = (k0 + rk) < k_end
        x = tl.load(x_ptrs, mask=mask_m[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_n[None, :] & kmask[:, None], other=0.0).to(x_ptr.dtype.element_ty)
        if BLOCKWISE:  # BK == 128 and BN divides 128: one weight scale per K step
            sb = tl.load(ws_ptr + ((pid_n * BN) // 128) * stride_ws_n + (k0 // 128) * stride_ws_k)
            acc += tl.dot(x, w, input_precision="ieee") * sb
        else:
            acc += tl.dot(x, w, input_precision="ieee")
        x_ptrs += BK
        w_ptrs += BK
    if SPLIT:
        part_ptrs = out_ptr + pid_k.to(tl.int64) * M * N + rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(part_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])
    else:
        if not BLOCKWISE:
            acc = acc * tl.load(ws_ptr + rn * stride_ws_n, mask=mask_n, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def gemv_reduce_kernel(part_ptr, ws_ptr, bias_ptr, out_ptr, M, N, S, stride_ws_n, stride_om,
                       SCALE_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # out[m, n] = sum_s part[s, m, n] (* rowwise weight scale[n]) (+ bias[n]): fp8_gemv_kernel's split-K epilogue,
    # summed in split order (deterministic, unlike atomics).
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    rn = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask = rn < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(part_ptr + (s * M + m) * N + rn, mask=mask, other=0.0)
    if SCALE_ROWS:
        acc = acc * tl.load(ws_ptr + rn * stride_ws_n, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + rn, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fp8_gemv1_kernel(x_ptr, eid_ptr, rw_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, N, K, ROWS_PER_X, I_OFF,
                     stride_xm, stride_we, stride_wn, stride_ws_e, stride_ws_n, stride_ws_k, stride_om,
                     EXPERTS: tl.constexpr, ACT: tl.constexpr, HAS_RW: tl.constexpr,
                     BLOCKWISE: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # One row per program row (batch-1 decode): products accumulated elementwise in float32 and summed once
    # at the end; no tensor-core tile, so BN can be as small as 4 and small-N weights still spread over
    # every SM. EXPERTS (MoE decode): program row p is one (token, expert) pair: input row p // ROWS_PER_X
    # (optionally act(gate) * up of it), weight w[eid[p]], output row p times rw[p] (the routing weight).
    pid_n = tl.program_id(0)
    p = tl.program_id(1).to(tl.int64)
    if EXPERTS:
        e = tl.load(eid_ptr + p).to(tl.int64)
    else:
        e = p * 0
    x_row = x_ptr + (p // ROWS_PER_X) * stride_xm
    ws_base = ws_ptr + e * stride_ws_e
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mask_n = rn < N
    w_ptrs = w_ptr + e * stride_we + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs = k0 + rk
        kmask = offs < K
        x = _load_act(x_row, offs, kmask, I_OFF, ACT)
        if BLOCKWISE:  # BN divides 128; the K blocks of this tile's columns
            x = x * tl.load(ws_base + ((pid_n * BN) // 128) * stride_ws_n + (offs // 128) * stride_ws_k, mask=kmask, other=0.0)
        w = tl.load(w_ptrs, mask=mask_n[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        acc += w * x[None, :]
        w_ptrs += BK
    y = tl.sum(acc, axis=1)
    if not BLOCKWISE:
        y = y * tl.load(ws_base + rn * stride_ws_n, mask=mask_n, other=0.0)
    if HAS_RW:
        y = y * tl.load(rw_ptr + p).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + p * stride_om + rn, y.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def fp8_gemm_tma_kernel(a_desc, as_ptr, b_desc, bs_ptr, c_ptr, bias_ptr, starts_ptr, ends_ptr, out_rows_ptr,
                        M, N, K, E, stride_as_m, stride_bs_e, stride_bs_n, stride_cm,
                        GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, SCATTER: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, E_P2: tl.constexpr):
    # fp8_gemm_kernel (rowwise scales) with A and B tiles loaded by the Tensor Memory Accelerator (Hopper): A through
    # a descriptor over [M, K], B over [E * N, K]. A tile may run past its group's rows or an expert's N rows into
    # the next ones (in bounds of the whole tensor, zeros past it): those rows / columns are computed and not stored.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, m0, row_end, has_tile = _row_tile(pid_m, starts_ptr, ends_ptr, M, E, GROUPED, BM, E_P2)
    if not has_tile:
        return
    n0 = pid_n * BN
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = a_desc.load([m0, k0])
        b = b_desc.load([e * N + n0, k0])
        acc = tl.dot(a, b.T, acc)
    _store_tile(acc, m0 + tl.arange(0, BM), n0 + tl.arange(0, BN), row_end, N, e, as_ptr, stride_as_m, bs_ptr,
                stride_bs_e, stride_bs_n, bias_ptr, c_ptr, stride_cm, out_rows_ptr, True, HAS_BIAS, SCATTER)


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, out_ptr, N, stride_x, stride_o, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    dt = out_ptr.dtype.element_ty
    h = (x * r).to(dt).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * h).to(dt), mask=mask)
