"""The ``ixi`` source: real IXI PD and T1 (optionally T2) volumes, T1 registered to PD with ITK.

Real data has no ground-truth tissue segmentation, so its test entries carry no ``label`` and their ``mask`` is a head
mask computed from PD (``mask_type`` "head"). A subject whose registration looks wrong is refused by name rather
than written misaligned (``IXI_QUALITY``).
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

from scripts.io import is_nifti, nifti_stem
from scripts.prepare.errors import DataPreparationError, InputNotFoundError
from scripts.prepare.geometry import plan_slices, sample_slices, to_canonical
from scripts.prepare.registration import RegistrationError, register_rigid_affine
from scripts.prepare.sources.base import Source, SubjectSlices, check_dir, load_volume

if TYPE_CHECKING:
    from scripts.prepare.preparer import DatasetPreparer

logger = logging.getLogger(__name__)

__all__ = ["IXI_QUALITY", "IXISource", "volume_head_mask"]

# registration-quality limits of the ixi source (see IXISource)
IXI_QUALITY = {"max_metric": -0.2, "min_head_dice": 0.85, "max_mirror_gain": 0.05}


class IXISource(Source):
    """Real IXI data: PD and T1 (and optionally T2) NIfTI volumes named like ``IXI002-Guys-0828-PD.nii.gz``.

    Subjects are matched by the name before the modality suffix; a PD without its T1 is skipped with a warning.
    T1 is registered to PD (``scripts.prepare.registration.register_rigid_affine``) and resampled onto PD's grid; T2
    is assumed to share PD's grid (same dual-echo acquisition; checked). Slices are chosen by *head* area
    (there is no brain segmentation) and the ``mask`` written is a head mask computed from PD; no ``label`` is
    written. Test subjects are ``testing`` (subject ids like ``IXI002``) or else the last ``test_fraction``
    of the sorted ids.

    A subject whose registration looks wrong is refused (``DataPreparationError`` naming it), by the ``quality``
    limits (``IXI_QUALITY``): the final Mattes metric (``max_metric``), the Dice overlap of the head masks of PD
    and registered T1 (``min_head_dice``), and how much better a mirrored T1 fits (``max_mirror_gain``: a wrong
    orientation header); ``None`` switches a check off.
    """

    name = "ixi"
    mask_type = "head"
    _pattern = re.compile(r"^(IXI\d+)(-.*)?-(PD|T1|T2)$")

    def __init__(
        self,
        pd_dir: str,
        t1_dir: str,
        t2_dir: str | None = None,
        testing: Sequence[str] | None = None,
        test_fraction: float = 0.25,
        registration: Mapping | None = None,
        quality: Mapping | None = None,
    ):
        self.registration = dict(registration or {})
        allowed = set(inspect.signature(register_rigid_affine).parameters) - {
            "fixed_path",
            "moving_path",
            "mirror_check",
        }
        unknown = sorted(set(self.registration) - allowed)
        if unknown:
            raise DataPreparationError(
                f"ixi registration: unknown option '{unknown[0]}' (known: {', '.join(sorted(allowed))})"
            )
        self.quality = dict(IXI_QUALITY)
        for key, value in dict(quality or {}).items():
            if key not in IXI_QUALITY:
                raise DataPreparationError(f"ixi quality: unknown option '{key}' (known: {', '.join(IXI_QUALITY)})")
            self.quality[key] = None if value is None else float(value)
        self.dirs = {"PD": check_dir(pd_dir, "IXI PD directory"), "T1": check_dir(t1_dir, "IXI T1 directory")}
        if t2_dir:
            self.dirs["T2"] = check_dir(t2_dir, "IXI T2 directory")
        self.files: dict[str, dict[str, Path]] = {m: self._scan(d, m) for m, d in self.dirs.items()}
        ids = sorted(set(self.files["PD"]) & set(self.files["T1"]))
        for s in sorted(set(self.files["PD"]) ^ set(self.files["T1"])):
            logger.warning("IXI subject %s has only one of PD/T1: skipped", s)
        if "T2" in self.files:
            missing = [s for s in ids if s not in self.files["T2"]]
            if missing:
                raise InputNotFoundError(f"IXI T2 directory {self.dirs['T2']}: no T2 volume for {missing[0]}")
        if not ids:
            raise InputNotFoundError(f"IXI PD directory {self.dirs['PD']}: no subject has both a PD and a T1 volume")
        if testing is not None:
            test = [str(s) for s in testing]
            unknown = [s for s in test if s not in ids]
            if unknown:
                raise DataPreparationError(f"ixi testing: subject {unknown[0]} has no PD/T1 pair")
        else:
            n_test = max(1, int(round(len(ids) * float(test_fraction)))) if len(ids) > 1 else 0
            test = ids[len(ids) - n_test :]
        self.split = {"training": [s for s in ids if s not in test], "testing": test}

    def _scan(self, directory: Path, modality: str) -> dict[str, Path]:
        out = {}
        files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
        for p in files:
            m = self._pattern.match(nifti_stem(p))
            if not m or m.group(3) != modality:
                continue
            if not is_nifti(p):
                raise DataPreparationError(f"IXI {modality} file {p}: not a NIfTI file (expected .nii or .nii.gz)")
            out[m.group(1)] = p
        if not out:
            raise InputNotFoundError(
                f"IXI {modality} directory {directory}: no IXI {modality} NIfTI volumes "
                f"(IXI<id>-...-{modality}.nii.gz) in it"
            )
        return out

    def subjects(self) -> dict[str, list[str]]:
        return dict(self.split)

    def prepare(self, subject: str, preparer: DatasetPreparer) -> SubjectSlices:
        pd_path, t1_path = self.files["PD"][subject], self.files["T1"][subject]
        pd, pd_aff = load_volume(pd_path, "IXI PD volume")
        _check_image(pd, pd_path, "IXI PD volume")
        _check_image(load_volume(t1_path, "IXI T1 volume")[0], t1_path, "IXI T1 volume")  # before the slow part
        pd_canon = to_canonical(pd.astype(np.float32), pd_aff)
        head = volume_head_mask(pd_canon.data)
        if not head.any():
            raise DataPreparationError(f"IXI PD volume {pd_path}: no head found (empty image)")
        mirror = self.quality["max_mirror_gain"] is not None
        try:
            t1_on_pd, reg = register_rigid_affine(pd_path, t1_path, mirror_check=mirror, **self.registration)
        except RegistrationError as exc:
            raise DataPreparationError(
                f"IXI subject {subject}: ITK could not register T1 {t1_path} to PD {pd_path} ({exc}); check that "
                "both are 3D head volumes, or move that T1 out of the T1 directory to leave the subject out"
            ) from None
        vols = {"PDw": pd.astype(np.float32), "T1w": t1_on_pd.astype(np.float32)}
        if "T2" in self.files:
            t2, t2_aff = load_volume(self.files["T2"][subject], "IXI T2 volume")
            if t2.shape != pd.shape or not np.allclose(t2_aff, pd_aff, atol=1e-3):
                raise DataPreparationError(f"IXI T2 volume {self.files['T2'][subject]}: not on its PD volume's grid")
            vols["T2w"] = t2.astype(np.float32)
        canon = {k: pd_canon if k == "PDw" else to_canonical(v, pd_aff) for k, v in vols.items()}
        aff = canon["PDw"].affine
        self._check_registration(subject, pd_path, t1_path, reg, head, canon["T1w"].data)
        ks, center = plan_slices(head, aff, preparer)
        grid = preparer.grid
        icoords, jcoords = grid.axes(aff, center)
        sigma = np.r_[grid.antialias_sigma(aff), 0.0]
        images = {k: np.maximum(sample_slices(c.data, ks, icoords, jcoords, sigma), 0) for k, c in canon.items()}
        mask = sample_slices(head.astype(np.float32), ks, icoords, jcoords) > 0.5
        return SubjectSlices(
            subject=subject,
            indices=[canon["PDw"].original_index(k) for k in ks],
            affines=np.stack([grid.slice_affine(aff, center, k) for k in ks]),
            images=images,
            mask=mask.astype(np.uint8),
            label=None,
        )

    def _check_registration(self, subject, pd_path, t1_path, reg, head: np.ndarray, t1: np.ndarray) -> None:
        """Refuse a subject whose registered T1 is not aligned with its PD (limits ``self.quality``)."""
        q = self.quality
        t1_head = volume_head_mask(t1)
        dice = 2.0 * np.logical_and(head, t1_head).sum() / max(1, int(head.sum()) + int(t1_head.sum()))
        gains = reg.mirror_gain
        logger.info(
            "%s: registration metric %.3f, head-mask Dice %.3f, mirror gains %s",
            subject,
            reg.affine_metric,
            dice,
            ", ".join(f"{v:+.3f}" for v in gains.values()) or "not checked",
        )
        bad = []
        if q["max_metric"] is not None and not reg.affine_metric <= q["max_metric"]:
            bad.append(f"final Mattes metric {reg.affine_metric:.3f}, limit {q['max_metric']:g}")
        if q["min_head_dice"] is not None and not dice >= q["min_head_dice"]:
            bad.append(f"head-mask Dice {dice:.3f}, limit {q['min_head_dice']:g}")
        if bad:
            raise DataPreparationError(
                f"IXI subject {subject}: T1 {t1_path} is not aligned with PD {pd_path} after registration "
                f"({'; '.join(bad)}); check that both are this subject's head volumes, or move that T1 out of the "
                "T1 directory to leave the subject out"
            )
        if q["max_mirror_gain"] is not None and gains:
            axis, gain = max(gains.items(), key=lambda item: item[1])
            if gain > q["max_mirror_gain"]:
                raise DataPreparationError(
                    f"IXI subject {subject}: T1 {t1_path} fits PD {pd_path} better mirrored along its voxel axis "
                    f"{axis} (metric gain {gain:.3f}, limit {q['max_mirror_gain']:g}): its orientation header is "
                    "probably wrong; fix that file's affine, or move it out of the T1 directory to leave the subject "
                    "out"
                )


def _check_image(volume: np.ndarray, path: Path, what: str) -> None:
    """One line for an image with nothing to register: non-finite values, or the same value everywhere."""
    if not np.all(np.isfinite(volume)):
        raise DataPreparationError(
            f"{what} {path}: has NaN or infinite values; replace it, or move it out of its folder to leave the "
            "subject out"
        )
    lo, hi = float(np.min(volume)), float(np.max(volume))
    if lo == hi:
        raise DataPreparationError(
            f"{what} {path}: every voxel is {hi:g} (an empty image, nothing to register); replace it, or move it "
            "out of its folder to leave the subject out"
        )


def volume_head_mask(volume: np.ndarray) -> np.ndarray:
    """Head (foreground) mask of a raw 3D MR volume, for registering IXI scans: threshold at 10 % of the 99.5th
    percentile, keep the largest connected component, fill holes slice by slice. Whole scanner volumes (neck, bright
    fat) need this; the 2D slices a translator sees use ``scripts.transforms.head_mask``, the bundle's head mask."""
    v = np.asarray(volume, dtype=np.float32)
    hi = float(np.percentile(v, 99.5))
    if hi <= 0:
        return np.zeros(v.shape, dtype=bool)
    fg = v > 0.1 * hi
    fg = ndi.binary_opening(fg, iterations=1)
    lab, n = ndi.label(fg)
    if n == 0:
        return fg
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    fg = lab == int(np.argmax(sizes))
    fg = ndi.binary_closing(fg, iterations=2)
    for k in range(fg.shape[2]):
        fg[:, :, k] = ndi.binary_fill_holes(fg[:, :, k])
    return fg
