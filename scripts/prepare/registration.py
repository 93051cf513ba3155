"""Intra-subject registration with ITK: a moving volume (IXI T1) onto a fixed one (IXI PD).

Two stages, each multi-resolution (shrink 4/2/1, smoothing 2/1/0 voxels), driven by Mattes mutual information
(``MattesMutualInformationImageToImageMetricv4``) and a regular-step gradient descent whose parameter scales
come from physical shifts: a rigid ``VersorRigid3DTransform`` initialised by matching the images' centres of mass,
then an ``AffineTransform`` started from the rigid result. The moving image is then resampled (linear) onto the
fixed image's voxel grid, so that the returned array shares the fixed file's affine, voxel for voxel.

Transforms follow ITK's convention: they map *fixed* physical points (LPS mm) to *moving* physical points.

ITK failures (an all-zero image, one too small for the pyramid) raise ``RegistrationError`` with ITK's message on
one line. ``mirror_check`` also fits quick rigid registrations of the moving image mirrored along each voxel axis
(``RegistrationResult.mirror_gain``): a clearly better fit of a mirrored image means a wrong orientation header.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "RegistrationError",
    "RegistrationResult",
    "itk_message",
    "register_rigid_affine",
    "transform_matrix",
    "rotation_angle_deg",
]


class RegistrationError(RuntimeError):
    """ITK could not register the images; the message is ITK's reason on one line."""


@dataclass
class RegistrationResult:
    """The fitted fixed->moving transform as a 4x4 matrix in LPS mm, plus the final metric values (Mattes MI,
    negated: lower is better). ``mirror_gain``: voxel axis -> quick rigid metric of the unmirrored moving image
    minus that of the image mirrored along the axis (> 0: the mirrored image fits better); empty unless asked."""

    matrix: np.ndarray
    rigid_matrix: np.ndarray
    rigid_metric: float
    affine_metric: float
    mirror_gain: dict[int, float] = field(default_factory=dict)


def itk_message(error: BaseException) -> str:
    """ITK's reason for an exception on one line, without the source location and object address."""
    text = " ".join(str(error).split())
    match = re.search(r"ITK ERROR: (.*)", text)
    if match:
        text = match.group(1)
    return re.sub(r"\(0x[0-9a-fA-F]+\)", "", text)


def transform_matrix(transform) -> np.ndarray:
    """4x4 homogeneous matrix (LPS mm, fixed -> moving) of an ITK matrix-offset transform."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    m[:3, 3] = np.asarray(transform.GetOffset(), dtype=np.float64)
    return m


def rotation_angle_deg(rotation: np.ndarray) -> float:
    """Rotation angle (degrees) of the orthogonal part (polar decomposition) of a 3x3 matrix."""
    u, _, vt = np.linalg.svd(np.asarray(rotation, dtype=np.float64)[:3, :3])
    r = u @ vt
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))))


def _register_stage(
    itk,
    fixed,
    moving,
    transform,
    iterations: int,
    sampling: float,
    bins: int,
    seed: int,
    shrink: tuple[int, ...] = (4, 2, 1),
    sigmas: tuple[float, ...] = (2.0, 1.0, 0.0),
):
    image_type = type(fixed)
    metric = itk.MattesMutualInformationImageToImageMetricv4[image_type, image_type].New()
    metric.SetNumberOfHistogramBins(bins)
    optimizer = itk.RegularStepGradientDescentOptimizerv4[itk.D].New()
    optimizer.SetLearningRate(1.0)
    optimizer.SetMinimumStepLength(1e-4)
    optimizer.SetRelaxationFactor(0.5)
    optimizer.SetNumberOfIterations(iterations)
    optimizer.SetGradientMagnitudeTolerance(1e-6)
    scales = itk.RegistrationParameterScalesFromPhysicalShift[type(metric)].New()
    scales.SetMetric(metric)
    optimizer.SetScalesEstimator(scales)
    optimizer.SetDoEstimateLearningRateOnce(True)
    reg = itk.ImageRegistrationMethodv4[image_type, image_type].New()
    reg.SetFixedImage(fixed)
    reg.SetMovingImage(moving)
    reg.SetMetric(metric)
    reg.SetOptimizer(optimizer)
    reg.SetInitialTransform(transform)
    reg.InPlaceOn()
    reg.SetNumberOfLevels(len(shrink))
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(sigmas))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    if sampling < 1.0:
        reg.SetMetricSamplingStrategy(itk.ImageRegistrationMethodv4Enums.MetricSamplingStrategy_RANDOM)
        reg.SetMetricSamplingPercentage(sampling)
        reg.MetricSamplingReinitializeSeed(int(seed))
    reg.Update()
    return float(optimizer.GetValue())


def _rigid(itk, fixed, moving, iterations, sampling, bins, seed, **levels):
    """A rigid transform started by matching the centres of mass, fitted; (transform, final metric)."""
    image_type = type(fixed)
    rigid = itk.VersorRigid3DTransform[itk.D].New()
    init = itk.CenteredTransformInitializer[type(rigid), image_type, image_type].New()
    init.SetTransform(rigid)
    init.SetFixedImage(fixed)
    init.SetMovingImage(moving)
    init.MomentsOn()
    init.InitializeTransform()
    return rigid, _register_stage(itk, fixed, moving, rigid, iterations, sampling, bins, seed, **levels)


def _mirrored(itk, image, axis: int):
    """The image mirrored along its voxel axis ``axis`` (ITK/nibabel order i, j, k) in the same physical box."""
    array = itk.array_from_image(image)  # (k, j, i)
    out = itk.image_from_array(np.ascontiguousarray(np.flip(array, axis=2 - axis)))
    out.CopyInformation(image)
    return out


def _mirror_gain(itk, fixed, moving, iterations, sampling, bins, seed) -> dict[int, float]:
    """Quick coarse rigid fits of the moving image and of its three mirror images, on a pyramid whose finer level
    has about 32 voxels along the fixed image's longest axis."""
    step = max(1, int(round(max(fixed.GetLargestPossibleRegion().GetSize()) / 32)))
    quick = {"shrink": (2 * step, step), "sigmas": (2.0, 1.0)}
    n = min(int(iterations), 100)
    _, plain = _rigid(itk, fixed, moving, n, sampling, bins, seed, **quick)
    gain = {}
    for axis in range(3):
        _, value = _rigid(itk, fixed, _mirrored(itk, moving, axis), n, sampling, bins, seed, **quick)
        gain[axis] = plain - value
    return gain


