"""Tests of the Local Mutual Information operator (scripts/lmidiffusion/lmi.py) against its definition
(docs/method.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import scripts.lmidiffusion.cpu_workers as cpu_workers
import scripts.lmidiffusion.lmi_kernels as lmi_kernels
from scripts.lmidiffusion.lmi import LocalMutualInformation, local_mutual_information

EPS = 1e-10
DEFAULT_SIGMA = 8 / 255


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: on the shared 2-core machine a second intra-op thread only adds wake-up latency (10-40x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------
# plain reference, written from the definition: one K x K histogram per patch pair, float64


def reference_lmi(s, y, patch_size=3, search_size=3, num_bins=27, sigma=DEFAULT_SIGMA):
    """Returns (lmi, aligned, gap): gap is the margin between the best and the second-best candidate."""
    s, y = s.double(), y.double()
    B, _, H, W = s.shape
    p, r = patch_size, search_size
    a, h = p // 2, r // 2
    centres = torch.linspace(0.0, 1.0, num_bins, dtype=torch.float64)

    def weights(v):  # (..., P) -> (..., P, K)
        w = torch.exp(-0.5 * ((v.unsqueeze(-1) - centres) / sigma) ** 2)
        # (weights below 1e-100 change nothing at 1e-5 but make float64 products subnormal, which is very slow)
        return torch.where(w < 1e-100, torch.zeros_like(w), w)

    def entropy(hist):  # (..., M) -> bits
        prob = hist / (hist.sum(-1, keepdim=True) + EPS)
        return -(prob * torch.log2(prob + EPS)).sum(-1)

    patches_s = F.unfold(s, p, padding=a).transpose(1, 2)  # B, HW, P: P_s(i), zero padded
    y_pad = F.pad(y, (h, h, h, h))
    # P_y(j) for every j of the search-padded grid (zeros outside the image, i.e. zero padding of y)
    patches_y = F.unfold(y_pad, p, padding=a).transpose(1, 2).reshape(B, H + 2 * h, W + 2 * h, p * p)
    ws = weights(patches_s)
    hs = entropy(ws.sum(2))
    rows = torch.arange(H)[:, None].expand(H, W).reshape(-1)
    cols = torch.arange(W)[None, :].expand(H, W).reshape(-1)
    nmis, values = [], []
    # centre first, then row-major: the first maximum wins ties, as in the module
    shifts = [(0, 0)] + [(dy, dx) for dy in range(-h, h + 1) for dx in range(-h, h + 1) if (dy, dx) != (0, 0)]
    for dy, dx in shifts:
        cand = patches_y[:, h + dy : h + dy + H, h + dx : h + dx + W].reshape(B, H * W, p * p)
        wy = weights(cand)
        hy = entropy(wy.sum(2))
        joint = torch.einsum("bnpk,bnpl->bnkl", ws, wy).flatten(2)
        nmi = 2.0 * (hs + hy - entropy(joint)) / (hs + hy + EPS)
        inside = (rows + dy >= 0) & (rows + dy < H) & (cols + dx >= 0) & (cols + dx < W)
        nmis.append(nmi.masked_fill(~inside, -math.inf))
        values.append(y_pad[:, 0, h + dy : h + dy + H, h + dx : h + dx + W].reshape(B, H * W))
    nmis = torch.stack(nmis)  # R, B, HW
    best, idx = nmis.max(0)
    aligned = torch.stack(values).gather(0, idx[None])[0]
    if len(shifts) > 1:
        top2 = nmis.topk(2, dim=0).values
        gap = top2[0] - top2[1]
    else:
        gap = torch.full_like(best, math.inf)
    shape = (B, 1, H, W)
    return best.reshape(shape), aligned.reshape(shape), gap.reshape(shape)


def structured_image(batch, height, width, seed, levels=None):
    """Piecewise-constant blocks, a smooth ramp and a little noise: flat regions, edges and texture."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.rand(batch, 1, height // 3 + 1, width // 3 + 1, generator=gen, dtype=torch.float64)
    img = F.interpolate(blocks, size=(height, width), mode="nearest")
    ramp = torch.linspace(0, 0.3, width, dtype=torch.float64)
    img = 0.7 * img + ramp
    noisy = torch.rand(batch, 1, height, width, generator=gen, dtype=torch.float64) < 0.3
    img = img + noisy * 0.05 * torch.randn(batch, 1, height, width, generator=gen, dtype=torch.float64)
    img = img.clamp(0, 1)
    if levels is not None:
        img = torch.round(img * (levels - 1)) / (levels - 1)
    return img


