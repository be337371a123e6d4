"""The real networks of the paper's pipeline with random weights: what benchmarks and tests use
where the released weights cannot be downloaded. Costs are the real ones; outputs carry signal.

    >>> vae = sd_vae()                                   # SD-VAE ft-mse architecture
    >>> path = random_inception_weights(tmp / "inception.pth")   # eval.inception_weights=path

Imports only torch at module level; diffusers and torch-fidelity when a builder is called.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

# diffusers' config of the SD VAE (stabilityai/sd-vae-ft-mse): 256x256x3 <-> 32x32x4.
SD_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=256,
)
# A toy of the same family for CPU runs: 4-channel latents, images twice their size.
TOY_VAE_CONFIG = SD_VAE_CONFIG | dict(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 32),
    layers_per_block=1,
    sample_size=16,
)


def sd_vae(toy: bool = False) -> nn.Module:
    """diffusers' AutoencoderKL in the SD-VAE ft-mse architecture (or its toy), random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**(TOY_VAE_CONFIG if toy else SD_VAE_CONFIG))


def scale_keeping_init(model: nn.Module) -> None:
    """Kaiming normal (fan-in, ReLU) on every convolution and linear layer.

    With PyTorch's default init, InceptionV3's activations shrink layer by layer and vanish
    through its ~90 layers: the pool features are ~0 for any input, the softmax uniform, IS is 1
    and FID 2048.000 whatever the samples. Kaiming's gain keeps the scale through the ReLUs, so
    features, FID and IS differ between sample sets, as with the trained weights.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")


def inception_extractor(seed: int = 0) -> nn.Module:
    """torch-fidelity's InceptionV3 feature extractor (2048-d pool features, logits) with
    scale-keeping random weights, built without any weights file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the random init

    with tempfile.TemporaryDirectory() as tmp:  # torch-fidelity downloads when given no file
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        torch.manual_seed(seed)
        model = Unloaded(
            "x", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(empty)
        )
    scale_keeping_init(model)
    return model.eval()


def random_inception_weights(path: Path, seed: int = 0) -> Path:
    """Saves inception_extractor's weights where eval.inception_weights can point."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(inception_extractor(seed).state_dict(), path)
    return path
