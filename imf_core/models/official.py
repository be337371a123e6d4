"""The official iMF release as our models: its checkpoints in, our weights out, its eval points.

    >>> state = torch.load("iMF-B-2.pth", map_location="cpu", weights_only=True)
    >>> model = load_official(state)                 # an InContextTransformer, same function
    >>> u = model(z, t, t - r, Conditions(y, omega, t_min, t_max))

The PyTorch release (Lyy-iiis/imeanflow, branch `torch`) ships state dicts of its `iMeanFlow`
wrapper: "net." + imfDiT names (`net.shared_blocks.0.attn.q_proj._flax_linear.weight`, ...).
Its imfDiT is our in-context Transformer with advanced blocks, conditioned on h = t - r only:
the same prefix order, RoPE pairing, norms and gates, so the mapping is a renaming plus one
concatenation (separate q, k, v projections -> our fused qkv). A test reproduces the official
model's u, v and samples from `tests/fixtures/official_tiny.pt` within 1e-5 (float32).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from imf_core.models.config import ModelConfig
from imf_core.models.in_context import InContextTransformer

PREFIX = "net."


@dataclass(frozen=True)
class OperatingPoint:
    """A CFG setting the release evaluates at, with the FIDs it reports there (FID-50K)."""

    nfe: int
    omega: float
    t_min: float
    t_max: float
    fid_jax: float  # JAX release (its own reference statistics, uint8 via clip(127.5x + 128))
    fid_torch: float  # PyTorch release (JiT's reference statistics, uint8 by rounding)


# The release's evaluation settings per size (imeanflow README and configs/eval_config.yml).
RELEASED_POINTS: dict[str, tuple[OperatingPoint, ...]] = {
    "imf_b2": (OperatingPoint(1, 8.0, 0.4, 0.65, 3.37, 3.32),),
    "imf_m2": (OperatingPoint(1, 10.5, 0.4, 0.6, 2.27, 2.26),),
    "imf_l2": (OperatingPoint(1, 10.5, 0.4, 0.6, 1.85, 1.83),),
    "imf_xl2": (
        OperatingPoint(1, 8.0, 0.42, 0.62, 1.70, 1.72),
        OperatingPoint(2, 4.0, 0.36, 0.64, 1.53, 1.54),
    ),
}

_TOKENS = {"class_tokens": "y", "omega_tokens": "omega", "t_min_tokens": "t_min"}
_TOKENS |= {"t_max_tokens": "t_max", "time_tokens": "h"}
_EMBEDDERS = {"h_embedder": "h", "omega_embedder": "omega"}
_EMBEDDERS |= {"cfg_t_start_embedder": "t_min", "cfg_t_end_embedder": "t_max"}
_BLOCK_SAME = ("attn_scale", "mlp_scale", "norm1.weight", "norm2.weight")
_BLOCK_SAME += ("attn.q_norm.weight", "attn.k_norm.weight")
_BLOCK_RENAMED = {"attn.out_proj._flax_linear.weight": "attn.proj.weight"}
_BLOCK_RENAMED |= {f"mlp.w{i}._flax_linear.weight": f"mlp.w{i}.weight" for i in (1, 2, 3)}
_QKV = tuple(f"attn.{n}_proj._flax_linear.weight" for n in "qkv")


def _block_count(state: dict[str, Tensor], group: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(rf"{group}\.(\d+)\.", k))}
    if found != set(range(len(found))):
        raise ValueError(f"official checkpoint: {group} blocks {sorted(found)} are not 0..n-1")
    return len(found)


def official_config(state: dict[str, Tensor], input_size: int = 32, **overrides) -> ModelConfig:
    """The ModelConfig of a release state dict (without the "net." prefix), read off its shapes.

    Everything but the latent side is in the tensors; RoPE has no table to infer it from.
    """
    try:
        width = state["class_tokens"].shape[1]
        head_dim = state["shared_blocks.0.attn.q_norm.weight"].shape[0]
        patch = state["x_embedder.proj.weight"]
        hidden = state["shared_blocks.0.mlp.w1._flax_linear.weight"].shape[0]
        found = dict(
            num_classes=state["y_embedder.embedding_table._flax_embedding.weight"].shape[0] - 1,
            class_tokens=state["class_tokens"].shape[0],
            time_tokens=state["time_tokens"].shape[0],
            omega_tokens=state["omega_tokens"].shape[0],
            interval_tokens=state["t_min_tokens"].shape[0],
        )
    except KeyError as err:
        raise ValueError(f"official checkpoint: missing key {PREFIX}{err.args[0]}") from err
    shared, u_heads = _block_count(state, "shared_blocks"), _block_count(state, "u_heads")
    v_heads = _block_count(state, "v_heads")
    if v_heads not in (0, u_heads):
        raise ValueError(f"official checkpoint: {v_heads} v-head blocks but {u_heads} u-head ones")
    mlp_ratio = 0.0 if hidden == int(width * 8 / 3) else hidden / width
    cfg = dict(
        conditioning="in_context",
        blocks="advanced",
        input_size=input_size,
        in_channels=patch.shape[1],
        patch_size=patch.shape[2],
        depth=shared + u_heads,
        width=width,
        heads=width // head_dim,
        mlp_ratio=mlp_ratio,
        # Without its v-head (the released inference files) the model is u-only: shared blocks
        # and u-head blocks in sequence are one trunk of the same depth.
        aux_head_depth=v_heads,
        **found,
    )
    return ModelConfig(**cfg | overrides)


def _name_map(cfg: ModelConfig, shared: int) -> dict[str, str]:
    """Official key (no prefix) -> our key, for every tensor but the fused qkv."""
    names = {f"{k}": f"type_tokens.{v}" for k, v in _TOKENS.items()}
    names |= {f"x_embedder.proj.{p}": f"x_embed.proj.{p}" for p in ("weight", "bias")}
    names["y_embedder.embedding_table._flax_embedding.weight"] = "embedders.y.table.weight"
    for theirs, ours in _EMBEDDERS.items():
        for i in (0, 2):
            for p in ("weight", "bias"):
                names[f"{theirs}.mlp.{i}._flax_linear.{p}"] = f"embedders.{ours}.mlp.{i}.{p}"
    for theirs, ours in _blocks(cfg, shared).items():
        names |= {f"{theirs}.{p}": f"{ours}.{p}" for p in _BLOCK_SAME}
        names |= {f"{theirs}.{a}": f"{ours}.{b}" for a, b in _BLOCK_RENAMED.items()}
    heads = ("u",) + (("v",) if cfg.aux_head_depth else ())
    for h in heads:
        names[f"{h}_final_layer.norm.weight"] = f"{h}_final.norm.weight"
        for p in ("weight", "bias"):
            names[f"{h}_final_layer.linear._flax_linear.{p}"] = f"{h}_final.linear.{p}"
    return names


def _blocks(cfg: ModelConfig, shared: int) -> dict[str, str]:
    """Official block prefix -> ours. u-only: shared + u-head blocks are our one trunk."""
    aux = cfg.aux_head_depth
    heads = cfg.depth - shared
    if aux:
        out = {f"shared_blocks.{i}": f"blocks.trunk.{i}" for i in range(shared)}
        out |= {f"u_heads.{i}": f"blocks.u_head.{i}" for i in range(heads)}
        return out | {f"v_heads.{i}": f"blocks.v_head.{i}" for i in range(heads)}
    out = {f"shared_blocks.{i}": f"blocks.trunk.{i}" for i in range(shared)}
    return out | {f"u_heads.{i}": f"blocks.trunk.{shared + i}" for i in range(heads)}


def _strip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    prefixed = [k.startswith(PREFIX) for k in state]
    if all(prefixed):
        return {k[len(PREFIX) :]: v for k, v in state.items()}
    if not any(prefixed):
        return dict(state)
    odd = next(k for k, p in zip(state, prefixed, strict=True) if not p)
    raise ValueError(f"official checkpoint: key {odd!r} lacks the {PREFIX!r} prefix of the others")


def load_official(state_dict: dict[str, Tensor], input_size: int = 32, **overrides) -> nn.Module:
    """Our in-context model with the weights of an official release state dict.

    Infers depth, width, heads, classes, token counts and head depths from the tensors; maps
    every key strictly: an unknown or missing key, or a wrong shape, is an error naming it. A
    file without the v-head (the released inference checkpoints) loads as a u-only model; its
    `v_final_layer`, which the official eval mode keeps but never uses for u, is then ignored.
    Call the result as any of our models: model(z, t, h, conditions, heads).
    """
    state = _strip(state_dict)
    cfg = official_config(state, input_size, **overrides)
    shared = _block_count(state, "shared_blocks")
    names = _name_map(cfg, shared)
    ignored = set() if cfg.aux_head_depth else {k for k in state if k.startswith("v_final_layer.")}
    ours: dict[str, Tensor] = {}
    for theirs, block in _blocks(cfg, shared).items():
        try:
            ours[f"{block}.attn.qkv.weight"] = torch.cat([state[f"{theirs}.{q}"] for q in _QKV])
        except KeyError as err:
            raise ValueError(f"official checkpoint: missing key {PREFIX}{err.args[0]}") from err
    used = {f"{b}.{q}" for b in _blocks(cfg, shared) for q in _QKV}
    for theirs, mine in names.items():
        if theirs not in state:
            raise ValueError(f"official checkpoint: missing key {PREFIX}{theirs}")
        ours[mine] = state[theirs]
        used.add(theirs)
    unknown = sorted(set(state) - used - ignored)
    if unknown:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        raise ValueError(f"official checkpoint: unknown key {PREFIX}{unknown[0]}{more}")
    model = InContextTransformer(cfg)
    expected = model.state_dict()
    for key, tensor in ours.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"official checkpoint: {key} has shape {tuple(tensor.shape)}, "
                f"the inferred model wants {tuple(expected[key].shape)}"
            )
    model.load_state_dict(ours, strict=True)
    return model


def to_official(model: InContextTransformer) -> dict[str, Tensor]:
    """Our in-context model's weights under the release's key names: the state dict of its
    training-mode `iMeanFlow` (u- and v-head), which the official code loads; the inverse of
    load_official for the models it can express (advanced blocks, no t input, an aux head).
    """
    cfg = model.cfg
    if cfg.conditioning != "in_context" or cfg.blocks != "advanced" or cfg.cond_t:
        raise ValueError("the official imfDiT is in-context, advanced blocks, without t")
    if not (cfg.cond_omega and cfg.cond_interval):
        raise ValueError("the official imfDiT always conditions on omega and the interval")
    if not cfg.aux_head_depth:
        raise ValueError("the official imfDiT has a u-head and a v-head: aux_head_depth > 0")
    shared = cfg.depth - cfg.aux_head_depth
    ours = model.state_dict()
    out = {theirs: ours[mine] for theirs, mine in _name_map(cfg, shared).items()}
    for theirs, block in _blocks(cfg, shared).items():
        qkv = ours[f"{block}.attn.qkv.weight"].split(cfg.width)
        out |= {f"{theirs}.{q}": part for q, part in zip(_QKV, qkv, strict=True)}
    return {PREFIX + k: v.detach().clone() for k, v in out.items()}
