"""Attention and its forward-mode derivative in one fused Triton pass, for the JVP's tangent pass.

>>> out, d_out = fused_attention_jvp(q, k, v, dq, dk, dv)   # all (B, H, T, K), one dtype

With S = q k^T s (s = 1/sqrt(K)), P = softmax(S) and dS = (dq k^T + q dk^T) s, the tangent of
out = P v is d_out = (P * (dS - rowsum(P * dS))) v + P dv. The kernel streams over key blocks as
flash attention does (online softmax with a running row max m, every sum rescaled by exp(m_old -
m_new) when m grows) and accumulates

    l = sum p,   acc = sum p v,   acc_t = sum p (dS v + dv),   mu = sum p dS       (p = exp(S - m))

so that out = acc / l and d_out = acc_t / l - (mu / l) out. Loads are masked pointer loads: right
at any sequence length (B/2's 276 tokens, `tiny`'s 22) and any head dim up to 256 (padded to a
power of two), and runnable by Triton's CPU interpreter (TRITON_INTERPRET=1, set before this module
is imported), which refuses block pointers and TMA.

It is a `torch.library` custom op ("imf::attention_jvp") with a fake kernel, so
`torch.compile(fullgraph=True)` keeps it in the graph as one opaque op; an autograd.Function's
jvp rule would be dropped by Dynamo (pytorch#192985). It has no autograd rule: the tangent pass
runs under no_grad (the JVP term is stop-gradient).

Shape letters: B batch, H heads, T tokens, K head dim.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # torch without Triton (macOS, Windows): the op raises, math attention stays
    triton = None

# Triton's interpreter runs the kernel on CPU tensors; compiled Triton needs a CUDA device.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
FUSED_ATTENTION_AVAILABLE: bool = triton is not None and (INTERPRETED or torch.cuda.is_available())

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256  # one (BLOCK_M, K) tile of q, dq, acc and acc_t each stays in registers

# Tiles (BLOCK_M, BLOCK_N, num_warps) to autotune among, per padded head dim and whether the
# products are fp32 FMAs (fp32 in) rather than tensor-core MMAs: those that ptxas compiled for
# sm_90 without register spills, or with the fewest (Triton 3.8, 2026-12-06). Each tile holds q,
# dq, acc and acc_t (BLOCK_M x K) and S, dS, P (BLOCK_M x BLOCK_N): twice flash attention's state.
_TILES = {
    (16, False): ((64, 64, 4), (128, 64, 4), (128, 64, 8), (64, 32, 4)),
    (32, False): ((64, 64, 4), (128, 64, 8), (64, 32, 4)),
    (64, False): ((64, 64, 8), (128, 64, 8), (128, 32, 8), (64, 32, 4)),
    (128, False): ((64, 16, 8), (64, 32, 8), (32, 32, 4)),
    (256, False): ((32, 32, 8), (32, 16, 4)),
    (64, True): ((64, 16, 8), (32, 16, 4), (32, 32, 8)),
    (256, True): ((32, 16, 8), (32, 16, 4)),
}
INTERPRETER_TILE = (64, 64)  # registers do not matter there; fewer, larger blocks run faster


def _tiles(block_k: int, fp32: bool) -> tuple[tuple[int, int, int], ...]:
    """The candidate tiles for a padded head dim: those of the next listed size up."""
    return next(
        tiles for (k, wide), tiles in sorted(_TILES.items()) if wide == fp32 and k >= block_k
    )


if triton is not None:

    @triton.jit
    def _load_tile(ptr, stride_b, stride_h, stride_t, batch, head, index, index_ok, cols, col_ok):
        """Rows `index` of one (batch, head) slice; rows past T and columns past K read as 0."""
        ptrs = ptr + batch * stride_b + head * stride_h + index[:, None] * stride_t + cols[None, :]
        return tl.load(ptrs, mask=index_ok[:, None] & col_ok[None, :], other=0.0)

    @triton.jit
    def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a @ b in float32. UPCAST: bf16 operands go in as float32, for Triton's interpreter,
        whose tl.dot multiplies bf16 bit patterns (triton-lang/triton#11584, not supported)."""
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _attention_jvp_kernel(
        Q, K, V, DQ, DK, DV, OUT, DOUT,  # (B, H, T, head_dim), last dim contiguous
        sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
        sdq_b, sdq_h, sdq_t, sdk_b, sdk_h, sdk_t, sdv_b, sdv_h, sdv_t,
        so_b, so_h, so_t,  # OUT and DOUT share their (contiguous) layout
        seq_len, head_dim, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        """One program: BLOCK_M query rows of one (batch, head), streamed over all key blocks."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        head = tl.program_id(1).to(tl.int64)  # int64: batch * stride overflows int32 at scale
        batch = tl.program_id(2).to(tl.int64)
        cols = tl.arange(0, BLOCK_K)
        row_ok = rows < seq_len
        col_ok = cols < head_dim
        q = _load_tile(Q, sq_b, sq_h, sq_t, batch, head, rows, row_ok, cols, col_ok)  # (M, K)
        dq = _load_tile(DQ, sdq_b, sdq_h, sdq_t, batch, head, rows, row_ok, cols, col_ok)
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running row max of S
        l = tl.zeros((BLOCK_M,), tl.float32)
        mu = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        acc_t = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        for start in range(0, seq_len, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            key_ok = keys < seq_len
            k = _load_tile(K, sk_b, sk_h, sk_t, batch, head, keys, key_ok, cols, col_ok)  # (N, K)
            dk = _load_tile(DK, sdk_b, sdk_h, sdk_t, batch, head, keys, key_ok, cols, col_ok)
            v = _load_tile(V, sv_b, sv_h, sv_t, batch, head, keys, key_ok, cols, col_ok)
            dv = _load_tile(DV, sdv_b, sdv_h, sdv_t, batch, head, keys, key_ok, cols, col_ok)
            zero = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            s = _dot(q, tl.trans(k), zero, DOT_PRECISION, UPCAST) * scale  # (M, N)
            ds = _dot(dq, tl.trans(k), zero, DOT_PRECISION, UPCAST)
            ds = _dot(q, tl.trans(dk), ds, DOT_PRECISION, UPCAST) * scale
            s = tl.where(key_ok[None, :], s, float("-inf"))  # keys past T get p = 0
            m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every block has a key < T
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            p_ds = p * ds
            l = l * alpha + tl.sum(p, axis=1)
            mu = mu * alpha + tl.sum(p_ds, axis=1)
            acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION, UPCAST)
            acc_t = _dot(p_ds.to(v.dtype), v, acc_t * alpha[:, None], DOT_PRECISION, UPCAST)
            acc_t = _dot(p.to(dv.dtype), dv, acc_t, DOT_PRECISION, UPCAST)
            m = m_new
        out = acc / l[:, None]
        d_out = acc_t / l[:, None] - (mu / l)[:, None] * out
        offsets = batch * so_b + head * so_h + rows[:, None] * so_t + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        tl.store(OUT + offsets, out.to(OUT.dtype.element_ty), mask=mask)
        tl.store(DOUT + offsets, d_out.to(DOUT.dtype.element_ty), mask=mask)

    def _keep_spill_free_tiles(configs, named_args, **kwargs):
        allowed = _tiles(kwargs["BLOCK_K"], named_args["Q"].dtype == torch.float32)
        return [
            c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) in allowed
        ]

    # Timed once per (T, K, dtype) on the first call (a few hundred ms), among the tiles that fit.
    _attention_jvp_tuned = triton.autotune(
        configs=[
            triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=2)
            for m, n, w in sorted({tile for tiles in _TILES.values() for tile in tiles})
        ],
        key=["seq_len", "head_dim"],  # and the operands' dtypes
        prune_configs_by=dict(early_config_prune=_keep_spill_free_tiles),
    )(_attention_jvp_kernel)


def _check(q: Tensor, k: Tensor, v: Tensor, dq: Tensor, dk: Tensor, dv: Tensor) -> None:
    named = dict(q=q, k=k, v=v, dq=dq, dk=dk, dv=dv)
    for name, x in named.items():
        if x.dim() != 4:
            raise ValueError(f"attention_jvp: {name} must be (B, H, T, K), got {tuple(x.shape)}")
        if x.shape != q.shape or x.dtype != q.dtype or x.device != q.device:
            raise ValueError(
                "attention_jvp: q, k, v, dq, dk, dv must share shape, dtype and device; "
                + ", ".join(f"{n} {tuple(t.shape)} {t.dtype} {t.device}" for n, t in named.items())
            )
    if q.dtype not in DTYPES:
        raise ValueError(f"attention_jvp: dtype must be one of {DTYPES}, got {q.dtype}")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"attention_jvp: head dim must be 1..{MAX_HEAD_DIM}, got {q.shape[-1]}")
    if q.shape[2] == 0:
        raise ValueError("attention_jvp: the sequence is empty (T = 0)")


@torch.library.custom_op("imf::attention_jvp", mutates_args=())
def attention_jvp(
    q: Tensor, k: Tensor, v: Tensor, dq: Tensor, dk: Tensor, dv: Tensor
) -> tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(K)) v and its tangent along (dq, dk, dv), fused (module docstring)."""
    _check(q, k, v, dq, dk, dv)
    if triton is None:
        raise RuntimeError("attention_jvp needs Triton, which is not installed")
    if not (INTERPRETED or q.is_cuda):
        raise RuntimeError(
            f"attention_jvp runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1 set before "
            f"imf_core.models.fused_attention is imported); got {q.device}"
        )
    # Tiles index the last dim directly (q, k, v taken out of one qkv view already have it so).
    operands = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, dq, dk, dv))
    q, k, v, dq, dk, dv = operands
    batch, heads, seq_len, head_dim = q.shape
    out = q.new_empty(q.shape)  # contiguous, as the fake kernel says
    d_out = q.new_empty(q.shape)
    block_k = max(16, triton.next_power_of_2(head_dim))  # tl.dot wants every dim >= 16
    # The interpreter cannot time configs (it has no CUDA events): one fixed tile there.
    kernel, tile = (
        (_attention_jvp_kernel, dict(BLOCK_M=INTERPRETER_TILE[0], BLOCK_N=INTERPRETER_TILE[1]))
        if INTERPRETED
        else (_attention_jvp_tuned, {})
    )

    def grid(meta: dict) -> tuple[int, int, int]:
        return triton.cdiv(seq_len, meta["BLOCK_M"]), heads, batch

    # Triton launches on the current CUDA device: make it q's.
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        kernel[grid](
            q, k, v, dq, dk, dv, out, d_out,
            *(stride for x in (q, k, v, dq, dk, dv, out) for stride in x.stride()[:3]),
            seq_len, head_dim, head_dim**-0.5,
            BLOCK_K=block_k,
            # fp32 in, fp32 products (torch's default for fp32 matmuls), not TF32
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            UPCAST=INTERPRETED and q.dtype == torch.bfloat16,
            **tile,
        )  # fmt: skip
    return out, d_out


@attention_jvp.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, dq: Tensor, dk: Tensor, dv: Tensor) -> tuple[Tensor, Tensor]:
    _check(q, k, v, dq, dk, dv)
    return q.new_empty(q.shape), q.new_empty(q.shape)


def fused_attention_jvp(
    q: Tensor, k: Tensor, v: Tensor, dq: Tensor, dk: Tensor, dv: Tensor
) -> tuple[Tensor, Tensor]:
    """(out, d_out), each (B, H, T, K): attention and its forward-mode derivative (one kernel)."""
    return attention_jvp(q, k, v, dq, dk, dv)
