"""MR physics of the simulated multi-contrast brain images (PDw, T1w, T2w) at 1.5 T (or 3 T).

The simulator is linear in the tissue fractions: a voxel holding fractions ``f_t`` of pure tissues ``t`` has the
(noise-free) signal ``S = sum_t f_t * S_t``, ``S_t`` being the sequence's signal equation at the tissue's proton
density (PD), T1, T2 and T2*. Partial volume therefore comes for free: blurring a crisp tissue map's signal image with
a kernel ``K`` is exactly mixing the pure-tissue signals with the blurred one-hot fractions ``K * 1[tissue == t]``
(see ``scripts.prepare.sources``).

Sequences (``DEFAULT_SEQUENCES``, all configurable in ``configs/prepare.json``): PDw and T2w are a long-TR spin echo
(TR 8000 ms, TE 8 and 100 ms: IXI's PD and T2 come from one dual-echo acquisition); T1w is a spoiled gradient echo
(the Ernst equation) with IXI's TR 9.8 ms and TE 4.6 ms but an *effective* flip angle of 20 degrees, because IXI's
nominal 8 degrees gives almost no WM/GM contrast with literature T1 values (the real 3D T1-FFE gets extra contrast
from effects this model ignores, such as magnetisation transfer; ``tests/test_real_fixtures.py`` checks the choice
against real IXI slices).

Tissue parameters are rounded literature values at 1.5 T (``TISSUES``; e.g. Wansapura et al. 1999; Gold et al.
2004; Stanisz et al. 2005; Bojorquez et al. 2017 for fat/bone; PD relative to water) and at 3 T (``TISSUES_3T``,
selected by ``MRSimulator``'s ``field_strength``; ``configs/prepare_second_physics.json`` uses it). Each subject
draws a small multiplicative jitter of every PD, T1 and T2; the images get a smooth multiplicative bias field and
Rician noise of a few percent of the subject's pure white-matter signal. Everything is deterministic for a
``numpy.random.Generator`` seed. The resulting contrasts are described in ``docs/README.md`` (Data).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "TISSUES",
    "TISSUES_3T",
    "TISSUE_TABLES",
    "tissue_table",
    "CONTRASTS",
    "Tissue",
    "SpinEcho",
    "SpoiledGradientEcho",
    "MRSimulator",
    "jitter_tissues",
    "tissue_signals",
    "bias_field",
    "add_rician_noise",
    "eval_smooth",
    "smooth_random_field",
]

CONTRASTS: tuple[str, ...] = ("PDw", "T1w", "T2w")


@dataclass(frozen=True)
class Tissue:
    """Relaxation parameters of one pure tissue: PD relative to water, T1/T2/T2* in milliseconds."""

    pd: float
    t1: float
    t2: float
    t2s: float


# 1.5 T values. Brain: WM T1 ~600-650 ms / T2 ~70-80 ms / PD ~0.69; GM T1 ~950-1100 / T2 ~90-100 / PD ~0.8;
# CSF T1 ~3500-4000 / T2 ~1500-2000 / PD 1. Deep grey nuclei have shorter T1/T2 than cortex (iron, myelin).
# Non-brain tissues get plausible values so that the head looks like an MR head: bright fat and marrow in T1w,
# dark cortical bone and air everywhere, fluid-bright eyes in T2w.
TISSUES: dict[str, Tissue] = {
    "csf": Tissue(pd=1.00, t1=3700.0, t2=1800.0, t2s=1000.0),
    "gm": Tissue(pd=0.80, t1=1050.0, t2=95.0, t2s=65.0),
    "deep_gm": Tissue(pd=0.78, t1=900.0, t2=85.0, t2s=55.0),
    "wm": Tissue(pd=0.69, t1=630.0, t2=75.0, t2s=55.0),
    "lesion": Tissue(pd=0.76, t1=900.0, t2=120.0, t2s=70.0),
    "choroid_plexus": Tissue(pd=0.85, t1=1300.0, t2=150.0, t2s=60.0),
    "blood": Tissue(pd=0.85, t1=1350.0, t2=180.0, t2s=50.0),
    "nerve": Tissue(pd=0.70, t1=700.0, t2=75.0, t2s=50.0),
    "dura": Tissue(pd=0.45, t1=800.0, t2=30.0, t2s=20.0),
    "fat": Tissue(pd=0.95, t1=270.0, t2=80.0, t2s=35.0),
    "marrow": Tissue(pd=0.80, t1=380.0, t2=65.0, t2s=25.0),
    "muscle": Tissue(pd=0.72, t1=1000.0, t2=42.0, t2s=30.0),
    "skin": Tissue(pd=0.60, t1=700.0, t2=40.0, t2s=25.0),
    "bone": Tissue(pd=0.05, t1=400.0, t2=2.0, t2s=1.0),
    "mucosa": Tissue(pd=0.85, t1=1100.0, t2=110.0, t2s=50.0),
    "vitreous": Tissue(pd=0.98, t1=3600.0, t2=1500.0, t2s=800.0),
    "air": Tissue(pd=0.0, t1=1000.0, t2=1.0, t2s=1.0),
}

# 3 T values (same tissues, same PD: proton density does not depend on the field). T1 lengthens with the field
# (roughly as B0^0.3-0.4 for brain), T2 shortens a little and T2* more (susceptibility effects scale with B0),
# most in iron-rich deep grey nuclei. Brain: WM T1 ~830-850 ms / T2 ~65-75 ms (Wansapura et al. 1999: WM T1
# 832 ms, GM 1331 ms; inversion-recovery studies such as Stanisz et al. 2005 report up to ~1100 / ~1800 ms);
# GM T1 ~1300-1450 / T2 ~80-90; CSF T1 ~4000-4400 / T2 ~1500-1800; deep grey nuclei T1 ~1100-1200 / T2 ~65-75
# (Gelman et al. 1999, iron). Blood T1 ~1650 ms at 3 T for a normal haematocrit (Lu et al. 2004), T2 shorter
# than at 1.5 T (mixed arterial/venous). Fat T1 ~370 ms and muscle T1 ~1400 ms (Gold et al. 2004); fatty
# marrow T1 ~400-450 ms. Non-brain values are rounded middles of reported ranges, as in the 1.5 T table.
TISSUES_3T: dict[str, Tissue] = {
    "csf": Tissue(pd=1.00, t1=4200.0, t2=1600.0, t2s=800.0),
    "gm": Tissue(pd=0.80, t1=1400.0, t2=85.0, t2s=50.0),
    "deep_gm": Tissue(pd=0.78, t1=1150.0, t2=70.0, t2s=35.0),
    "wm": Tissue(pd=0.69, t1=840.0, t2=70.0, t2s=45.0),
    "lesion": Tissue(pd=0.76, t1=1200.0, t2=110.0, t2s=55.0),
    "choroid_plexus": Tissue(pd=0.85, t1=1700.0, t2=135.0, t2s=45.0),
    "blood": Tissue(pd=0.85, t1=1650.0, t2=120.0, t2s=30.0),
    "nerve": Tissue(pd=0.70, t1=900.0, t2=70.0, t2s=40.0),
    "dura": Tissue(pd=0.45, t1=1000.0, t2=28.0, t2s=15.0),
    "fat": Tissue(pd=0.95, t1=370.0, t2=70.0, t2s=25.0),
    "marrow": Tissue(pd=0.80, t1=430.0, t2=55.0, t2s=15.0),
    "muscle": Tissue(pd=0.72, t1=1420.0, t2=38.0, t2s=22.0),
    "skin": Tissue(pd=0.60, t1=900.0, t2=36.0, t2s=18.0),
    "bone": Tissue(pd=0.05, t1=450.0, t2=1.5, t2s=0.7),
    "mucosa": Tissue(pd=0.85, t1=1450.0, t2=100.0, t2s=35.0),
    "vitreous": Tissue(pd=0.98, t1=4100.0, t2=1300.0, t2s=600.0),
    "air": Tissue(pd=0.0, t1=1000.0, t2=1.0, t2s=1.0),
}

# field strength (T) -> base tissue table
TISSUE_TABLES: dict[float, dict[str, Tissue]] = {1.5: TISSUES, 3.0: TISSUES_3T}


def tissue_table(field_strength: float) -> dict[str, Tissue]:
    """The base tissue table at ``field_strength`` tesla (one of ``TISSUE_TABLES``: 1.5 or 3.0)."""
    try:
        return TISSUE_TABLES[float(field_strength)]
    except (KeyError, TypeError, ValueError):
        known = ", ".join(f"{b:g}" for b in TISSUE_TABLES)
        raise ValueError(f"field_strength {field_strength!r}: no tissue table (known: {known} T)") from None


@dataclass(frozen=True)
class SpinEcho:
    """Spin echo with TR >> TE: ``S = PD (1 - exp(-TR/T1)) exp(-TE/T2)`` (times in ms)."""

    tr: float
    te: float

    def __call__(self, t: Tissue) -> float:
        return t.pd * (1.0 - np.exp(-self.tr / t.t1)) * np.exp(-self.te / t.t2)


@dataclass(frozen=True)
class SpoiledGradientEcho:
    """Spoiled gradient echo (Ernst equation), ``flip`` in degrees, times in ms."""

    tr: float
    te: float
    flip: float

    def __call__(self, t: Tissue) -> float:
        a = np.deg2rad(self.flip)
        e1 = np.exp(-self.tr / t.t1)
        return t.pd * np.sin(a) * (1.0 - e1) / (1.0 - np.cos(a) * e1) * np.exp(-self.te / t.t2s)


# T1w flip angle: with the literature T1 values IXI's nominal 8 degrees sits at the grey-matter Ernst angle
# (acos(exp(-9.8/1050)) = 7.8 deg) and gives WM/GM = 1.06 and CSF/WM = 0.50, far flatter than the real IXI T1 slices
# in ``../shared/data/real_fixtures`` (K-means brain cluster centres: WM/GM 1.34-1.39, CSF/WM 0.31-0.42); at 20 degrees
# the equation gives WM/GM ~1.3 and CSF/WM ~0.3, a clearly T1-weighted image with WM > GM > CSF.
DEFAULT_SEQUENCES: dict[str, SpinEcho | SpoiledGradientEcho] = {
    "PDw": SpinEcho(tr=8000.0, te=8.0),
    "T1w": SpoiledGradientEcho(tr=9.8, te=4.6, flip=20.0),
    "T2w": SpinEcho(tr=8000.0, te=100.0),
}


def make_sequence(spec: Mapping | SpinEcho | SpoiledGradientEcho) -> SpinEcho | SpoiledGradientEcho:
    """Build a sequence from a config mapping ``{"kind": "spin_echo"|"spgr", "tr": .., "te": .., "flip": ..}``."""
    if isinstance(spec, SpinEcho | SpoiledGradientEcho):
        return spec
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind == "spin_echo":
        return SpinEcho(**spec)
    if kind == "spgr":
        return SpoiledGradientEcho(**spec)
    raise ValueError(f"sequence kind {kind!r} is not one of 'spin_echo', 'spgr'")


def jitter_tissues(
    rng: np.random.Generator, tissues: Mapping[str, Tissue] = TISSUES, jitter: float = 0.03
) -> dict[str, Tissue]:
    """Per-subject tissue parameters: every PD, T1, T2 and T2* times ``1 + jitter * N(0, 1)`` (clipped at +-3 sd)."""
    out = {}
    for name in sorted(tissues):
        t = tissues[name]
        f = 1.0 + jitter * np.clip(rng.standard_normal(4), -3.0, 3.0)
        out[name] = replace(t, pd=t.pd * f[0], t1=t.t1 * f[1], t2=t.t2 * f[2], t2s=t.t2s * f[3])
    return out


def tissue_signals(
    tissues: Mapping[str, Tissue], sequences: Mapping[str, SpinEcho | SpoiledGradientEcho], names: Sequence[str]
) -> np.ndarray:
    """Noise-free pure-tissue signals, an array ``(len(sequences), len(names))`` in sequence order."""
    return np.array([[float(seq(tissues[n])) for n in names] for seq in sequences.values()], dtype=np.float64)


def bias_field(points_mm: np.ndarray, rng: np.random.Generator, strength: float, scale_mm: float = 100.0) -> np.ndarray:
    """A smooth multiplicative field ``exp(sum_k c_k phi_k(x))`` at world points ``(..., 3)`` in mm.

    ``phi_k`` are products of ``1``, ``sin(pi x / (2 scale))`` and ``cos(pi x / (2 scale))`` along the three axes
    of total order 1 or 2 (18 terms: a field that varies over ~10 cm, like a receive-coil profile); the
    coefficients are normal, scaled so that the log-field has a standard deviation of about ``strength``.
    """
    x = np.asarray(points_mm, dtype=np.float64) / scale_mm
    basis_1d = (np.ones_like, lambda v: np.sin(0.5 * np.pi * v), lambda v: np.cos(0.5 * np.pi * v))
    terms = [(i, j, k) for i in range(3) for j in range(3) for k in range(3) if 0 < (i > 0) + (j > 0) + (k > 0) <= 2]
    # 6 first-order terms (variance ~1/2 each over the head) and 12 second-order terms (~1/4): var ~ 6 c^2
    coeffs = rng.standard_normal(len(terms)) * strength / np.sqrt(6.0)
    log_b = np.zeros(x.shape[:-1])
    for c, (i, j, k) in zip(coeffs, terms, strict=True):
        log_b += c * basis_1d[i](x[..., 0]) * basis_1d[j](x[..., 1]) * basis_1d[k](x[..., 2])
    return np.exp(log_b)


def smooth_random_field(points_mm: np.ndarray, rng: np.random.Generator, wavelength_mm: float, n: int = 24):
    """A smooth random field (about unit variance) at world points ``(..., 3)``: random Fourier features."""
    direction = rng.standard_normal((n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    freq = direction * (2 * np.pi / wavelength_mm) * rng.uniform(0.5, 1.5, size=(n, 1))
    phase = rng.uniform(0, 2 * np.pi, size=n)
    out = np.zeros(points_mm.shape[:-1])
    for f, ph in zip(freq, phase, strict=True):
        out += np.cos(points_mm @ f + ph)
    return out * np.sqrt(2.0 / n)


def eval_smooth(fn, points_mm: np.ndarray, factor: int = 4) -> np.ndarray:
    """Evaluate a smooth function of space on every ``factor``-th point of a grid of points ``(..., H, W, 3)``.

    ``fn`` maps points ``(..., h, w, 3)`` to values ``(C..., ..., h, w)``; the result is linearly interpolated back
    to ``H x W``. Exact for functions that are affine in-plane, and accurate for fields that vary over several
    ``factor`` pixels (bias fields, smooth deformations): ~``factor**2`` times less work.
    """
    h, w = points_mm.shape[-3:-1]
    if factor <= 1 or min(h, w) <= 2 * factor:
        return fn(points_mm)
    iu = np.unique(np.r_[np.arange(0, h, factor), h - 1])
    iv = np.unique(np.r_[np.arange(0, w, factor), w - 1])
    coarse = np.asarray(fn(points_mm[..., iu, :, :][..., iv, :]))
    for axis, (idx, n) in zip((-2, -1), ((iu, h), (iv, w)), strict=True):
        pos = np.interp(np.arange(n), idx, np.arange(len(idx)))
        i0 = np.minimum(np.floor(pos).astype(int), len(idx) - 2)
        frac = (pos - i0).astype(coarse.dtype)
        a = np.take(coarse, i0, axis=axis)
        b = np.take(coarse, i0 + 1, axis=axis)
        shape = [1] * coarse.ndim
        shape[axis] = n
        coarse = a + (b - a) * frac.reshape(shape)
    return coarse


def add_rician_noise(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the complex signal plus Gaussian noise of standard deviation ``sigma`` per channel."""
    real = signal + sigma * rng.standard_normal(signal.shape)
    imag = sigma * rng.standard_normal(signal.shape)
    return np.sqrt(real * real + imag * imag)