def random_image(batch, height, width, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, height, width, generator=gen, dtype=torch.float64)


SIZES = [(9, 13), (16, 16), (11, 7)]
SETTINGS = [  # (patch_size, search_size, num_bins, sigma)
    (3, 3, 27, DEFAULT_SIGMA),
    (3, 3, 8, DEFAULT_SIGMA),
    (5, 3, 16, 0.05),
    (3, 5, 12, DEFAULT_SIGMA),
]


def _pair(kind, size, seed):
    height, width = size
    if kind == "random":
        return random_image(2, height, width, seed), random_image(2, height, width, seed + 1)
    s = structured_image(2, height, width, seed)
    y = 1.0 - structured_image(2, height, width, seed + 1, levels=6) ** 2
    y[:, :, : height // 2] = s[:, :, : height // 2] ** 0.5  # half related to s, half not
    return s, y


def _check_against_reference(s, y, setting, grad=False, min_clear=0.5):
    p, r, k, sigma = setting
    ref, ref_aligned, gap = reference_lmi(s, y, p, r, k, sigma)
    if grad:
        s = s.clone().requires_grad_(True)
    out, aligned = local_mutual_information(s, y, p, r, k, sigma)
    assert out.shape == ref.shape and aligned.shape == ref.shape
    assert out.dtype == torch.float64
    assert (out.detach() - ref).abs().max().item() <= 1e-5
    clear = gap > 1e-6  # compare the arg-max only where it is not a near tie
    assert clear.float().mean() >= min_clear
    assert torch.equal(aligned.detach()[clear], ref_aligned[clear])


@pytest.mark.parametrize("size", SIZES, ids=lambda v: f"{v[0]}x{v[1]}")
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda v: f"p{v[0]}r{v[1]}K{v[2]}")
@pytest.mark.parametrize("kind", ["random", "structured"])
def test_matches_reference(kind, setting, size):
    s, y = _pair(kind, size, seed=10 * SIZES.index(size) + (kind == "random"))
    _check_against_reference(s, y, setting)


@pytest.mark.parametrize("setting", SETTINGS[:2], ids=lambda v: f"K{v[2]}")
def test_matches_reference_with_grad_path(setting):
    """With requires_grad the value comes from the differentiable re-evaluation: same numbers."""
    s, y = _pair("structured", (12, 10), seed=3)
    _check_against_reference(s, y, setting, grad=True)


@pytest.mark.parametrize("setting", [SETTINGS[0], SETTINGS[2]], ids=lambda v: f"K{v[2]}")
def test_dense_chunked_path_matches_reference(monkeypatch, setting):
    """The GPU path (no bin windows), with tiny chunks and one image per sub-batch, run on the CPU."""
    monkeypatch.setattr(lmi_kernels, "bin_window_widths", lambda num_bins, sigma, device: [num_bins])
    monkeypatch.setattr(lmi_kernels, "chunk_budgets", lambda device: (20_000, 1))
    s, y = _pair("structured", (9, 13), seed=5)
    _check_against_reference(s, y, setting)
    _check_against_reference(s, y, setting, grad=True)


def test_parallel_chunk_workers_match_and_restore_thread_count(monkeypatch):
    """With 2 intra-op threads the CPU chunks run on 2 worker threads: same numbers, caller's setting restored."""
    monkeypatch.setattr(lmi_kernels, "chunk_budgets", lambda device: (20_000, 1 << 30))  # many chunks
    s, y = _pair("structured", (12, 11), seed=6)
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        y_grad = y.clone().requires_grad_(True)
        value, aligned = local_mutual_information(s, y_grad, num_bins=16)
        value.sum().backward()
        results[threads] = (local_mutual_information(s, y, num_bins=16), value.detach(), aligned, y_grad.grad)
        assert torch.get_num_threads() == threads
        with torch.inference_mode():  # helper threads must write into inference tensors too
            in_inference = local_mutual_information(s, y, num_bins=16)
        assert torch.equal(in_inference[0], results[threads][0][0])
    (search_1, value_1, aligned_1, grad_1), (search_2, value_2, aligned_2, grad_2) = results[1], results[2]
    assert torch.allclose(search_1[0], search_2[0], atol=1e-12, rtol=0) and torch.equal(search_1[1], search_2[1])
    assert torch.allclose(value_1, value_2, atol=1e-12, rtol=0) and torch.equal(aligned_1, aligned_2)
    assert torch.allclose(grad_1, grad_2, atol=1e-12, rtol=0)


def test_worker_errors_propagate():
    def fail(task):
        if task == 3:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cpu_workers.run_tasks(fail, list(range(6)), workers=2)


