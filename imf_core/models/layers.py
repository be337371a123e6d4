"""Building blocks shared by the in-context iMF Transformer and the adaLN-zero DiT.

Every module used in a forward also has `jvp(x, dx, ...) -> (y, dy)`: its output and its
tangent, written out next to the forward. MeanFlow's du/dt is stop-gradient, so the tangent
pass (VelocityNet.u_and_tangent) runs under no_grad without autograd: a linear layer is two
GEMMs, on the primal (with bias) and on the tangent, where forward-mode AD of a closed-over
weight runs a third, by the weight's zero tangent.

Shape letters: B batch, T tokens, D width, H heads, K head dim, C channels, P patch size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imf_core.models.config import ModelConfig

#################################################################################
#                     Forward-mode rules of the elementary ops                  #
#################################################################################


def at_least_float32(x: Tensor) -> Tensor:
    """x in float32, or float64 if it is (norm statistics and softmax: bf16 is too coarse)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def linear_jvp(layer: nn.Linear, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
    """layer(x) and its tangent W dx: the weight is constant, so no GEMM by its zero tangent."""
    return layer(x), F.linear(dx, layer.weight)


def silu_jvp(x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
    s = torch.sigmoid(x)
    return x * s, dx * s * (1 + x * (1 - s))


def gelu_tanh_jvp(x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
    """GELU, tanh approximation: 0.5 x (1 + tanh(c (x + 0.044715 x^3))), c = sqrt(2 / pi)."""
    c = math.sqrt(2 / math.pi)
    th = torch.tanh(c * (x + 0.044715 * x.pow(3)))
    slope = 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * c * (1 + 3 * 0.044715 * x * x)
    return F.gelu(x, approximate="tanh"), slope * dx


#################################################################################
#                         Embedders for the conditions                          #
#################################################################################


class TimestepEmbedder(nn.Module):
    """A scalar condition (h = t - r, t, 1 - 1/omega, t_min, t_max) -> a D-vector (2-layer MLP)."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def angles(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """The sinusoids' arguments s * freqs (B, F/2) and the frequencies (F/2,)."""
        # The scalar enters unscaled (s in [0, 1], max period 10^4): a DDPM-style x1000 makes
        # du/dt, hence the JVP term, huge (PITFALLS.md).
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=s.device) / half)
        # At least float32 (bf16 cannot resolve small time steps); float64 stays float64.
        return at_least_float32(s)[:, None] * freqs[None], freqs

    def forward(self, s: Tensor) -> Tensor:
        args, _ = self.angles(s)  # (B, F/2)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # (B, D)

    def jvp(self, s: Tensor, ds: Tensor) -> tuple[Tensor, Tensor]:
        """The embedding and its tangent for the scalar's tangent ds (B,)."""
        args, freqs = self.angles(s)
        dargs = ds.to(args.dtype)[:, None] * freqs[None]  # (B, F/2)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        demb = torch.cat([-torch.sin(args) * dargs, torch.cos(args) * dargs], dim=-1)
        dtype = self.mlp[0].weight.dtype
        hidden = silu_jvp(*linear_jvp(self.mlp[0], emb.to(dtype), demb.to(dtype)))
        return linear_jvp(self.mlp[2], *hidden)  # (B, D) each


class LabelEmbedder(nn.Module):
    """Class id -> D-vector; id num_classes is the null class of classifier-free guidance."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, width)

    def forward(self, y: Tensor) -> Tensor:
        return self.table(y)  # (B, D)


class ConditionEmbedders(nn.Module):
    """One embedder per condition the model takes: class, h, and optionally t, omega, interval
    (ModelConfig.cond_*)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width = cfg.width
        self.omega_input_scale = cfg.omega_input_scale
        self.y = LabelEmbedder(cfg.num_classes, width)
        self.h = TimestepEmbedder(width)
        self.t = TimestepEmbedder(width) if cfg.cond_t else None
        self.omega = TimestepEmbedder(width) if cfg.cond_omega else None
        self.t_min = TimestepEmbedder(width) if cfg.cond_interval else None
        self.t_max = TimestepEmbedder(width) if cfg.cond_interval else None

    def inputs(self, t: Tensor, h: Tensor, cond) -> dict[str, tuple[nn.Module, Tensor]]:
        """{name: (embedder, its input)} of each condition present. `cond`: guidance.Conditions."""
        out = {"y": (self.y, cond.y), "h": (self.h, h)}
        if self.t is not None:
            out["t"] = (self.t, t)
        if self.omega is not None:
            # omega in [1, inf) -> [0, 1), times omega_input_scale (ModelConfig)
            out["omega"] = (self.omega, self.omega_input_scale * (1.0 - 1.0 / cond.omega))
        if self.t_min is not None:
            out["t_min"] = (self.t_min, cond.t_min)
            out["t_max"] = (self.t_max, cond.t_max)
        return out

    def forward(self, t: Tensor, h: Tensor, cond) -> dict[str, Tensor]:
        """Embeds each condition present: {name: (B, D)}."""
        return {name: embed(s) for name, (embed, s) in self.inputs(t, h, cond).items()}

    def jvp(self, t: Tensor, h: Tensor, cond) -> dict[str, tuple[Tensor, Tensor | None]]:
        """{name: (embedding, its tangent)} along MeanFlow's tangent (dz, dr = 0, dt = 1): t and
        h = t - r move at rate 1; the class, omega and the interval do not (tangent None)."""
        return {
            name: embed.jvp(s, torch.ones_like(s)) if name in ("h", "t") else (embed(s), None)
            for name, (embed, s) in self.inputs(t, h, cond).items()
        }


class PatchEmbed(nn.Module):
    """(B, C, S, S) image or latent -> (B, T, D) patch tokens.

    A P x P convolution of stride P (its weights, hence checkpoints, are DiT's), computed as
    patchify + matmul: the same numbers, and no convolution in the JVP pass, whose tangent
    inductor of torch 2.11 cannot lower ("LoweringException: ExpandView", aten.convolution).
    """

    def __init__(self, in_channels: int, patch_size: int, width: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)

    def patchify(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        p = self.patch_size
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(b, (h // p) * (w // p), c * p * p)  # (B, T, C*P*P)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.patchify(x), self.proj.weight.flatten(1), self.proj.bias)  # (B, T, D)

    def jvp(self, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        return self(x), F.linear(self.patchify(dx), self.proj.weight.flatten(1))  # no bias


def unpatchify(x: Tensor, patch_size: int, channels: int) -> Tensor:
    """(B, T, P*P*C) -> (B, C, S, S)."""
    b, n, _ = x.shape
    g = int(math.isqrt(n))
    x = x.reshape(b, g, g, patch_size, patch_size, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, g * patch_size, g * patch_size)


#################################################################################
#                      Transformer parts: plain or "advanced"                   #
#################################################################################
# Tab. 1c: "advanced blocks" = RMSNorm (also on q, k), SwiGLU, RoPE; "plain" = DiT's
# LayerNorm, GELU MLP and fixed 2-D sin-cos position embedding.


class RMSNorm(nn.Module):
    """x / rms(x) * weight, written out (cheaper than nn.RMSNorm under forward-mode AD)."""

    def __init__(self, width: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * self.weight if self.weight is not None else x

    def jvp(self, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        # d(x rs) = rs (dx - y mean(y dx)) with rs = rsqrt(mean(x^2) + eps), y = x rs
        x, dx = at_least_float32(x), at_least_float32(dx)
        rs = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        y = x * rs
        dy = rs * (dx - y * (y * dx).mean(-1, keepdim=True))
        return (y * self.weight, dy * self.weight) if self.weight is not None else (y, dy)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (DiT's eps 1e-6, affine or not) with its forward-mode rule."""

    def __init__(self, width: int, affine: bool = True):
        super().__init__(width, eps=1e-6, elementwise_affine=affine)

    def jvp(self, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        # y = (x - mean) rs: dy = rs (dxc - y mean(y dxc)), dxc = dx - mean(dx)
        x, dx = at_least_float32(x), at_least_float32(dx)
        xc, dxc = x - x.mean(-1, keepdim=True), dx - dx.mean(-1, keepdim=True)
        rs = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
        y = xc * rs
        dy = rs * (dxc - y * (y * dxc).mean(-1, keepdim=True))
        if self.weight is None:
            return y, dy
        return y * self.weight + self.bias, dy * self.weight


def make_norm(kind: str, width: int, affine: bool = True) -> RMSNorm | LayerNorm:
    return RMSNorm(width, affine=affine) if kind == "advanced" else LayerNorm(width, affine)


def math_attention_jvp(
    q: Tensor, k: Tensor, v: Tensor, dq: Tensor, dk: Tensor, dv: Tensor
) -> tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(K)) v and its tangent, all (B, H, T, K), softmax in (at least)
    float32. With S the scores and P = softmax(S): dS = (dq k^T + q dk^T) / sqrt(K),
    dP = P (dS - sum_j P dS), d_out = dP v + P dv."""
    scale = q.shape[-1] ** -0.5
    kt, dkt = k.transpose(-2, -1), dk.transpose(-2, -1)
    scores = at_least_float32((q * scale) @ kt)  # (B, H, T, T)
    d_scores = at_least_float32((dq * scale) @ kt + (q * scale) @ dkt)
    p = scores.softmax(dim=-1)
    dp = p * (d_scores - (p * d_scores).sum(dim=-1, keepdim=True))
    p, dp = p.to(v.dtype), dp.to(v.dtype)
    return p @ v, dp @ v + p @ dv  # (B, H, T, K) each


# (q, k, v, dq, dk, dv) -> (attention, its tangent): math_attention_jvp or the fused kernel.
AttentionJvp = Callable[..., tuple[Tensor, Tensor]]


def jvp_attention(choice: str) -> AttentionJvp:
    """The tangent pass's attention for model.jvp_attention: "math" (math_attention_jvp),
    "fused" (the Triton kernel of imf_core.models.fused_attention, imported when first asked
    for) or "auto". An explicit "fused" where it cannot run is an error naming why."""
    if choice in ("auto", "math"):  # auto: math until the fused kernel is measured on a GPU
        return math_attention_jvp
    try:
        from imf_core.models.fused_attention import FUSED_ATTENTION_AVAILABLE, fused_attention_jvp
    except ImportError as err:
        raise ValueError(
            f"model.jvp_attention=fused cannot be used here: importing its kernel failed ({err})"
        ) from err
    if not FUSED_ATTENTION_AVAILABLE:
        raise ValueError(
            "model.jvp_attention=fused cannot be used here: imf_core.models.fused_attention "
            "reports its kernel unavailable (FUSED_ATTENTION_AVAILABLE is False)"
        )
    return fused_attention_jvp


class Attention(nn.Module):
    """Multi-head self-attention, optionally with q/k RMSNorm and rotary positions.

    The forward uses F.scaled_dot_product_attention (the fused flash / memory-efficient kernels
    on CUDA, flash on CPU); the tangent pass (`jvp`) the attention model.jvp_attention names.
    """

    def __init__(self, width: int, heads: int, qk_norm: bool, bias: bool, jvp_attention: str):
        super().__init__()
        self.heads = heads
        self.jvp_attention = jvp_attention
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)
        head_dim = width // heads
        self.q_norm = RMSNorm(head_dim) if qk_norm else None
        self.k_norm = RMSNorm(head_dim) if qk_norm else None

    def split_heads(self, qkv: Tensor) -> Tensor:
        """(B, T, 3D) -> (3, B, H, T, K): q, k, v."""
        b, n, d3 = qkv.shape
        return qkv.reshape(b, n, 3, self.heads, d3 // (3 * self.heads)).permute(2, 0, 3, 1, 4)

    @staticmethod
    def merge_heads(x: Tensor) -> Tensor:
        """(B, H, T, K) -> (B, T, D)."""
        return x.transpose(1, 2).flatten(2)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        q, k, v = self.split_heads(self.qkv(x))  # (B, H, T, K) each
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, K)
        return self.proj(self.merge_heads(out))

    def jvp(
        self, x: Tensor, dx: Tensor, rope: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        qkv, dqkv = linear_jvp(self.qkv, x, dx)
        (q, k, v), (dq, dk, dv) = self.split_heads(qkv), self.split_heads(dqkv)
        if self.q_norm is not None:
            (q, dq), (k, dk) = self.q_norm.jvp(q, dq), self.k_norm.jvp(k, dk)
        if rope is not None:  # a rotation: linear, the same on the tangent
            q, k, dq, dk = (apply_rope(a, *rope) for a in (q, k, dq, dk))
        q, k, dq, dk = (a.to(v.dtype) for a in (q, k, dq, dk))  # norms give float32 (autocast)
        out, d_out = jvp_attention(self.jvp_attention)(q, k, v, dq, dk, dv)  # (B, H, T, K)
        return linear_jvp(self.proj, self.merge_heads(out), self.merge_heads(d_out))


class Mlp(nn.Module):
    """GELU MLP (plain, ratio 4) or SwiGLU (advanced, ratio 8/3, no bias)."""

    def __init__(self, width: int, ratio: float, kind: str):
        super().__init__()
        hidden = int(width * ratio)
        self.swiglu = kind == "advanced"
        if self.swiglu:
            self.w1 = nn.Linear(width, hidden, bias=False)
            self.w3 = nn.Linear(width, hidden, bias=False)
            self.w2 = nn.Linear(hidden, width, bias=False)
        else:
            self.fc1 = nn.Linear(width, hidden)
            self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        if self.swiglu:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))

    def jvp(self, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        if self.swiglu:
            a, da = silu_jvp(*linear_jvp(self.w1, x, dx))
            g, dg = linear_jvp(self.w3, x, dx)
            return linear_jvp(self.w2, a * g, da * g + a * dg)
        return linear_jvp(self.fc2, *gelu_tanh_jvp(*linear_jvp(self.fc1, x, dx)))


#################################################################################
#                              Positional encodings                             #
#################################################################################


def rope_tables(head_dim: int, seq_len: int, theta: float = 10_000.0) -> tuple[Tensor, Tensor]:
    """cos and sin tables, (T, K), for 1-D rotary positions over the whole sequence; channels
    2i and 2i + 1 share angle i (the official code's complex pairs)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)  # (T, K/2)
    angles = angles.repeat_interleave(2, dim=-1)  # (T, K)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates channel pairs (2i, 2i + 1) of x (B, H, T, K) by position-dependent angles.

    The official code multiplies (x_2i + i x_2i+1) by e^(i angle) in complex arithmetic; this is
    the same rotation in real arithmetic (two multiplies and a pair swap, cheap in the JVP), with
    the same channel pairing, so released weights map without any permutation.
    """
    pairs = x.unflatten(-1, (-1, 2))  # (B, H, T, K/2, 2)
    swapped = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (B, H, T, K)
    return x * cos.to(x.dtype) + swapped * sin.to(x.dtype)


def sincos_pos_embed_2d(width: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding (DiT / MAE), (grid*grid, D)."""
    quarter = width // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    def embed(pos: Tensor) -> Tensor:
        angles = torch.outer(pos.flatten(), omega)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(yy), embed(xx)], dim=1).float()


#################################################################################
#                    Shared trunk, u-head and auxiliary v-head                  #
#################################################################################


class TrunkAndHeads(nn.Module):
    """depth - a shared blocks, then the u-head (a blocks) and, if a > 0, an auxiliary v-head.

    iMF's auxiliary head (Sec. 4.2) duplicates the last a blocks; it predicts the marginal
    velocity used as the JVP tangent and is dropped at inference.
    """

    def __init__(self, make_block, depth: int, aux_depth: int):
        super().__init__()
        self.trunk = nn.ModuleList(make_block() for _ in range(depth - aux_depth))
        self.u_head = nn.ModuleList(make_block() for _ in range(aux_depth))
        self.v_head = nn.ModuleList(make_block() for _ in range(aux_depth)) if aux_depth else None

    def forward(self, x: Tensor, heads: str, *args) -> tuple[Tensor | None, Tensor | None]:
        """Runs the trunk, then the heads asked for ("u", "v" or "uv"); the other is None.
        `args` go to every block."""
        if "v" in heads and self.v_head is None:
            raise ValueError("this model has no auxiliary v-head (aux_head_depth = 0)")
        for block in self.trunk:
            x = block(x, *args)
        u = v = None
        if "u" in heads:
            u = x
            for block in self.u_head:
                u = block(u, *args)
        if "v" in heads:
            v = x
            for block in self.v_head:
                v = block(v, *args)
        return u, v

    def jvp(self, x: Tensor, dx: Tensor, *args) -> tuple[Tensor, Tensor]:
        """The trunk and the u-head, with tangents; `args` go to every block's jvp."""
        for block in (*self.trunk, *self.u_head):
            x, dx = block.jvp(x, dx, *args)
        return x, dx


# The official iMF initialisation (imeanflow's TorchLinear "scaled_variance"): block linears
# N(0, 0.32^2 / fan_in); condition-embedder MLPs N(0, 1 / fan_in); the label table N(0, 1 / D).
OFFICIAL_BLOCK_GAIN = 0.32


def init_weights(model: nn.Module, scheme: str) -> None:
    """Initialises linears, the patch embedding and the condition embedders.

    scheme "imf": the official iMF code (above); "dit": DiT's and original MeanFlow's code, xavier
    linears and N(0, 0.02) embedders. Both: xavier patch embedding, zero biases. Zero gates,
    zero output layers and the type tokens are set by each model's initialize_weights.
    """
    imf = scheme == "imf"

    def scaled(linear: nn.Linear, gain: float) -> None:
        nn.init.normal_(linear.weight, std=gain / math.sqrt(linear.in_features))

    for module in model.modules():
        if isinstance(module, nn.Linear):
            if imf:
                scaled(module, OFFICIAL_BLOCK_GAIN)
            else:
                nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for module in model.modules():
        if isinstance(module, PatchEmbed):
            w = module.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(module.proj.bias)
        elif isinstance(module, LabelEmbedder):
            std = module.table.weight.shape[1] ** -0.5 if imf else 0.02
            nn.init.normal_(module.table.weight, std=std)
        elif isinstance(module, TimestepEmbedder):
            for linear in (module.mlp[0], module.mlp[2]):
                if imf:
                    scaled(linear, 1.0)
                else:
                    nn.init.normal_(linear.weight, std=0.02)


#################################################################################
#                  What both networks share around their blocks                 #
#################################################################################


class Positions(nn.Module):
    """Advanced blocks: 1-D RoPE tables over all seq_len tokens (official code); plain blocks:
    a fixed 2-D sin-cos embedding added to the patch tokens."""

    def __init__(self, blocks: str, width: int, heads: int, grid: int, seq_len: int):
        super().__init__()
        self.rope = blocks == "advanced"
        if self.rope:
            cos, sin = rope_tables(width // heads, seq_len)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)
        else:
            self.register_buffer("embed", sincos_pos_embed_2d(width, grid), persistent=False)

    def forward(self, patches: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Returns the patch tokens (with absolute positions, if plain) and the RoPE tables."""
        if self.rope:
            return patches, (self.cos, self.sin)
        return patches + self.embed, None

    def jvp(
        self, patches: Tensor, d_patches: Tensor
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """As forward, with the tokens' tangent, which constant positions leave unchanged."""
        patches, rope = self(patches)
        return patches, d_patches, rope


class VelocityNet(nn.Module):
    """Base of both networks: a u output layer and, with an aux head, a v output layer.

    Each network has `forward(z, t, h, cond, heads="u")` and the tangent pass
    `u_and_tangent(z, dz, t, h, cond) -> (u, du/dt)` along MeanFlow's tangent (dz, dr = 0,
    dt = 1), the term of meanflow.compound_velocity.
    """

    cfg: ModelConfig
    u_final: nn.Module
    v_final: nn.Module | None
    blocks: TrunkAndHeads

    @property
    def has_aux_head(self) -> bool:
        return self.v_final is not None

    def aux_modules(self) -> list[nn.Module]:
        """Modules used only in training (the v-head), left out of inference counts."""
        return [self.blocks.v_head, self.v_final] if self.has_aux_head else []

    def outputs(self, u_seq: Tensor | None, v_seq: Tensor | None, skip: int = 0, *args):
        """Output layers on the image tokens (after `skip` prefix tokens) of each head run:
        u, v or (u, v), each (B, C, S, S)."""
        p, c = self.cfg.patch_size, self.cfg.in_channels
        out = [
            unpatchify(final(seq[:, skip:], *args), p, c)
            for seq, final in ((u_seq, self.u_final), (v_seq, self.v_final))
            if seq is not None
        ]
        return out[0] if len(out) == 1 else tuple(out)

    def u_output_jvp(self, seq: Tensor, d_seq: Tensor, skip: int = 0, *args):
        """`outputs` of the u-head with the tangent: (u, du), each (B, C, S, S)."""
        p, c = self.cfg.patch_size, self.cfg.in_channels
        out, d_out = self.u_final.jvp(seq[:, skip:], d_seq[:, skip:], *args)
        return unpatchify(out, p, c), unpatchify(d_out, p, c)
