"""The paper's GAN baselines, trained and shipped by this bundle so that the comparison is measured here, not quoted:
``cyclegan`` (unpaired, sees 11 % of the source data) and ``stylegan`` (StyleGAN2-ADA on target images only, GAN
inversion to translate)."""

from scripts.baselines.gan_trainer import GANTrainer

__all__ = ["GANTrainer"]