def test_float32_close_to_float64_reference():
    """float32 agrees with the float64 definition to ~1e-6 at K >= 16 (K = 8 with values exactly at bin centres is
    ill-conditioned, see the module docstring)."""
    s, y = _pair("structured", (16, 14), seed=4)
    for k in (16, 27):
        ref, _, _ = reference_lmi(s, y, num_bins=k)
        for grad in (False, True):
            y32 = y.float().requires_grad_(grad)
            out, _ = local_mutual_information(s.float(), y32, num_bins=k)
            assert out.dtype == torch.float32
            assert (out.detach().double() - ref).abs().max().item() < 1e-5


def test_small_and_degenerate_shapes():
    for size, setting in [((1, 6), (3, 3, 8, DEFAULT_SIGMA)), ((4, 1), (3, 3, 27, DEFAULT_SIGMA))]:
        s, y = _pair("random", size, seed=7)
        _check_against_reference(s, y, setting)
    s, y = _pair("random", (6, 5), seed=8)
    # single-pixel patches: one sample, a rank-one joint histogram, so I = 0 and LMI = 0 everywhere (all ties)
    _check_against_reference(s, y, (1, 1, 8, 0.1), min_clear=0.0)
    _check_against_reference(s, y, (1, 3, 27, DEFAULT_SIGMA), min_clear=0.0)
    assert local_mutual_information(s, y, 1, 3)[0].abs().max().item() < 1e-6


def test_batch_is_independent_per_image():
    s, y = _pair("structured", (10, 12), seed=9)
    s3, y3 = torch.cat([s, s[:1]]), torch.cat([y, y[:1].flip(-1)])
    out, aligned = local_mutual_information(s3, y3, num_bins=16)
    for b in range(3):
        one, one_aligned = local_mutual_information(s3[b : b + 1], y3[b : b + 1], num_bins=16)
        assert torch.allclose(out[b : b + 1], one, atol=1e-12, rtol=0)
        assert torch.equal(aligned[b : b + 1], one_aligned)


# ----------------------------------------------------------------------------------------------------------------
# gradients


def test_gradcheck_both_inputs():
    s = random_image(1, 5, 6, seed=11).requires_grad_(True)
    y = random_image(1, 5, 6, seed=12).requires_grad_(True)
    _, _, gap = reference_lmi(s.detach(), y.detach(), 3, 3, 12)
    assert gap.min().item() > 1e-3  # no arg-max ties within the finite-difference step

    def fn(s_, y_):
        return local_mutual_information(s_, y_, num_bins=12)

    assert torch.autograd.gradcheck(fn, (s, y), eps=1e-6, atol=1e-5, rtol=1e-3)


def test_gradient_as_energy_float32():
    """The inferers use -LMI(s, x) as an energy: finite, non-zero gradient w.r.t. x, batched, float32."""
    s = structured_image(2, 24, 20, seed=13).float()
    x = (s + 0.1 * torch.randn_like(s)).requires_grad_(True)
    module = LocalMutualInformation(num_bins=16)
    lmi, aligned = module(s, x)
    assert lmi.dtype == torch.float32 and aligned.dtype == torch.float32
    lmi.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    with torch.no_grad():
        lmi_nograd, aligned_nograd = module(s, x)
    assert torch.allclose(lmi.detach(), lmi_nograd, atol=1e-5)
    assert torch.equal(aligned.detach(), aligned_nograd)


def test_gradient_flows_to_winning_candidate_only():
    s = structured_image(1, 8, 8, seed=14)
    y = structured_image(1, 8, 8, seed=15).requires_grad_(True)
    lmi, aligned = local_mutual_information(s, y, num_bins=8)
    (grad_y,) = torch.autograd.grad(aligned[0, 0, 4, 4], y)
    assert grad_y.abs().sum().item() == pytest.approx(1.0)  # aligned is y at one pixel
    (grad_y,) = torch.autograd.grad(lmi[0, 0, 4, 4], y)
    nonzero = grad_y[0, 0].abs() > 0
    rows, cols = torch.nonzero(nonzero, as_tuple=True)
    assert rows.numel() > 0 and int(rows.max() - rows.min()) < 3 and int(cols.max() - cols.min()) < 3  # one patch


# ----------------------------------------------------------------------------------------------------------------
# properties


