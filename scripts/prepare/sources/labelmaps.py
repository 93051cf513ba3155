"""The ``labelmaps`` source: FreeSurfer-convention label maps (e.g. SynthSeg's training maps) simulated with partial
volume, one subject per file.

Each label becomes a pure tissue of ``scripts.prepare.simulation.TISSUES`` or a fixed mixture (``MIXTURES``) and a
class (``FREESURFER_LABELS``), so any label map with these labels turns into paired PDw / T1w / T2w slices with exact
tissue labels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

from scripts.io import is_nifti, nifti_stem
from scripts.prepare.errors import DataPreparationError, InputNotFoundError
from scripts.prepare.geometry import PLANE_AXES, plan_slices, sample_slices, tilt, to_canonical, voxel_to_world
from scripts.prepare.simulation import CONTRASTS, eval_smooth, smooth_random_field
from scripts.prepare.sources.base import Source, SubjectSlices, check_dir, finish_simulated, load_volume

if TYPE_CHECKING:
    from scripts.prepare.preparer import DatasetPreparer

__all__ = ["FREESURFER_LABELS", "MIXTURES", "LabelMapSource"]

# FreeSurfer label -> (tissue of scripts.prepare.simulation.TISSUES or a mixture below, class 0-3).
# Classes: 1 CSF (ventricles, CSF), 2 GM (cortex, deep grey nuclei, hippocampus, amygdala, cerebellar cortex,
# ventral DC), 3 WM (cerebral and cerebellar WM, brain stem, WM lesions, optic chiasm).
FREESURFER_LABELS: dict[int, tuple[str, int]] = {
    0: ("air", 0),
    # CSF
    **{lab: ("csf", 1) for lab in (4, 5, 14, 15, 24, 43, 44, 72)},
    31: ("choroid_plexus", 1),
    63: ("choroid_plexus", 1),
    # In SynthSeg's training maps 136/137/163/164 line the lateral ventricles and their temporal horns (their
    # neighbours are labels 4/5/43/44, thalamus, hippocampus): choroid plexus, i.e. the ventricular compartment.
    **{lab: ("choroid_plexus", 1) for lab in (136, 137, 163, 164)},
    # GM
    **{lab: ("gm", 2) for lab in (3, 42, 8, 47, 17, 53, 18, 54, 19, 55, 20, 56, 80, 96, 97)},
    **{lab: ("deep_gm", 2) for lab in (9, 48, 10, 49, 11, 50, 12, 51, 13, 52, 26, 58, 28, 60)},
    30: ("blood", 2),
    62: ("blood", 2),
    # WM
    **{lab: ("wm", 3) for lab in (2, 41, 7, 46, 16, 251, 252, 253, 254, 255)},
    **{lab: ("lesion", 3) for lab in (25, 57, 77, 78, 79)},
    85: ("nerve", 3),
    # Extra-cerebral labels of SynthSeg's training maps, identified by where they lie: 502 large vessels (carotid/
    # jugular), 506 eyes, 507 scalp/face soft tissue, 508 extra-ocular muscles, 509 nasal mucosa, 511 skin and
    # subcutaneous fat, 512 spinal cord, 514 venous sinuses, 515 skull, 516 other bone (marrow), 530 optic nerve.
    502: ("blood", 0),
    506: ("vitreous", 0),
    507: ("soft_tissue", 0),
    508: ("muscle", 0),
    509: ("mucosa", 0),
    511: ("scalp", 0),
    512: ("nerve", 0),
    514: ("blood", 0),
    515: ("skull", 0),
    516: ("marrow", 0),
    530: ("nerve", 0),
}

# Fixed mixtures of pure tissues; "soft_tissue" and "skull" additionally vary in space (see LabelMapSource).
MIXTURES: dict[str, dict[str, float]] = {
    "scalp": {"fat": 0.7, "skin": 0.3},
    "soft_tissue": {"muscle": 1.0},  # plus a smooth random fat fraction
    "skull": {"bone": 1.0},  # voxels deeper than the tables become marrow (diploe)
}


class LabelMapSource(Source):
    """FreeSurfer-convention label maps, one file per subject (``*.nii`` / ``*.nii.gz``).

    A file's subject id is ``sub-<digits>`` from the trailing digits of its name (``training_seg_07.nii.gz`` ->
    ``sub-07``), or ``sub-<name>`` when there are none. ``training`` / ``testing`` list the ids (the digits, or
    the names) per split; ``None`` puts every file not listed in the other split there. Other files in the
    directory (text, licence) are ignored, unless their name carries a listed subject id without being NIfTI.
    Label maps must be 3D with integer labels of ``FREESURFER_LABELS`` (plus ``extra_labels``:
    {label: [tissue, class]}); the axial axis is found from the affine.

    ``training_planes`` (default axial only) also cuts the training subjects along other planes ("coronal",
    "sagittal"): each extra plane adds a pseudo-subject ``sub-<id>-<plane>`` per training subject, i.e. more distinct
    2D anatomy from the same few heads. ``training_tilts_deg`` ([[pitch, roll], ...] in degrees) likewise adds
    ``sub-<id>-tilt<i>``: axial cuts of the head rotated about its brain's centre, oblique planes that still look
    axial. Test subjects are always cut axially.
    """

    name = "labelmaps"

    def __init__(
        self,
        directory: str,
        training: Sequence[str] | None = None,
        testing: Sequence[str] | None = None,
        extra_labels: Mapping | None = None,
        skull_table_mm: float = 1.5,
        fat_fraction: Sequence[float] = (0.15, 0.6),
        training_planes: Sequence[str] = ("axial",),
        training_tilts_deg: Sequence[Sequence[float]] = (),
    ):
        self.directory = check_dir(directory, "label map directory")
        self.training_planes = [str(p) for p in training_planes]
        unknown = [p for p in self.training_planes if p not in PLANE_AXES]
        if unknown or not self.training_planes or len(set(self.training_planes)) < len(self.training_planes):
            raise DataPreparationError(
                f"labelmaps training_planes {self.training_planes}: give distinct planes of {', '.join(PLANE_AXES)}"
            )
        try:
            self.training_tilts = [(float(pitch), float(roll)) for pitch, roll in training_tilts_deg]
        except (TypeError, ValueError):
            raise DataPreparationError(
                f"labelmaps training_tilts_deg {training_tilts_deg}: give [pitch, roll] pairs in degrees"
            ) from None
        if any(max(abs(pitch), abs(roll)) > 45 for pitch, roll in self.training_tilts):
            raise DataPreparationError(f"labelmaps training_tilts_deg {self.training_tilts}: at most 45 degrees")
        self.labels = dict(FREESURFER_LABELS)
        for k, v in dict(extra_labels or {}).items():
            self.labels[int(k)] = (str(v[0]), int(v[1]))
        self.skull_table_mm = float(skull_table_mm)
        self.fat_fraction = tuple(float(f) for f in fat_fraction)
        files = sorted(p for p in self.directory.iterdir() if p.is_file() and not p.name.startswith("."))
        nifti = [p for p in files if is_nifti(p)]
        if not nifti:
            raise InputNotFoundError(
                f"label map directory {self.directory}: no NIfTI (.nii/.nii.gz) label maps in it"
                + (f" (found {len(files)} other files, e.g. {files[0].name})" if files else " (it is empty)")
            )
        self.files: dict[str, Path] = {}
        for p in nifti:
            key = self._key(p)
            if key in self.files:
                raise DataPreparationError(f"label map {p}: same subject id '{key}' as {self.files[key]}")
            self.files[key] = p
        self.others = {self._key(p): p for p in files if not is_nifti(p)}
        train = [str(s) for s in training] if training is not None else None
        test = [str(s) for s in testing] if testing is not None else None
        if train is not None and test is not None and set(train) & set(test):
            raise DataPreparationError(
                f"labelmaps training/testing: subjects {sorted(set(train) & set(test))} are in both splits"
            )
        if train is None:
            train = [k for k in self.files if k not in set(test or [])]
        if test is None:
            test = [k for k in self.files if k not in set(train)]
        for key in train + test:
            self._file(key)
        self.split = {"training": train, "testing": test}

    @staticmethod
    def _key(p: Path) -> str:
        m = re.search(r"(\d+)$", nifti_stem(p))
        return m.group(1) if m else nifti_stem(p)

    def _file(self, key: str) -> Path:
        if key in self.files:
            return self.files[key]
        if key in self.others:
            raise DataPreparationError(
                f"label map {self.others[key]}: not a NIfTI file (expected .nii or .nii.gz) for subject '{key}'"
            )
        raise InputNotFoundError(f"label map directory {self.directory}: no label map for subject '{key}'")

    def _variants(self) -> dict[str, tuple[str, tuple[float, float] | None]]:
        """Subject-id suffix -> (plane, tilt) of every way a training subject is cut ("" is the plain axial cut)."""
        variants = {("" if p == "axial" else f"-{p}"): (p, None) for p in self.training_planes}
        variants.update({f"-tilt{i}": ("axial", t) for i, t in enumerate(self.training_tilts, start=1)})
        return variants

    def subjects(self) -> dict[str, list[str]]:
        training = [f"sub-{k}{suffix}" for suffix in self._variants() for k in self.split["training"]]
        return {"training": training, "testing": [f"sub-{k}" for k in self.split["testing"]]}

    def _lookup(self, data: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Tissue index and class volumes (uint8) from the labels; unknown labels are an error."""
        if not np.issubdtype(data.dtype, np.integer):
            rounded = np.rint(data)
            if not np.array_equal(rounded, data):
                bad = data[rounded != data].flat[0]
                raise DataPreparationError(f"label map {path}: non-integer label value {bad}")
            data = rounded
        lo, hi = int(data.min()), int(data.max())
        if lo < 0:
            raise DataPreparationError(f"label map {path}: unknown label value {lo} (negative)")
        if hi > 100000:
            raise DataPreparationError(f"label map {path}: unknown label value {hi}")
        data = data.astype(np.int32, copy=False)
        present = np.flatnonzero(np.bincount(data.ravel(order="K"), minlength=hi + 1))
        unknown = [int(v) for v in present if int(v) not in self.labels]
        if unknown:
            raise DataPreparationError(
                f"label map {path}: unknown label value{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(str, unknown[:10]))} (not a FreeSurfer label of scripts.prepare.FREESURFER_LABELS)"
            )
        tissue_names = sorted({self.labels[int(v)][0] for v in present} | {"air", "marrow", "fat"})
        t_lut = np.zeros(hi + 1, dtype=np.uint8)
        c_lut = np.zeros(hi + 1, dtype=np.uint8)
        for v in present:
            t, c = self.labels[int(v)]
            t_lut[v] = tissue_names.index(t)
            c_lut[v] = c
        return t_lut[data], c_lut[data], tissue_names

    def prepare(self, subject: str, preparer: DatasetPreparer) -> SubjectSlices:
        key, plane, tilted = subject[len("sub-") :], "axial", None
        for suffix, (variant_plane, variant_tilt) in self._variants().items():
            if suffix and key.endswith(suffix) and key not in self.files:
                key, plane, tilted = key[: -len(suffix)], variant_plane, variant_tilt
        path = self._file(key)
        data, affine = load_volume(path, "label map")
        tissue, classes, names = self._lookup(data, path)
        del data
        canon_t = to_canonical(tissue, affine, plane)
        canon_c = to_canonical(classes, affine, plane)
        if tilted is not None and canon_c.data.any():  # (no brain at all is refused just below)
            brain_voxels = np.argwhere(canon_c.data > 0)
            centre = (brain_voxels.min(0) + brain_voxels.max(0)) / 2.0
            canon_t, canon_c = (tilt(c, *tilted, centre) for c in (canon_t, canon_c))
        tissue, classes, aff = canon_t.data, canon_c.data, canon_t.affine
        brain = classes > 0
        if not brain.any():
            raise DataPreparationError(f"label map {path}: no brain labels (all voxels are background)")
        vox = np.linalg.norm(aff[:3, :3], axis=0)
        ks, center = plan_slices(brain, aff, preparer)
        grid = preparer.grid
        affines = np.stack([grid.slice_affine(aff, center, k) for k in ks])
        world = voxel_to_world(aff, grid.voxel_points(aff, center, ks))

        # blur = partial volume (pv_sigma) combined with in-plane anti-aliasing
        sim = preparer.simulator
        sigma = np.sqrt(np.r_[grid.antialias_sigma(aff), 0.0] ** 2 + (sim.pv_sigma_mm / vox) ** 2)
        icoords, jcoords = grid.axes(aff, center)

        rng = preparer.rng(subject)
        pure = sorted({n for n in names if n not in MIXTURES} | {t for n in names for t in MIXTURES.get(n, {})})
        pure = sorted(set(pure) | {"fat", "muscle", "marrow", "wm"})
        signals = sim.subject_signals(rng, pure)  # (3, len(pure))
        mix = self._mixtures(names, pure, signals)  # (3, len(names))
        # only the slab of slices that the blur reaches matters
        r = int(4.0 * sigma[2] + 0.5)
        z0, z1 = max(int(ks.min()) - r, 0), min(int(ks.max()) + r + 1, tissue.shape[2])
        tissue = np.ascontiguousarray(np.moveaxis(tissue[:, :, z0:z1], 2, 0))  # (z, x, y): contiguous slices
        classes = np.ascontiguousarray(np.moveaxis(classes[:, :, z0:z1], 2, 0))
        ks_slab = ks - z0
        # diploe: skull voxels deeper than the tables (erosion by ``skull_table_mm``) are marrow
        if "skull" in names:
            skull = tissue == names.index("skull")
            n_erode = int(round(self.skull_table_mm / float(vox.min())))
            if skull.any() and n_erode > 0:
                inner = ndi.binary_erosion(skull, ndi.generate_binary_structure(3, 2), iterations=n_erode)
                tissue[inner] = names.index("marrow")

        def blur_sample(vol: np.ndarray) -> np.ndarray:
            return sample_slices(vol, ks_slab, icoords, jcoords, sigma, z_first=True)

        clean = np.stack([blur_sample(mix[c][tissue]) for c in range(len(CONTRASTS))])
        if "soft_tissue" in names and np.any(soft := tissue == names.index("soft_tissue")):
            # soft tissue: muscle with a smooth random fat fraction (fat pads, fascia) for a realistic texture
            lo_f, hi_f = self.fat_fraction
            field = eval_smooth(lambda p: smooth_random_field(p, rng, 40.0), world)
            fat = lo_f + (hi_f - lo_f) / (1 + np.exp(-1.5 * field))
            d = signals[:, pure.index("fat")] - signals[:, pure.index("muscle")]
            clean += blur_sample(soft.astype(np.float32))[None] * fat[None] * d[:, None, None, None]
        fractions = np.stack([blur_sample((classes == c).astype(np.float32)) for c in (1, 2, 3)])
        fractions = np.concatenate([1.0 - fractions.sum(0, keepdims=True), fractions])
        wm = signals[:, pure.index("wm")]
        return finish_simulated(subject, canon_t, ks, affines, clean, fractions, world, wm, sim, rng)

    @staticmethod
    def _mixtures(names: list[str], pure: list[str], signals: np.ndarray) -> np.ndarray:
        """Signal of every tissue index (pure tissues and the fixed mixtures): ``(3, len(names))`` float32."""
        out = np.zeros((signals.shape[0], len(names)), dtype=np.float64)
        for i, n in enumerate(names):
            for t, w in MIXTURES.get(n, {n: 1.0}).items():
                out[:, i] += w * signals[:, pure.index(t)]
        return out.astype(np.float32)
