"""Building blocks shared by the in-context iMF Transformer and the adaLN-zero DiT.

Shape letters: B batch, T tokens, D width, H heads, K head dim, C channels, P patch size.
"""

from __future__ import annotations

import importlib.util
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

    def forward(self, t: Tensor, h: Tensor, cond) -> dict[str, Tensor]:
        """Embeds each condition present: {name: (B, D)}. `cond` is a guidance.Conditions."""
        out = {"y": self.y(cond.y), "h": self.h(h)}
        if self.t is not None:
            out["t"] = self.t(t)
        if self.omega is not None:
            # omega in [1, inf) -> [0, 1), times omega_input_scale (ModelConfig)
            out["omega"] = self.omega(self.omega_input_scale * (1.0 - 1.0 / cond.omega))
        if self.t_min is not None:
            out["t_min"] = self.t_min(cond.t_min)
            out["t_max"] = self.t_max(cond.t_max)
        return out


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

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        p = self.patch_size
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(b, (h // p) * (w // p), c * p * p)  # (B, T, C*P*P)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)  # (B, T, D)


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


# Whether the optional `jvp-flash-attention` kernel is installed (extra `gpu`).
HAS_FLASH_JVP = importlib.util.find_spec("jvp_flash_attention") is not None


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(K)) v written out in plain ops, each with a forward-mode AD rule (the
    fused SDPA kernels have none); torch.compile fuses them. Softmax in float32."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, T, T)
    return scores.float().softmax(dim=-1).to(v.dtype) @ v  # (B, H, T, K)


def flash_jvp_applies(head_dim: int, seq_len: int) -> bool:
    """Shapes on which the `jvp-flash-attention` Triton kernel (0.14) is right: head dim 16-256
    (a power of two) and a sequence of whole 128-token blocks. Measured on an H200 (2026-12-04,
    benchmarks/gpu_check.py): at 256 tokens its values and tangents match float64 math (bf16
    3.4e-3, fp32 1.5e-3 relative); at 276 (B/2's 256 patches + 20 condition tokens) they are off
    by 27 %. The in-context presets (276 tokens) and `tiny` (22) do not qualify; adaLN-zero
    DiTs at 256x256 (256 tokens) do."""
    return head_dim in (16, 32, 64, 128, 256) and seq_len % 128 == 0


def flash_jvp_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The `jvp-flash-attention` kernel (optional extra `gpu`; Triton, CUDA only): attention and
    its tangent in one fused pass, through its autograd.Function's explicit jvp rule. Eager only:
    torch.compile cannot trace its launcher ("triton.set_allocator not supported", torch 2.11)."""
    try:
        from jvp_flash_attention.jvp_attention import JVPAttn
    except ImportError as err:
        raise ImportError(
            "model.jvp_attention=flash_jvp needs the `jvp-flash-attention` package "
            "(pip install 'imf-pipeline[gpu]')"
        ) from err
    return JVPAttn.fwd_dual(q, k, v)


def jvp_attention_impl(choice: str, head_dim: int, seq_len: int, device: torch.device) -> str:
    """Resolves model.jvp_attention for one call: "auto" is flash_jvp where its kernel is
    installed, applies and runs eagerly (CUDA, not inside torch.compile), else math. An explicit
    flash_jvp where it cannot run is an error naming why."""
    compiling = torch.compiler.is_compiling()
    usable = HAS_FLASH_JVP and device.type == "cuda" and flash_jvp_applies(head_dim, seq_len)
    if choice == "auto":
        return "flash_jvp" if usable and not compiling else "math"
    if choice == "flash_jvp" and (not usable or compiling):
        why = (
            "the jvp-flash-attention package is not installed"
            if not HAS_FLASH_JVP
            else "it runs on CUDA only"
            if device.type != "cuda"
            else f"its kernel is wrong unless the sequence is whole 128-token blocks "
            f"(this model: {seq_len} tokens, head dim {head_dim})"
            if not flash_jvp_applies(head_dim, seq_len)
            else "torch.compile cannot trace its launcher: use train.compile=none"
        )
        raise ValueError(f"model.jvp_attention=flash_jvp cannot be used here: {why}")
    return choice


class Attention(nn.Module):
    """Multi-head self-attention, optionally with q/k RMSNorm and rotary positions.

    A plain forward uses F.scaled_dot_product_attention (the fused flash / memory-efficient
    kernels on CUDA, flash on CPU). A forward that is differentiated forward-mode (jvp=True, the
    JVP pass of meanflow.time_derivative) uses `jvp_attention`: "math" (written out) or
    "flash_jvp" (a fused Triton kernel with an explicit JVP rule); "auto" picks per device.
    """

    def __init__(self, width: int, heads: int, qk_norm: bool, bias: bool, jvp_attention: str):
        super().__init__()
        self.heads = heads
        self.jvp_attention = jvp_attention
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)
        head_dim = width // heads
        self.q_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, jvp: bool = False
    ) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)  # (B, H, T, K)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if not jvp:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, K)
        else:
            q, k = q.to(v.dtype), k.to(v.dtype)  # the norms return float32 under autocast
            impl = jvp_attention_impl(self.jvp_attention, d // self.heads, n, x.device)
            attend = flash_jvp_attention if impl == "flash_jvp" else math_attention
            out = attend(q, k, v)
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

    def forward(
        self, x: Tensor, heads: str, *args, jvp: bool = False
    ) -> tuple[Tensor | None, Tensor | None]:
        """Runs the trunk, then the heads asked for ("u", "v" or "uv"); the other is None.
        `args` go to every block; jvp=True selects the attention for forward-mode AD."""
        if "v" in heads and self.v_head is None:
            raise ValueError("this model has no auxiliary v-head (aux_head_depth = 0)")
        for block in self.trunk:
            x = block(x, *args, jvp=jvp)
        u = v = None
        if "u" in heads:
            u = x
            for block in self.u_head:
                u = block(u, *args, jvp=jvp)
        if "v" in heads:
            v = x
            for block in self.v_head:
                v = block(v, *args, jvp=jvp)
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
