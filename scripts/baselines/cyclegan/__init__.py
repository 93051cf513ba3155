"""CycleGAN baseline (Zhu et al., ICCV 2017): unpaired PDw -> T1w translation trained with 11 % of the source data.

The paper compares LMIDiffusion with a CycleGAN that may see a small part (11 %) of the source-modality training data;
this package is that baseline, built from MONAI pieces so that it trains and runs through the bundle like the
diffusion model (``configs/train_cyclegan.json``).

- ``networks``: ``ResnetGenerator`` and the PatchGAN ``discriminator``; ``trainer``: ``CycleGANTrainer`` and the
  ``ImagePool``; ``source_subset``: which source slices it may see; ``inferer``: ``CycleGANInferer``.
"""

from scripts.baselines.cyclegan.inferer import CycleGANInferer
from scripts.baselines.cyclegan.networks import ResnetGenerator, discriminator
from scripts.baselines.cyclegan.source_subset import load_source_subset, select_source_subset
from scripts.baselines.cyclegan.trainer import CycleGANTrainer, ImagePool

__all__ = [
    "CycleGANInferer",
    "CycleGANTrainer",
    "ImagePool",
    "ResnetGenerator",
    "discriminator",
    "load_source_subset",
    "select_source_subset",
]
