"""What a composed experiment config resolves to: helpers the stages share.

Kept apart from tasks.config (which imports every stage's config dataclass) so that stage
modules can use them without an import cycle.
"""

from __future__ import annotations

import dataclasses

from omegaconf import OmegaConf

from imf_core.models import preset
from imf_core.models.config import ModelConfig


def model_config(cfg) -> ModelConfig:
    """The ModelConfig the experiment asks for: its preset with the non-null overrides."""
    section = dataclasses.asdict(cfg.model)
    name = section.pop("name")
    return preset(name, **{k: v for k, v in section.items() if v is not None})


def to_dict(cfg) -> dict:
    """The experiment config as plain, resolved containers (for manifests and MLflow params):
    the model section is the preset's name plus every field it resolves to, no None left."""
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    out["model"] = {"name": cfg.model.name} | dataclasses.asdict(model_config(cfg))
    return out
