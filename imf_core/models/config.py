"""ModelConfig: one dataclass describes every network of the paper, from MF's DiT to iMF-XL/2."""

from __future__ import annotations

from dataclasses import dataclass

CONDITIONINGS = ("in_context", "adaln")
BLOCKS = ("plain", "advanced")
INITS = ("imf", "dit")
JVP_ATTENTION = ("auto", "math", "fused")


@dataclass
class ModelConfig:
    # Tab. 1c's path: adaln + plain (DiT) -> in_context + plain -> in_context + advanced.
    conditioning: str = "in_context"  # in_context | adaln
    blocks: str = "advanced"  # plain (LayerNorm, GELU, sin-cos) | advanced (RMSNorm, SwiGLU, RoPE)
    input_size: int = 32  # latent side (SD-VAE: 256 / 8)
    in_channels: int = 4  # latent channels (SD-VAE: 4; pixels: 1 or 3)
    patch_size: int = 2  # the "/2" of B/2: patches of P x P latent pixels per token
    depth: int = 12  # blocks from input to output (an aux head adds aux_head_depth more)
    width: int = 768  # hidden size D
    heads: int = 12  # attention heads (width / heads must be even: RoPE)
    mlp_ratio: float = 0.0  # 0 = the blocks' default: 4 (plain) or 8/3 (advanced)
    num_classes: int = 1000  # class ids 0..K-1; id K is the null class of CFG
    aux_head_depth: int = 0  # > 0: a v-head duplicating the last blocks (imf_aux objective)
    init: str = (
        "imf"  # imf (official iMF code) | dit (DiT / original MeanFlow code): layers.init_weights
    )
    cond_t: bool = False  # condition on t besides h = t - r (iMF: h only; MF: both)
    cond_omega: bool = True  # omega as an input (CFG-conditioning)
    cond_interval: bool = True  # (t_min, t_max) as inputs
    # In-context token counts per condition (paper: class 8, time 4, omega 4, interval 2 + 2).
    class_tokens: int = 8
    time_tokens: int = 4  # for h = t - r (and for t with cond_t)
    omega_tokens: int = 4  # for omega (CFG-conditioning)
    interval_tokens: int = 2  # for t_min, and as many for t_max
    # The omega embedder sees omega_input_scale * (1 - 1/omega) (1: the official code). Its
    # sinusoids (max period 10^4) barely move over omega in [1, 8] at scale 1; omega has no
    # JVP tangent, so a larger scale does not inflate du/dt as it would for t and h.
    omega_input_scale: float = 1.0
    # How the tangent pass computes attention and its tangent (not part of the function: runs
    # of either agree): math | fused (a Triton kernel, imf_core.models.fused_attention) |
    # auto (math for now: layers.jvp_attention).
    jvp_attention: str = "auto"

    def __post_init__(self) -> None:
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(
                f"model.conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}"
            )
        if self.blocks not in BLOCKS:
            raise ValueError(f"model.blocks must be one of {BLOCKS}, got {self.blocks!r}")
        if self.init not in INITS:
            raise ValueError(f"model.init must be one of {INITS}, got {self.init!r}")
        if self.jvp_attention not in JVP_ATTENTION:
            raise ValueError(
                f"model.jvp_attention must be one of {JVP_ATTENTION}, got {self.jvp_attention!r}"
            )
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(
                f"model.width {self.width} must split into {self.heads} heads of even size"
            )
        if self.input_size % self.patch_size:
            raise ValueError(f"model.input_size {self.input_size} is not a multiple of patch_size")
        if self.omega_input_scale <= 0:
            raise ValueError(f"model.omega_input_scale must be > 0, got {self.omega_input_scale}")
        if not 0 <= self.aux_head_depth <= self.depth:
            raise ValueError(f"model.aux_head_depth must be in [0, depth={self.depth}]")

    @property
    def ratio(self) -> float:
        return self.mlp_ratio or (8 / 3 if self.blocks == "advanced" else 4.0)

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2
