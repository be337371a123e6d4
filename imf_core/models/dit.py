"""adaLN-zero DiT: original MeanFlow's network and the starting point of Tab. 1c.

The conditions' embeddings are summed into one vector c that regresses per-block shift, scale
and gate (adaLN-zero, Peebles & Xie 2023); gates and the output layer start at zero.
"""

from __future__ import annotations

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
    silu_jvp,
)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def modulate_jvp(x, dx, shift, d_shift, scale, d_scale) -> tuple[Tensor, Tensor]:
    d_out = dx * (1 + scale[:, None]) + x * d_scale[:, None] + d_shift[:, None]
    return modulate(x, shift, scale), d_out


def gated_jvp(x, dx, gate, d_gate, y, dy) -> tuple[Tensor, Tensor]:
    """x + gate y, adaLN-zero's gated residual (gate (B, D), y (B, T, D)), with its tangent."""
    gate, d_gate = gate[:, None], d_gate[:, None]
    return x + gate * y, dx + d_gate * y + gate * dy


def modulation_jvp(modulation: nn.Sequential, c: Tensor, dc: Tensor) -> tuple[Tensor, Tensor]:
    """adaLN's regression SiLU -> Linear of the condition c (B, D), with its tangent."""
    return linear_jvp(modulation[1], *silu_jvp(c, dc))


class DiTBlock(nn.Module):
    """Attention + MLP with adaptive LayerNorm modulation and zero-initialised gates."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        advanced = cfg.blocks == "advanced"
        self.norm1 = make_norm(cfg.blocks, cfg.width, affine=False)
        self.attn = Attention(
            cfg.width, cfg.heads, qk_norm=advanced, bias=True, jvp_attention=cfg.jvp_attention
        )
        self.norm2 = make_norm(cfg.blocks, cfg.width, affine=False)
        self.mlp = Mlp(cfg.width, cfg.ratio, cfg.blocks)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 6 * cfg.width))

    def forward(self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=1)  # (B, D)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))

    def jvp(self, x, dx, c, dc, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        mod, d_mod = modulation_jvp(self.modulation, c, dc)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=1)  # (B, D)
        d_shift1, d_scale1, d_gate1, d_shift2, d_scale2, d_gate2 = d_mod.chunk(6, dim=1)
        h = modulate_jvp(*self.norm1.jvp(x, dx), shift1, d_shift1, scale1, d_scale1)
        x, dx = gated_jvp(x, dx, gate1, d_gate1, *self.attn.jvp(*h, rope))
        h = modulate_jvp(*self.norm2.jvp(x, dx), shift2, d_shift2, scale2, d_scale2)
        return gated_jvp(x, dx, gate2, d_gate2, *self.mlp.jvp(*h))


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a zero-initialised projection to P*P*C values per token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = make_norm(cfg.blocks, cfg.width, affine=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))
        self.linear = nn.Linear(cfg.width, cfg.patch_size**2 * cfg.in_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))

    def jvp(self, x: Tensor, dx: Tensor, c: Tensor, dc: Tensor) -> tuple[Tensor, Tensor]:
        mod, d_mod = modulation_jvp(self.modulation, c, dc)
        (shift, scale), (d_shift, d_scale) = mod.chunk(2, dim=1), d_mod.chunk(2, dim=1)
        h = modulate_jvp(*self.norm.jvp(x, dx), shift, d_shift, scale, d_scale)
        return linear_jvp(self.linear, *h)


class DiT(VelocityNet):
    """u_theta(z, t, h, conditions) with adaLN-zero conditioning; heads as InContextTransformer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.x_embed = PatchEmbed(cfg.in_channels, cfg.patch_size, cfg.width)
        self.embedders = ConditionEmbedders(cfg)
        grid = cfg.input_size // cfg.patch_size
        self.positions = Positions(cfg.blocks, cfg.width, cfg.heads, grid, grid**2)
        self.blocks = TrunkAndHeads(lambda: DiTBlock(cfg), cfg.depth, cfg.aux_head_depth)
        self.u_final = FinalLayer(cfg)
        self.v_final = FinalLayer(cfg) if cfg.aux_head_depth else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_weights(self, self.cfg.init)
        # adaLN-zero: every block starts as the identity, and the output layers at zero.
        for module in self.modules():
            if isinstance(module, DiTBlock | FinalLayer):
                nn.init.zeros_(module.modulation[-1].weight)
                nn.init.zeros_(module.modulation[-1].bias)
            if isinstance(module, FinalLayer):
                nn.init.zeros_(module.linear.weight)
                nn.init.zeros_(module.linear.bias)

    def forward(self, x: Tensor, t: Tensor, h: Tensor, cond, heads: str = "u"):
        x, rope = self.positions(self.x_embed(x))  # (B, T, D)
        c = sum(self.embedders(t, h, cond).values())  # (B, D)
        return self.outputs(*self.blocks(x, heads, c, rope), 0, c)

    def u_and_tangent(
        self, x: Tensor, dx: Tensor, t: Tensor, h: Tensor, cond
    ) -> tuple[Tensor, Tensor]:
        """u and du/dt along (dx, dr = 0, dt = 1): the tangent pass (VelocityNet)."""
        x, dx, rope = self.positions.jvp(*self.x_embed.jvp(x, dx))  # (B, T, D) each
        emb = self.embedders.jvp(t, h, cond).values()
        c = sum(e for e, _ in emb)  # (B, D)
        dc = sum(de for _, de in emb if de is not None)  # h (and t) move
        return self.u_output_jvp(*self.blocks.jvp(x, dx, c, dc, rope), 0, c, dc)