def test_intensity_inversion_invariance():
    """Bin centres are symmetric, so 1 - y only permutes histogram bins: equal away from the zero-padded border."""
    s = structured_image(2, 20, 18, seed=16)
    margin = 3 // 2 + 3 // 2
    for k in (8, 27):
        same, aligned = local_mutual_information(s, s, num_bins=k)
        inverted, aligned_inv = local_mutual_information(s, 1.0 - s, num_bins=k)
        inner = (slice(None), slice(None), slice(margin, -margin), slice(margin, -margin))
        # round-off and the truncated kernel tails (< 1e-7) only
        assert (same - inverted)[inner].abs().max().item() < 1e-6
        assert (same - inverted).abs().max().item() > 1e-3  # the border does differ: the check is not vacuous
        assert torch.allclose((1.0 - aligned_inv)[inner], aligned[inner], atol=1e-12)


@pytest.mark.parametrize(
    ("num_bins", "levels", "perm", "tol"),
    [
        (8, list(range(8)), [3, 7, 0, 5, 1, 6, 2, 4], 2e-3),  # all 8 bin levels, non-monotone
        (27, [3, 13, 23], [1, 2, 0], 1e-3),  # levels 10 bins apart: the smooth 27-bin kernels do not overlap
    ],
)
def test_nonmonotone_remapping_invariance(num_bins, levels, perm, tol):
    """y = f(s) for a one-to-one, non-monotone map of bin-centre levels: LMI(s, f(s)) ~ LMI(s, s) off the border.

    Not exact: a kernel puts weight on neighbouring bins (3e-5 at K = 8; 0.47 at K = 27), and which levels share
    bins changes under the map, so only levels whose kernels do not overlap give (nearly) equal histograms.
    """
    gen = torch.Generator().manual_seed(17)
    lev = torch.tensor(levels)
    index = torch.randint(0, len(levels), (2, 1, 7, 7), generator=gen)
    index = F.interpolate(index.double(), size=(28, 28), mode="nearest").long()
    flip = torch.rand(index.shape, generator=gen) < 0.25
    index[flip] = torch.randint(0, len(levels), (int(flip.sum()),), generator=gen)
    s = lev[index].double() / (num_bins - 1)
    y = lev[torch.tensor(perm)][index].double() / (num_bins - 1)
    same, _ = local_mutual_information(s, s, num_bins=num_bins)
    mapped, _ = local_mutual_information(s, y, num_bins=num_bins)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    assert same[inner].mean() > 0.3  # there is structure to compare
    assert (same - mapped)[inner].abs().max().item() < tol
    # a non-invertible map (two levels merged) does lose information
    merged = torch.where(index == 1, torch.zeros_like(index), index)
    y_merged = lev[merged].double() / (num_bins - 1)
    lossy, _ = local_mutual_information(s, y_merged, num_bins=num_bins)
    assert (same - lossy)[inner].max().item() > 0.1


def test_zero_on_flat_regions():
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-5)):  # 0 up to eps terms and truncated tails
        for k in (8, 27):
            s = torch.full((1, 1, 12, 12), 0.37, dtype=dtype)
            y = torch.full((1, 1, 12, 12), 0.81, dtype=dtype)
            for other in (s, y):
                lmi, _ = local_mutual_information(s, other, num_bins=k)
                inner = lmi[..., 2:-2, 2:-2]  # (the zero padding makes the border patches non-flat)
                assert inner.abs().max().item() < tol
    # a flat region inside a structured image, at least p//2 + r//2 pixels from any edge
    s = structured_image(1, 20, 20, seed=18)
    s[..., 4:16, 4:16] = 0.6
    lmi, _ = local_mutual_information(s, s)
    assert lmi[..., 6:14, 6:14].abs().max().item() < 1e-6
    assert lmi.max().item() > 0.3


def test_higher_on_edges_than_on_noise():
    """Step edge s (0.2 | 0.8) against y = the same edge with another, inverted contrast (0.7 | 0.15), and against
    independent uniform noise u. On every pixel whose patch straddles the edge (columns 7-8, rows 2..13):
    LMI(s, y) > LMI(s, u) + 0.03, and the mean margin is > 0.08 (measured: 0.06 / 0.11 at K = 27, 0.24 / 0.33 at
    K = 8). The Parzen kernel caps a two-level 6:3 patch at NMI 0.34 at K = 27 (its 1.75-bit kernel entropy adds
    to H(a) once and to H(a, b) twice), 0.78 at K = 8. On the flat part both are 0."""
    s = torch.full((1, 1, 16, 16), 0.2, dtype=torch.float64)
    s[..., 8:] = 0.8
    y = torch.where(s > 0.5, 0.15, 0.7)
    u = random_image(1, 16, 16, seed=19)
    edge = (slice(None), slice(None), slice(2, -2), slice(7, 9))
    flat = (slice(None), slice(None), slice(2, -2), slice(2, 5))
    for k in (8, 27):
        related, _ = local_mutual_information(s, y, num_bins=k)
        noise, _ = local_mutual_information(s, u, num_bins=k)
        assert (related[edge] - noise[edge]).min().item() > 0.03
        assert (related[edge] - noise[edge]).mean().item() > 0.08
        assert related[flat].abs().max().item() < 1e-6
        assert noise[flat].abs().max().item() < 1e-6


