"""The iMF Transformer: conditions as in-context tokens, no adaLN (paper, Sec. 4.4, Tab. 1c).

Each condition (class, omega, t_min, t_max, h = t - r) is embedded by its own MLP and added to
a few learnable type tokens; those tokens are prepended to the patch tokens in the official
code's order (PREFIX_ORDER: RoPE spans the whole sequence, so the order is part of the
function). Dropping adaLN removes about a third of DiT's parameters. Residual branches have
zero-initialised per-channel scales and the output layer is zero-initialised, so a fresh model
predicts exactly zero.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from imf_core.models.config import ModelConfig
from imf_core.models.layers import (
    Attention,
    ConditionEmbedders,
    Mlp,
    PatchEmbed,
    Positions,
    TrunkAndHeads,
    VelocityNet,
    init_weights,
    linear_jvp,
    make_norm,
)

# The official prefix: [class x8, omega x4, t_min x2, t_max x2, h x4], then the patch tokens.
# t (cond_t, an option of ours for small inputs; the official model does not condition on t)
# comes last.
PREFIX_ORDER = ("y", "omega", "t_min", "t_max", "h", "t")


class InContextBlock(nn.Module):
    """Pre-norm attention + MLP, each residual branch scaled per channel (zero at init)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        advanced = cfg.blocks == "advanced"
        self.norm1 = make_norm(cfg.blocks, cfg.width)
        self.attn = Attention(
            cfg.width,
            cfg.heads,
            qk_norm=advanced,
            bias=not advanced,
            jvp_attention=cfg.jvp_attention,
        )
        self.norm2 = make_norm(cfg.blocks, cfg.width)
        self.mlp = Mlp(cfg.width, cfg.ratio, cfg.blocks)
        self.attn_scale = nn.Parameter(torch.zeros(cfg.width))
        self.mlp_scale = nn.Parameter(torch.zeros(cfg.width))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        x = x + self.attn_scale * self.attn(self.norm1(x), rope)  # (B, T, D)
        return x + self.mlp_scale * self.mlp(self.norm2(x))

    def jvp(
        self, x: Tensor, dx: Tensor, rope: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor]:
        a, da = self.attn.jvp(*self.norm1.jvp(x, dx), rope)
        x, dx = x + self.attn_scale * a, dx + self.attn_scale * da
        m, dm = self.mlp.jvp(*self.norm2.jvp(x, dx))
        return x + self.mlp_scale * m, dx + self.mlp_scale * dm


class FinalLayer(nn.Module):
    """Norm, then a zero-initialised projection to P*P*C values per patch token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = make_norm(cfg.blocks, cfg.width)
        self.linear = nn.Linear(cfg.width, cfg.patch_size**2 * cfg.in_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.norm(x))

    def jvp(self, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        return linear_jvp(self.linear, *self.norm.jvp(x, dx))


class InContextTransformer(VelocityNet):
    """u_theta(z, t, h, conditions) -> average velocity u; heads="v" gives the aux head's v,
    heads="uv" both (one shared trunk pass); u_and_tangent: u and du/dt (VelocityNet)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.x_embed = PatchEmbed(cfg.in_channels, cfg.patch_size, cfg.width)
        self.embedders = ConditionEmbedders(cfg)
        tokens = {
            "y": cfg.class_tokens,
            "omega": cfg.omega_tokens if cfg.cond_omega else 0,
            "t_min": cfg.interval_tokens if cfg.cond_interval else 0,
            "t_max": cfg.interval_tokens if cfg.cond_interval else 0,
            "h": cfg.time_tokens,
            "t": cfg.time_tokens if cfg.cond_t else 0,
        }
        counts = {k: tokens[k] for k in PREFIX_ORDER if tokens[k]}
        self.prefix = tuple(counts)  # the token order (a ParameterDict sorts its keys)
        self.type_tokens = nn.ParameterDict(
            {k: nn.Parameter(torch.empty(n, cfg.width)) for k, n in counts.items()}
        )
        self.num_prefix = sum(counts.values())
        grid = cfg.input_size // cfg.patch_size
        self.positions = Positions(
            cfg.blocks, cfg.width, cfg.heads, grid, self.num_prefix + grid**2
        )
        self.blocks = TrunkAndHeads(lambda: InContextBlock(cfg), cfg.depth, cfg.aux_head_depth)
        self.u_final = FinalLayer(cfg)
        self.v_final = FinalLayer(cfg) if cfg.aux_head_depth else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_weights(self, self.cfg.init)
        for tokens in self.type_tokens.values():
            nn.init.normal_(tokens, std=self.cfg.width**-0.5)
        # Zero-initialised output layers: a fresh model predicts u = v = 0.
        for final in (self.u_final, self.v_final):
            if final is not None:
                nn.init.zeros_(final.linear.weight)
                nn.init.zeros_(final.linear.bias)

    def forward(self, x: Tensor, t: Tensor, h: Tensor, cond, heads: str = "u"):
        patches, rope = self.positions(self.x_embed(x))  # (B, T_img, D)
        emb = self.embedders(t, h, cond)  # {name: (B, D)}
        prefix = [self.type_tokens[k] + emb[k][:, None] for k in self.prefix]  # (B, n_k, D) each
        seq = torch.cat([*prefix, patches], dim=1)  # (B, T, D)
        return self.outputs(*self.blocks(seq, heads, rope), self.num_prefix)

    def u_and_tangent(
        self, x: Tensor, dx: Tensor, t: Tensor, h: Tensor, cond
    ) -> tuple[Tensor, Tensor]:
        """u and du/dt along (dx, dr = 0, dt = 1): the tangent pass (VelocityNet)."""
        patches, d_patches, rope = self.positions.jvp(*self.x_embed.jvp(x, dx))  # (B, T_img, D)
        emb = self.embedders.jvp(t, h, cond)  # {name: ((B, D), (B, D) or None)}
        prefix, d_prefix = [], []
        for k in self.prefix:
            e, de = emb[k]
            tokens = self.type_tokens[k] + e[:, None]  # (B, n_k, D)
            prefix.append(tokens)
            d_prefix.append(
                torch.zeros_like(tokens) if de is None else de[:, None].expand_as(tokens)
            )
        seq = torch.cat([*prefix, patches], dim=1)  # (B, T, D)
        d_seq = torch.cat([*d_prefix, d_patches], dim=1)
        return self.u_output_jvp(*self.blocks.jvp(seq, d_seq, rope), self.num_prefix)
