"""MR physics of the simulator: tissue contrast ordering (noise-free and on noisy images), the T1w flip angle
choice, bias field and Rician noise statistics, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from scripts.prepare import DatasetPreparer, MNISource
from scripts.prepare.simulation import (
    CONTRASTS,
    DEFAULT_SEQUENCES,
    TISSUES,
    MRSimulator,
    SpoiledGradientEcho,
    add_rician_noise,
    bias_field,
    eval_smooth,
    jitter_tissues,
    tissue_signals,
)

BRAIN = ["wm", "gm", "deep_gm", "csf"]


def _ordering_holds(sig: np.ndarray) -> None:
    pd, t1, t2 = sig  # columns: wm, gm, deep_gm, csf
    wm, gm, deep, csf = range(4)
    assert t1[wm] > t1[gm] > t1[csf] and t1[wm] > t1[deep] > t1[csf]
    assert pd[csf] > pd[gm] > pd[wm]
    assert t2[csf] > t2[gm] > t2[wm] and t2[csf] == t2.max()


def test_noise_free_ordering_base_parameters():
    _ordering_holds(tissue_signals(TISSUES, DEFAULT_SEQUENCES, BRAIN))


@pytest.mark.parametrize("seed", range(20))
def test_noise_free_ordering_with_subject_jitter(seed):
    sim = MRSimulator()
    _ordering_holds(sim.subject_signals(np.random.default_rng(seed), BRAIN))


def test_t1w_flip_angle_choice():
    """IXI's nominal 8 degrees is near the GM Ernst angle and gives almost no WM/GM contrast; 20 degrees is
    clearly T1-weighted (the documented choice)."""
    wm, gm, csf = (TISSUES[n] for n in ("wm", "gm", "csf"))
    nominal = SpoiledGradientEcho(tr=9.8, te=4.6, flip=8.0)
    chosen = DEFAULT_SEQUENCES["T1w"]
    assert chosen.flip == 20.0
    assert nominal(wm) / nominal(gm) < 1.1
    assert 1.2 < chosen(wm) / chosen(gm) < 1.5 and chosen(csf) / chosen(wm) < 0.4
    ernst_gm = np.degrees(np.arccos(np.exp(-9.8 / gm.t1)))
    assert abs(ernst_gm - 8.0) < 1.0


def test_jitter_is_small_and_seeded():
    a = jitter_tissues(np.random.default_rng(1), TISSUES, 0.03)
    b = jitter_tissues(np.random.default_rng(1), TISSUES, 0.03)
    c = jitter_tissues(np.random.default_rng(2), TISSUES, 0.03)
    assert a == b and a != c
    for n in TISSUES:
        assert abs(a[n].t1 / TISSUES[n].t1 - 1) <= 0.09 + 1e-9


def test_rician_noise_statistics():
    rng = np.random.default_rng(0)
    sigma = 2.0
    zero = add_rician_noise(np.zeros(200_000), sigma, rng)  # Rayleigh in the background
    assert zero.min() >= 0
    assert zero.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.02)
    high = add_rician_noise(np.full(200_000, 100.0), sigma, rng)  # ~Gaussian at high SNR
    assert high.mean() == pytest.approx(100.0 + sigma**2 / 200, rel=1e-3)
    assert high.std() == pytest.approx(sigma, rel=0.02)


def test_bias_field_smooth_positive():
    rng = np.random.default_rng(0)
    g = np.stack(np.meshgrid(np.linspace(-90, 90, 40), np.linspace(-90, 90, 40), [0.0], indexing="ij"), -1)
    pts = np.moveaxis(g, 2, 0)  # (1, 40, 40, 3)
    b = bias_field(pts, rng, 0.1)
    assert b.shape == (1, 40, 40) and b.min() > 0
    assert 0.02 < np.log(b).std() < 0.25
    assert np.abs(np.diff(np.log(b), axis=1)).max() < 0.05  # smooth: < 5 % change per 4.6 mm
    # the coarse-grid evaluation used by the simulator matches the dense one
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    dense = bias_field(pts, rng1, 0.1)
    coarse = eval_smooth(lambda p: bias_field(p, rng2, 0.1), pts)
    assert np.allclose(dense, coarse, rtol=2e-3)


def test_class_means_on_noisy_simulated_images():
    """Contrast ordering measured as class means of the labels on noisy, bias-corrupted mni slices."""
    p = DatasetPreparer(MNISource(), "unused", seed=0, spatial_size=(64, 64), max_slices_per_subject=4)
    r = p.source.prepare("sub-01", p)
    means = {c: [float(r.images[c][r.label == k].mean()) for k in (1, 2, 3)] for c in CONTRASTS}
    csf, gm, wm = means["T1w"]
    assert wm > gm > csf
    csf, gm, wm = means["PDw"]
    assert csf > gm > wm
    csf, gm, wm = means["T2w"]
    assert csf > gm > wm
    brain = r.label > 0
    for c in CONTRASTS:
        assert r.images[c].dtype == np.float32 and r.images[c].min() >= 0
        assert np.all(np.isfinite(r.images[c]))
    # background holds Rician noise of a few percent of the white-matter signal
    bg = r.images["T1w"][:, :4, :4]
    assert 0 < bg.mean() < 0.1 * means["T1w"][2]
    assert brain.any()


def test_simulator_rejects_bad_sequences():
    with pytest.raises(ValueError, match="sequence kind"):
        MRSimulator(sequences={"PDw": {"kind": "epi"}, "T1w": DEFAULT_SEQUENCES["T1w"], "T2w": {"kind": "x"}})
    with pytest.raises(ValueError, match="exactly"):
        MRSimulator(sequences={"T1w": DEFAULT_SEQUENCES["T1w"]})
