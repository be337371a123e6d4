"""Building blocks shared by the in-context iMF Transformer and the adaLN-zero DiT.

Shape letters: B batch, T tokens, D width, H heads, K head dim, C channels, P patch size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imf_core.models.config import ModelConfig

#################################################################################
#                         Embedders for the conditions                          #
#################################################################################


class TimestepEmbedder(nn.Module):
    """A scalar condition (h = t - r, t, 1 - 1/omega, t_min, t_max) -> a D-vector (2-layer MLP)."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, s: Tensor) -> Tensor:
        # The scalar enters unscaled (s in [0, 1], max period 10^4): a DDPM-style x1000 makes
        # du/dt, hence the JVP term, huge (PITFALLS.md).
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=s.device) / half)
        # At least float32 (bf16 cannot resolve small time steps); float64 stays float64.
        args = s.to(torch.promote_types(s.dtype, torch.float32))[:, None] * freqs[None]  # (B, F/2)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class id -> D-vector; id num_classes is the null class of classifier-free guidance."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, width)

    def forward(self, y: Tensor) -> Tensor:
        return self.table(y)  # (B, D)


class ConditionEmbedders(nn.Module):
    """One embedder per condition the model takes: class, h, and optionally t, omega, interval."""

    def __init__(
        self, width: int, num_classes: int, cond_t: bool, cond_omega: bool, cond_interval: bool
    ):
        super().__init__()
        self.y = LabelEmbedder(num_classes, width)
        self.h = TimestepEmbedder(width)
        self.t = TimestepEmbedder(width) if cond_t else None
        self.omega = TimestepEmbedder(width) if cond_omega else None
        self.t_min = TimestepEmbedder(width) if cond_interval else None
        self.t_max = TimestepEmbedder(width) if cond_interval else None

    def forward(self, t: Tensor, h: Tensor, cond) -> dict[str, Tensor]:
        """Embeds each condition present: {name: (B, D)}. `cond` is a guidance.Conditions."""
        out = {"y": self.y(cond.y), "h": self.h(h)}
        if self.t is not None:
            out["t"] = self.t(t)
        if self.omega is not None:
            out["omega"] = self.omega(1.0 - 1.0 / cond.omega)  # omega in [1, inf) -> [0, 1)
        if self.t_min is not None:
            out["t_min"] = self.t_min(cond.t_min)
            out["t_max"] = self.t_max(cond.t_max)
        return out


class PatchEmbed(nn.Module):
    """(B, C, S, S) image or latent -> (B, T, D) patch tokens."""

    def __init__(self, in_channels: int, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D)


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
    """x / rms(x) * weight, written out: its forward-mode AD is a few cheap ops, where
    nn.RMSNorm's decomposed JVP cost a third of the JVP pass on CPU."""

    def __init__(self, width: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * self.weight if self.weight is not None else x


def make_norm(kind: str, width: int, affine: bool = True) -> nn.Module:
    if kind == "advanced":
        return RMSNorm(width, affine=affine)
    return nn.LayerNorm(width, eps=1e-6, elementwise_affine=affine)


class Attention(nn.Module):
    """Multi-head self-attention, optionally with q/k RMSNorm and rotary positions.

    Uses F.scaled_dot_product_attention, so plain forwards get the fused kernel; the JVP pass
    (meanflow.time_derivative) selects the math backend, which supports forward-mode AD.
    """

    def __init__(self, width: int, heads: int, qk_norm: bool, bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)
        head_dim = width // heads
        self.q_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)  # (B, H, T, K)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, K)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


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
        """Runs the trunk, then the heads asked for ("u", "v" or "uv"); the other is None."""
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


class VelocityNet(nn.Module):
    """Base of both networks: a u output layer and, with an aux head, a v output layer."""

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
