"""LMIDiffusion and this bundle's default translator: the method, from the LMI layer to the translation.

- ``lmi``: the local mutual information layer (differentiable, accelerated);
- ``contrast``: target-only contrast randomisation of the training references;
- ``networks``: the space-to-depth denoiser on the full 128 x 128 grid;
- ``diffusion``: the conditioning of the denoiser and its training targets;
- ``inferers``: LMI-guided and SDEdit sampling, slice-wise translation of volumes, the method check;
- ``projection``: the LMI projection of x0 estimates;
- ``uncertainty``: the spread of several samples as a map and a per-slice score, and through-plane flicker.

docs/method.md describes the method and what each measured choice bought.
"""

from scripts.lmidiffusion.contrast import RandContrastRemapd, intensity_clusters, random_levels, remap_intensities
from scripts.lmidiffusion.diffusion import (
    LMIConditioner,
    LMIDiffusionPrepareBatch,
    StaticConditiond,
    model_output_from_x0,
    x0_from_model_output,
)
from scripts.lmidiffusion.inferers import (
    LMIGuidedInferer,
    SamplingInferer,
    SDEditInferer,
    SliceWiseInferer,
)
from scripts.lmidiffusion.lmi import LocalMutualInformation, local_mutual_information
from scripts.lmidiffusion.networks import SpaceToDepthDiffusionUNet
from scripts.lmidiffusion.projection import LocalConditionalMean
from scripts.lmidiffusion.uncertainty import SampleStdd, UncertaintyScore, through_plane_flicker, uncertainty_score

__all__ = [
    "LMIConditioner",
    "LMIDiffusionPrepareBatch",
    "LMIGuidedInferer",
    "LocalConditionalMean",
    "LocalMutualInformation",
    "RandContrastRemapd",
    "SDEditInferer",
    "SampleStdd",
    "SamplingInferer",
    "SliceWiseInferer",
    "SpaceToDepthDiffusionUNet",
    "StaticConditiond",
    "UncertaintyScore",
    "intensity_clusters",
    "local_mutual_information",
    "model_output_from_x0",
    "random_levels",
    "remap_intensities",
    "through_plane_flicker",
    "uncertainty_score",
    "x0_from_model_output",
]
