"""StyleGAN2-ADA trained on target (T1w) images only, and GAN inversion: the paper's second GAN baseline.

A generator learns the target modality from target images alone (Karras et al., "Training Generative Adversarial
Networks with Limited Data"); a source image is translated by finding the latent code whose generated image best
matches it under a modality-robust loss. The paper reports this baseline as poor (Dice 0.66); this is an honest,
working and compact version of it, not a tuned one, written with torch building blocks (MONAI supplies the engine,
handlers, inferer base and data pipeline).

- ``layers``: equalised-learning-rate and modulated convolutions; ``networks``: generator and discriminator;
- ``augment``: adaptive discriminator augmentation; ``trainer``: the training engine (``configs/train_stylegan.json``);
- ``inversion``: ``StyleGANInversionInferer``, the translation.
"""

from scripts.baselines.stylegan.augment import AdaptiveAugment
from scripts.baselines.stylegan.inversion import StyleGANInversionInferer
from scripts.baselines.stylegan.layers import ModulatedConv2d
from scripts.baselines.stylegan.networks import StyleGAN2Discriminator, StyleGAN2Generator
from scripts.baselines.stylegan.trainer import StyleGAN2Trainer, ema_copy

__all__ = [
    "AdaptiveAugment",
    "ModulatedConv2d",
    "StyleGAN2Discriminator",
    "StyleGAN2Generator",
    "StyleGAN2Trainer",
    "StyleGANInversionInferer",
    "ema_copy",
]