@dataclass
class MRSimulator:
    """Configuration and per-subject randomness of the MR simulation.

    Args:
        sequences: contrast name -> sequence (or its config mapping); default PDw/T1w/T2w as documented above.
        noise_level: Rician noise standard deviation as a fraction of the subject's pure-WM signal per contrast.
        bias_strength: standard deviation of the log bias field (0.1 is about +-20 % over the head).
        tissue_jitter: per-subject relative standard deviation of PD, T1, T2 and T2*.
        pv_sigma_mm: Gaussian blur (standard deviation, mm) of crisp label maps that makes partial-volume
            tissue fractions (0.5 mm: a full width at half maximum of about 1.2 mm).
        gain: receiver gain; signals are ``gain * S`` so that white matter is a few hundred units.
        tissues: replacements for entries of the base tissue table, name -> Tissue or {pd, t1, t2, t2s}.
        field_strength: selects the base tissue table, 1.5 (``TISSUES``, the default) or 3.0 (``TISSUES_3T``).
    """

    sequences: Mapping = field(default_factory=lambda: dict(DEFAULT_SEQUENCES))
    noise_level: float = 0.03
    bias_strength: float = 0.1
    tissue_jitter: float = 0.03
    pv_sigma_mm: float = 0.5
    gain: float = 1000.0
    tissues: Mapping | None = None
    field_strength: float = 1.5

    def __post_init__(self):
        self.sequences = {k: make_sequence(v) for k, v in dict(self.sequences).items()}
        if tuple(self.sequences) != CONTRASTS:
            raise ValueError(
                f"simulator sequences must be exactly {CONTRASTS} in that order, got {tuple(self.sequences)}"
            )
        base = dict(tissue_table(self.field_strength))
        self.field_strength = float(self.field_strength)
        for name, t in dict(self.tissues or {}).items():
            base[name] = t if isinstance(t, Tissue) else Tissue(**t)
        self.tissues = base
        for name, v in (("noise_level", self.noise_level), ("bias_strength", self.bias_strength)):
            if v < 0:
                raise ValueError(f"simulator {name} must be >= 0, got {v}")

    def subject_signals(self, rng: np.random.Generator, names: Sequence[str]) -> np.ndarray:
        """Pure-tissue signals ``(3, len(names))`` for one subject (jittered parameters, times ``gain``)."""
        tissues = jitter_tissues(rng, self.tissues, self.tissue_jitter)
        return self.gain * tissue_signals(tissues, self.sequences, names)

    def finish(
        self,
        clean: np.ndarray,
        points_mm: np.ndarray,
        wm_signal: np.ndarray,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Bias field and Rician noise on noise-free images.

        Args:
            clean: noise-free signals ``(3, ...)`` in ``CONTRASTS`` order.
            points_mm: world coordinates ``(..., H, W, 3)`` of the image pixels (the bias field is a function of
                space, evaluated on a coarse grid and interpolated).
            wm_signal: pure white-matter signal per contrast ``(3,)`` (sets the noise level).
            rng: the subject's generator.

        PDw and T2w share one bias field (one dual-echo acquisition, as in IXI); T1w gets its own.
        """
        b_dual = eval_smooth(lambda p: bias_field(p, rng, self.bias_strength), points_mm)
        b_t1 = eval_smooth(lambda p: bias_field(p, rng, self.bias_strength), points_mm)
        out = np.empty(clean.shape, dtype=np.float32)
        for c, b in enumerate((b_dual, b_t1, b_dual)):
            sigma = self.noise_level * float(wm_signal[c])
            out[c] = add_rician_noise(clean[c] * b, sigma, rng) if sigma > 0 else clean[c] * b
        return out
