"""The ``mni`` source (the offline default): pseudo-subjects from the MNI152 2009a maps that ship inside the nilearn
wheel, so the bundle prepares a dataset with nothing downloaded.

GM and WM come from the template's probability maps (CSF = brain mask - GM - WM, clipped at 0). The shipped template
is skull stripped, so the head around the brain is built from the brain mask's distance map: thin CSF and dura, skull
(inner table, diploe marrow, outer table), muscle (thicker over the temporal fossa), subcutaneous fat and skin, each
layer's thickness varying smoothly per subject (``MNI_HEAD_LAYERS``); concavities of the brain envelope (the gaps
between the lobes at the skull base) are filled with a bone/marrow/CSF mix (``MNI_SKULL_BASE``); there is no face,
neck or eyes. Each subject is the template seen through a random affine and a smooth random deformation, with its own
jittered tissue parameters.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

from scripts.prepare.errors import DataPreparationError
from scripts.prepare.geometry import SliceGrid, select_slices, to_canonical, voxel_to_world, world_to_voxel
from scripts.prepare.simulation import eval_smooth, smooth_random_field
from scripts.prepare.sources.base import Source, SubjectSlices, finish_simulated

if TYPE_CHECKING:
    from scripts.prepare.preparer import DatasetPreparer

__all__ = ["MNI_HEAD_LAYERS", "MNI_SKULL_BASE", "MNISource"]


# MNI pseudo-subject head: layers outside the brain mask (tissue, base thickness in mm), inside to outside.
MNI_HEAD_LAYERS: tuple[tuple[str, float], ...] = (
    ("csf", 1.0),
    ("dura", 1.0),
    ("bone", 2.0),
    ("marrow", 2.0),
    ("bone", 2.0),
    ("muscle", 1.5),
    ("fat", 3.5),
    ("skin", 1.2),
)


# tissue filling the concavities of the brain envelope (mostly the skull base between the lobes)
MNI_SKULL_BASE: dict[str, float] = {"bone": 0.5, "marrow": 0.3, "csf": 0.2}


@functools.lru_cache(maxsize=2)
def _mni_template(pad: tuple[int, int, int] = (16, 16, 4)) -> dict:
    """GM, WM, brain mask (padded with ``pad`` voxels of air, room for the head around the brain) and the
    distance (mm) outside the brain envelope."""
    from nilearn import datasets

    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    maps = {
        "gm": datasets.load_mni152_gm_template(resolution=1),
        "wm": datasets.load_mni152_wm_template(resolution=1),
        "mask": mask_img,
    }
    out = {}
    for k, img in maps.items():
        canon = to_canonical(np.asarray(img.dataobj, dtype=np.float32), img.affine)
        out[k] = np.pad(canon.data, [(p, p) for p in pad])
        affine = canon.affine.copy()
        affine[:3, 3] -= canon.affine[:3, :3] @ np.asarray(pad, dtype=np.float64)
    mask = out["mask"] > 0.5
    # brain envelope: the mask with its concavities (up to ~1 cm: gaps between the lobes at the skull base)
    # filled, so that the skull follows the outer surface; the filled gaps become skull base (bone, marrow)
    envelope = (ndi.gaussian_filter(mask.astype(np.float32), 5.0) > 0.5) | mask
    out["envelope"] = envelope.astype(np.float32)
    out["distance"] = ndi.distance_transform_edt(~envelope).astype(np.float32)
    out["affine"] = affine
    out["canonical"] = canon
    out["pad"] = pad
    return out


@functools.lru_cache(maxsize=4)
def _mni_blurred(sigma: tuple[float, float, float]) -> dict:
    t = _mni_template()
    keys = ("gm", "wm", "mask", "envelope")
    out = {k: ndi.gaussian_filter(t[k], sigma) if max(sigma) > 0 else t[k] for k in keys}
    out["distance"] = t["distance"]
    return out


class MNISource(Source):
    """Pseudo-subjects from the MNI152 2009a maps in the nilearn wheel (offline): ``sub-01`` ... ``sub-NN``.

    Subject ``i`` is the template resampled through a random affine (rotations ``rotation_deg``, per-axis
    scaling ``1 +- scale``, shifts ``shift_mm``, all standard deviations) and a smooth random displacement
    (cubic B-spline on a ``control_spacing_mm`` grid, standard deviation ``deformation_mm``); its head layers
    (``MNI_HEAD_LAYERS``) get per-subject thickness factors and a smooth spatial variation. The first
    ``num_training`` subjects are the training split, the next ``num_testing`` the test split.
    """

    name = "mni"

    def __init__(
        self,
        num_training: int = 4,
        num_testing: int = 2,
        rotation_deg: float = 3.0,
        scale: float = 0.04,
        shift_mm: float = 2.0,
        deformation_mm: float = 2.5,
        control_spacing_mm: float = 32.0,
        layer_jitter: float = 0.2,
    ):
        if int(num_training) < 1 or int(num_testing) < 1:
            raise DataPreparationError(
                f"mni num_training={num_training} / num_testing={num_testing}: each split needs at least 1 subject"
            )
        n = int(num_training) + int(num_testing)
        ids = [f"sub-{i + 1:02d}" for i in range(n)]
        self.split = {"training": ids[: int(num_training)], "testing": ids[int(num_training) :]}
        self.rotation_deg, self.scale, self.shift_mm = float(rotation_deg), float(scale), float(shift_mm)
        self.deformation_mm, self.control_spacing_mm = float(deformation_mm), float(control_spacing_mm)
        self.layer_jitter = float(layer_jitter)

    def subjects(self) -> dict[str, list[str]]:
        return dict(self.split)

    def _draw_warp(self, rng: np.random.Generator, t: dict):
        """Draw one subject's transform: a function from subject world points ``(..., 3)`` to template voxels."""
        ang = np.deg2rad(self.rotation_deg * np.clip(rng.standard_normal(3), -2.5, 2.5))
        cx, cy, cz = np.cos(ang)
        sx, sy, sz = np.sin(ang)
        rot = (
            np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
            @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
            @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        )
        lin = rot @ np.diag(1.0 + self.scale * np.clip(rng.standard_normal(3), -2.5, 2.5))
        shift = self.shift_mm * np.clip(rng.standard_normal(3), -2.5, 2.5)
        centre = np.array([0.0, -18.0, 18.0])  # near the middle of the MNI brain
        # smooth displacement: random control points over the template box, cubic B-spline interpolation
        affine, shape = t["affine"], np.array(t["mask"].shape)
        lo = affine[:3, 3]
        extent = np.abs(affine[:3, :3]).sum(1) * (shape - 1)
        n_ctrl = np.maximum(4, np.ceil(extent / self.control_spacing_mm).astype(int) + 1)
        ctrl = [ndi.spline_filter(c) for c in rng.standard_normal((3, *n_ctrl)) * self.deformation_mm]

        def warp(world: np.ndarray) -> np.ndarray:
            moved = (world - centre) @ lin.T + centre + shift
            c = np.moveaxis((moved - lo) / extent * (n_ctrl - 1), -1, 0)
            disp = [ndi.map_coordinates(ctrl[a], c, order=3, mode="nearest", prefilter=False) for a in range(3)]
            return world_to_voxel(affine, moved + np.stack(disp, axis=-1))

        return warp

    def prepare(self, subject: str, preparer: DatasetPreparer) -> SubjectSlices:
        t = _mni_template()
        aff, pad = t["affine"], t["pad"]
        grid, sim = preparer.grid, preparer.simulator
        vox = np.linalg.norm(aff[:3, :3], axis=0)
        maps = _mni_blurred(tuple(float(s) for s in np.r_[grid.antialias_sigma(aff), 0.0]))
        rng = preparer.rng(subject)
        warp = self._draw_warp(rng, t)
        nz = np.argwhere(t["mask"].any(2))
        center = (nz.min(0) + nz.max(0)) / 2.0
        # choose slices by brain area, measured on a coarse grid over every candidate slice
        step = max(1, int(round(preparer.slice_step_mm / vox[2])))
        zs = np.flatnonzero(t["mask"].any((0, 1)))
        cand = np.arange(zs.min() - 8, zs.max() + 9)
        coarse = SliceGrid((max(8, grid.size[0] // 4), max(8, grid.size[1] // 4)), grid.pixel_mm * 4)
        area_pts = warp(voxel_to_world(aff, coarse.voxel_points(aff, center, cand)))
        area = (ndi.map_coordinates(t["mask"], area_pts, order=1) > 0.5).sum((1, 2))
        ks = cand[select_slices(area, step, preparer.min_brain_fraction, preparer.max_slices_per_subject)]

        pts = grid.voxel_points(aff, center, ks)
        world = voxel_to_world(aff, pts)
        tv = eval_smooth(warp, world)
        gm = ndi.map_coordinates(maps["gm"], tv, order=1)
        wm = ndi.map_coordinates(maps["wm"], tv, order=1)
        mask = np.clip(ndi.map_coordinates(maps["mask"], tv, order=1), 0, 1)
        envelope = np.clip(ndi.map_coordinates(maps["envelope"], tv, order=1), 0, 1)
        # distance (mm) from the brain envelope's surface (voxel centres just outside are 1 voxel away)
        dist = np.maximum(ndi.map_coordinates(t["distance"], tv, order=1, cval=1e3) - 0.5, 0)
        csf = np.clip(mask - gm - wm, 0, None)
        total = gm + wm + csf
        norm = np.where(total > 1, 1 / np.maximum(total, 1e-6), 1.0)
        gm, wm, csf = gm * norm, wm * norm, csf * norm
        nonbrain = 1.0 - (gm + wm + csf)
        skull_base = np.clip(envelope - (gm + wm + csf), 0, None)  # filled gaps inside the envelope
        nonbrain = nonbrain - skull_base

        # head layers: cumulative outer boundaries with per-subject, smoothly varying thicknesses; a linear ramp
        # one output pixel wide gives partial volume at every boundary; beyond the last layer is air
        names = ["gm", "wm", "csf"] + sorted({n for n, _ in MNI_HEAD_LAYERS} - {"csf"})
        fractions = {n: np.zeros_like(gm) for n in names}
        fractions.update(gm=gm, wm=wm)
        for n, w in MNI_SKULL_BASE.items():
            fractions[n] += w * skull_base
        lateral = np.clip((np.abs(world[..., 0]) - 45.0) / 20.0, 0, 1)
        temporal = np.clip((50.0 - world[..., 2]) / 25.0, 0, 1) * np.clip((world[..., 2] + 40.0) / 20.0, 0, 1)
        temporal *= np.clip((world[..., 1] + 75.0) / 25.0, 0, 1) * np.clip((45.0 - world[..., 1]) / 20.0, 0, 1)
        boundary = np.zeros_like(gm)
        inner = np.zeros_like(gm)
        for n, base in MNI_HEAD_LAYERS:
            factor = 1.0 + self.layer_jitter * np.clip(rng.standard_normal(), -2, 2)
            local = 1.0 + self.layer_jitter * eval_smooth(lambda p: smooth_random_field(p, rng, 80.0), world)
            thick = np.maximum(base * factor * local, 0.3)
            if n == "muscle":
                thick = thick + 7.0 * lateral * temporal  # temporalis
            boundary = boundary + thick
            outer = np.clip((boundary - dist) / grid.pixel_mm + 0.5, 0, 1)
            fractions[n] += nonbrain * np.clip(outer - inner, 0, 1)
            inner = outer
        fractions["csf"] += csf

        signals = sim.subject_signals(rng, names)
        clean = np.einsum("ct,t...->c...", signals, np.stack([fractions[n] for n in names]))
        # CSF class: the brain mask's CSF and the thin CSF layer outside it (not the skull base's CSF share)
        brain = np.stack([fractions["csf"] - MNI_SKULL_BASE.get("csf", 0.0) * skull_base, gm, wm])
        class_fractions = np.concatenate([1.0 - brain.sum(0, keepdims=True), brain])
        affines = np.stack([grid.slice_affine(aff, center, k) for k in ks])
        wm_signal = signals[:, names.index("wm")]
        # slice numbers refer to the (unpadded) template array
        return finish_simulated(
            subject, t["canonical"], ks - pad[2], affines, clean, class_fractions, world, wm_signal, sim, rng
        )