def test_half_precision_inputs_are_supported():
    s = structured_image(1, 10, 10, seed=20)
    out64, _ = local_mutual_information(s, s.flip(-1), num_bins=16)
    out16, aligned16 = local_mutual_information(s.bfloat16(), s.flip(-1).bfloat16(), num_bins=16)
    assert out16.dtype == torch.bfloat16 and aligned16.dtype == torch.bfloat16
    assert (out16.double() - out64).abs().max().item() < 0.1  # bfloat16 rounds the inputs themselves


def test_module_matches_functional_and_repr():
    module = LocalMutualInformation(patch_size=3, search_size=5, num_bins=12, sigma=0.04)
    assert "num_bins=12" in repr(module)
    s, y = _pair("structured", (10, 9), seed=21)
    out_m, al_m = module(s, y)
    out_f, al_f = local_mutual_information(s, y, 3, 5, 12, 0.04)
    assert torch.equal(out_m, out_f) and torch.equal(al_m, al_f)


# ----------------------------------------------------------------------------------------------------------------
# input validation


def _bad_inputs():
    good = torch.rand(1, 1, 6, 6)
    nan = good.clone()
    nan[0, 0, 1, 1] = float("nan")
    inf = good.clone()
    inf[0, 0, 2, 2] = float("inf")
    return [
        ("s_not_4d", good[0], good, "s"),
        ("y_not_4d", good, good[None], "y"),
        ("s_two_channels", good.repeat(1, 2, 1, 1), good.repeat(1, 2, 1, 1), "channel"),
        ("mismatched_shapes", good, torch.rand(1, 1, 6, 7), "same shape"),
        ("mismatched_batch", good, torch.rand(2, 1, 6, 6), "same shape"),
        ("s_nan", nan, good, "s contains NaN"),
        ("y_inf", good, inf, "y contains NaN or Inf"),
        ("s_integer", torch.ones(1, 1, 6, 6, dtype=torch.long), good, "s must be a floating-point"),
        ("y_not_tensor", good, [[0.0]], "y must be a torch.Tensor"),
    ]


@pytest.mark.parametrize(("name", "s", "y", "message"), _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_inputs_raise(name, s, y, message):
    with pytest.raises(ValueError, match=message):
        local_mutual_information(s, y)
    with pytest.raises(ValueError, match=message):
        LocalMutualInformation()(s, y)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"patch_size": 4}, "patch_size"),
        ({"patch_size": 0}, "patch_size"),
        ({"patch_size": 3.0}, "patch_size"),
        ({"patch_size": True}, "patch_size"),
        ({"search_size": 2}, "search_size"),
        ({"search_size": 1.5}, "search_size"),
        ({"num_bins": 1}, "num_bins"),
        ({"num_bins": 8.0}, "num_bins"),
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -0.1}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"sigma": "0.1"}, "sigma"),
    ],
)
def test_bad_parameters_raise(kwargs, name):
    good = torch.rand(1, 1, 6, 6)
    with pytest.raises(ValueError, match=name):
        LocalMutualInformation(**kwargs)
    with pytest.raises(ValueError, match=name):
        local_mutual_information(good, good, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    s, y = _pair("structured", (33, 40), seed=22)
    for dtype, tol in ((torch.float64, 1e-7), (torch.float32, 1e-3)):
        cpu, cpu_aligned = local_mutual_information(s.to(dtype), y.to(dtype))
        y_cuda = y.to("cuda", dtype).requires_grad_(True)
        gpu, gpu_aligned = local_mutual_information(s.to("cuda", dtype), y_cuda)
        assert gpu.device.type == "cuda" and gpu_aligned.device.type == "cuda"
        assert (gpu.detach().cpu() - cpu).abs().max().item() < tol
        gpu.sum().backward()
        assert torch.isfinite(y_cuda.grad).all()
    ref, _, _ = reference_lmi(s, y)
    gpu64, _ = local_mutual_information(s.cuda(), y.cuda())
    assert (gpu64.cpu() - ref).abs().max().item() <= 1e-5