def register_rigid_affine(
    fixed_path: str | os.PathLike,
    moving_path: str | os.PathLike,
    iterations: int = 200,
    sampling: float = 0.25,
    bins: int = 32,
    affine: bool = True,
    seed: int = 0,
    threads: int | None = None,
    mirror_check: bool = False,
) -> tuple[np.ndarray, RegistrationResult]:
    """Register ``moving`` onto ``fixed`` (rigid, then affine) and resample it onto the fixed voxel grid.

    Args:
        fixed_path, moving_path: NIfTI volumes (read by ITK, which handles their orientation).
        iterations: maximum optimiser iterations per level.
        sampling: fraction of fixed voxels (random, seeded) used by the metric (1.0: all voxels).
        bins: Mattes histogram bins.
        affine: run the affine stage after the rigid one.
        seed: metric sampling seed (the result is deterministic for a seed and thread count).
        threads: ITK threads (None: ITK's default).
        mirror_check: also fill ``RegistrationResult.mirror_gain`` (four quick coarse rigid fits).

    Returns:
        (moving resampled on the fixed grid, as a float32 array in the fixed file's nibabel voxel order;
        the fitted transforms).

    Raises:
        RegistrationError: ITK failed (its reason on one line).
    """
    import itk

    if threads is not None:
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(threads))
    try:
        fixed = itk.imread(str(fixed_path), itk.F)
        moving = itk.imread(str(moving_path), itk.F)
        image_type = type(fixed)
        rigid, rigid_value = _rigid(itk, fixed, moving, iterations, sampling, bins, seed)
        rigid_m = transform_matrix(rigid)
        logger.info("rigid %s -> %s: MI %.4f", moving_path, fixed_path, rigid_value)
        final = rigid
        affine_value = rigid_value
        if affine:
            aff = itk.AffineTransform[itk.D, 3].New()
            aff.SetCenter(rigid.GetCenter())
            aff.SetMatrix(rigid.GetMatrix())
            aff.SetTranslation(rigid.GetTranslation())
            affine_value = _register_stage(itk, fixed, moving, aff, iterations, sampling, bins, seed)
            logger.info("affine %s -> %s: MI %.4f", moving_path, fixed_path, affine_value)
            final = aff
        resampled = itk.resample_image_filter(
            moving,
            transform=final,
            use_reference_image=True,
            reference_image=fixed,
            default_pixel_value=0.0,
            interpolator=itk.LinearInterpolateImageFunction[image_type, itk.D].New(),
        )
        gain = _mirror_gain(itk, fixed, moving, iterations, sampling, bins, seed) if mirror_check else {}
    except RuntimeError as error:  # itk raises RuntimeError with a multi-line message
        raise RegistrationError(itk_message(error)) from error
    # ITK arrays are (k, j, i); nibabel's are (i, j, k) over the same voxel grid
    array = np.ascontiguousarray(itk.array_from_image(resampled).transpose(2, 1, 0), dtype=np.float32)
    result = RegistrationResult(transform_matrix(final), rigid_m, rigid_value, affine_value, gain)
    return array, result
