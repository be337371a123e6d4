"""The evaluation's latent decoder, as fast as the device allows, the same uint8 images.

    >>> decode = LatentDecoder(vae, scale=0.18215, options=DecodeOptions.fastest(device))
    >>> images = decode(latents)        # (n, 3, 8h, 8w) float32 in [-1, 1], not clipped

`vae` is any module with `decode(z).sample` (diffusers' AutoencoderKL, the SD-VAE). On CUDA
the decoder runs channels-last (the layout cuDNN's convolutions want) with bf16 weights and
cuDNN's autotuner on (the evaluation's shapes are fixed), and compiled where the GPU check
measured that faster (COMPILE_ON_CUDA; its "decode" part times both). On the CPU it is the
float32 NCHW decode the evaluation always ran. The images change by the decoder's bf16
rounding only: within a uint8 level of the float32 decode for nearly every pixel
(tests/test_decoding.py), where the evaluation's uint8 conversion (tasks.features.to_uint8)
rounds anyway.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# torch.compile of the decoder on CUDA: off until the GPU check measures it faster than eager
# channels-last bf16 (benchmarks/gpu_check.py, part "decode", `faster_compiled`).
COMPILE_ON_CUDA = False


@dataclass(frozen=True)
class DecodeOptions:
    """How the decoder runs: its weights' dtype, memory layout, and whether it is compiled."""

    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    compile: bool = False

    @staticmethod
    def fastest(device: torch.device) -> DecodeOptions:
        """bf16, channels-last (and compiled, COMPILE_ON_CUDA) on CUDA; float32 NCHW elsewhere."""
        if device.type == "cuda":
            return DecodeOptions(torch.bfloat16, True, COMPILE_ON_CUDA)
        return DecodeOptions()

    @property
    def plain(self) -> bool:
        return self == DecodeOptions()


class LatentDecoder:
    """latents -> images: vae.decode(latents / scale).sample in float32, run per `options`.
    The VAE given is left as it is (its encoder keeps float32 for precompute): a converted copy
    decodes when the options ask for another dtype or layout."""

    def __init__(
        self,
        vae: nn.Module,
        scale: float,
        options: DecodeOptions = DecodeOptions(),
        compile_backend: str = "inductor",
    ):
        self.scale, self.options = scale, options
        if not options.plain:
            # nn.Module's own .to: diffusers' override warns about modules to keep in float32
            # (none in AutoencoderKL) whenever a dtype is given
            vae = nn.Module.to(copy.deepcopy(vae), dtype=options.dtype)
            if options.channels_last:
                vae = vae.to(memory_format=torch.channels_last)
            if next(vae.parameters()).is_cuda:
                torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks its kernels
        self.vae = vae.eval().requires_grad_(False)
        self.run: Callable[[Tensor], Tensor] = (
            torch.compile(self.decode, dynamic=False, backend=compile_backend)
            if options.compile
            else self.decode
        )

    def decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z).sample

    @torch.no_grad()
    def __call__(self, latents: Tensor) -> Tensor:
        device = next(self.vae.parameters()).device
        z = (latents.to(device) / self.scale).to(self.options.dtype)
        if self.options.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        return self.run(z).float()
