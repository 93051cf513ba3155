"""Local Mutual Information (LMI): a differentiable, accelerated operator (docs/method.md, "Local mutual information").

Definition (binding). For images ``s`` (source) and ``y`` of shape (B, 1, H, W), scaled to [0, 1]::

    LMI(s, y)_i = max over j in the r x r neighbourhood of i (inside the image) of NMI(P_s(i), P_y(j))
    NMI(a, b)   = 2 I(a; b) / (H(a) + H(b) + eps),   I(a; b) = H(a) + H(b) - H(a, b)   (bits)

``P_x(i)`` is the p x p patch of ``x`` centred on ``i`` with zero padding. Entropies come from Parzen
histograms with ``K`` bin centres ``c = linspace(0, 1, K)`` and the kernel ``w(v, c) = exp(-0.5 ((v - c) / sigma)^2)``:
``h_a(k) = sum_n w(a_n, c_k)``, ``h_ab(k, l) = sum_n w(a_n, c_k) w(b_n, c_l)``, ``p = h / (sum h + eps)``,
``H = -sum p log2(p + eps)``, ``eps = 1e-10``. ``aligned`` is ``y`` at the arg-max ``j`` (first maximum in the
order centre, then row-major over the search window). A flat patch pair has a rank-one joint histogram, so
``I = 0`` and NMI = 0 there. Two consequences of the definition worth knowing: the marginal histograms are not
the marginals of the joint one (a sample's kernel total ``sum_k w(v, c_k)`` varies with ``v``: 0.15 to 1 at
K = 8, ~2.05 at K = 27 away from 0 and 1), so NMI can exceed 1 and I can be slightly negative; and the kernel's
own entropy (1.75 bits at K = 27) caps the NMI of structured patches well below 1 (0.34 for a 6:3 two-level
patch at K = 27, 0.78 at K = 8).

How it is computed fast (shared kernel weights, joint histograms as batched matrix products, skipped negligible
bins, reused buffers, helper threads, an exact analytic gradient of each winning pair) is in
:mod:`scripts.lmidiffusion.lmi_kernels`; the measurements behind each step are in docs/method.md ("Computing LMI
fast").

Inputs outside [0, 1] are allowed (the definition still applies; their weights just become small). Half-precision
inputs are computed in float32 and cast back. float32 results agree with the float64 definition to ~1e-6, except
where both patches are nearly deterministic at small K (K = 8, values at bin centres: entropies ~1e-3 bits,
so NMI is a ratio of tiny numbers), where float32 round-off reaches ~2e-4.
"""

from __future__ import annotations

import logging
import math
import numbers

import torch
import torch.nn.functional as F

from scripts.lmidiffusion import lmi_kernels as kernels
from scripts.lmidiffusion.cpu_workers import cpu_threading

logger = logging.getLogger(__name__)

__all__ = ["LocalMutualInformation", "local_mutual_information"]


def _check_odd_size(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a positive odd integer, got {value!r}")
    value = int(value)
    if value < 1 or value % 2 == 0:
        raise ValueError(f"{name} must be a positive odd integer, got {value}")
    return value


def _check_params(patch_size, search_size, num_bins, sigma) -> tuple[int, int, int, float]:
    p = _check_odd_size(patch_size, "patch_size")
    r = _check_odd_size(search_size, "search_size")
    if isinstance(num_bins, bool) or not isinstance(num_bins, numbers.Integral) or int(num_bins) < 2:
        raise ValueError(f"num_bins must be an integer >= 2, got {num_bins!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(float(sigma)):
        raise ValueError(f"sigma must be a finite positive number, got {sigma!r}")
    if float(sigma) <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    return p, r, int(num_bins), float(sigma)


def _check_inputs(s, y) -> tuple[torch.Tensor, torch.Tensor]:
    for name, x in (("s", s), ("y", y)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4D (B, 1, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != 1:
            raise ValueError(f"{name} must have exactly 1 channel, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if s.shape != y.shape:
        raise ValueError(f"s and y must have the same shape, got s {tuple(s.shape)} and y {tuple(y.shape)}")
    if s.device != y.device:
        raise ValueError(f"s and y must be on the same device, got s on {s.device} and y on {y.device}")
    for name, x in (("s", s), ("y", y)):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf")
    dtype = torch.promote_types(s.dtype, y.dtype)
    return s.to(dtype), y.to(dtype)


def local_mutual_information(
    s: torch.Tensor,
    y: torch.Tensor,
    patch_size: int = 3,
    search_size: int = 3,
    num_bins: int = 27,
    sigma: float = 8 / 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local mutual information of ``y`` with respect to ``s`` (see the module docstring).

    Args:
        s: source image, (B, 1, H, W), floating point, nominally in [0, 1].
        y: other image, same shape.
        patch_size: odd patch side p.
        search_size: odd search window side r.
        num_bins: number K >= 2 of Parzen bin centres on [0, 1].
        sigma: Gaussian kernel width (> 0).

    Returns:
        ``(lmi, aligned)``, both (B, 1, H, W) in the dtype of the inputs: the max NMI over the search window, and
        ``y`` at the arg-max. Differentiable with respect to ``s`` and ``y``.
    """
    p, r, num_bins, sigma = _check_params(patch_size, search_size, num_bins, sigma)
    s, y = _check_inputs(s, y)
    out_dtype = s.dtype
    if s.dtype not in (torch.float32, torch.float64):
        s, y = s.float(), y.float()
    B, _, H, W = s.shape
    if s.numel() == 0:
        empty = s.new_zeros(s.shape)
        return empty.to(out_dtype), y.clone().to(out_dtype)
    a, h = p // 2, r // 2
    dev = s.device
    tiers = kernels.bin_window_widths(num_bins, sigma, dev)
    with cpu_threading(dev) as workers:  # the whole call: see cpu_threading
        chunk_entries, table_bytes = kernels.chunk_budgets(dev)
        per_image = (H + 2 * (a + h)) * (W + 2 * (a + h)) * num_bins * (2 + 4 * p * p) * s.element_size()
        sub = max(1, table_bytes // per_image)
        logger.debug(
            "LMI of %s on %s, K=%d: bin windows %s, %d image(s) per sub-batch",
            tuple(s.shape),
            dev,
            num_bins,
            tiers,
            sub,
        )
        best = torch.empty(B, H, W, device=dev, dtype=s.dtype)
        arg = torch.empty(B, H, W, device=dev, dtype=torch.long)
        s_d, y_d = s.detach()[:, 0], y.detach()[:, 0]
        for b in range(0, B, sub):
            sl = slice(b, b + sub)
            best[sl], arg[sl] = kernels.search_max_nmi(s_d[sl], y_d[sl], p, r, num_bins, sigma, tiers, workers)

        # flat index of the winning candidate in the search-padded (H + 2h, W + 2h) grid
        rows = torch.arange(H, device=dev)[:, None]
        cols = torch.arange(W, device=dev)[None, :]
        win = ((rows + arg // r) * (W + 2 * h) + cols + arg % r).reshape(B, 1, H * W)
        y_h = F.pad(y, (h, h, h, h))
        aligned = y_h.reshape(B, 1, -1).gather(2, win).reshape(B, 1, H, W)

        if torch.is_grad_enabled() and (s.requires_grad or y.requires_grad):
            # flat sample indices of each pixel's s patch (in s padded by a) and winning y patch (y padded by a + h)
            g = a + h
            d = torch.arange(p, device=dev)
            bb = torch.arange(B, device=dev)[:, None, None, None]
            i, j = rows[None, :, :, None], cols[None, :, :, None]
            s_off = (d[:, None] * (W + 2 * a) + d[None, :]).reshape(-1)
            idx_s = (bb * (H + 2 * a) * (W + 2 * a) + i * (W + 2 * a) + j + s_off).reshape(B * H * W, p * p)
            ey, ex = (arg // r)[..., None], (arg % r)[..., None]
            y_off = (d[:, None] * (W + 2 * g) + d[None, :]).reshape(-1)
            idx_y = (bb * (H + 2 * g) * (W + 2 * g) + (i + ey) * (W + 2 * g) + j + ex + y_off).reshape(B * H * W, p * p)
            s_flat = F.pad(s, (a, a, a, a)).reshape(-1)
            y_flat = F.pad(y, (g, g, g, g)).reshape(-1)
            centres = torch.linspace(0.0, 1.0, num_bins, device=dev, dtype=s.dtype)
            step = max(1, chunk_entries // (4 * num_bins * num_bins))  # smaller: many tensors per pair
            lmi = kernels.PairNMI.apply(s_flat, y_flat, idx_s, idx_y, centres, sigma, step).reshape(B, 1, H, W)
        else:
            lmi = best.unsqueeze(1)
    return lmi.to(out_dtype), aligned.to(out_dtype)


class LocalMutualInformation(torch.nn.Module):
    """Module form of :func:`local_mutual_information`; ``forward(s, y)`` returns ``(lmi, aligned)``."""

    def __init__(self, patch_size: int = 3, search_size: int = 3, num_bins: int = 27, sigma: float = 8 / 255):
        super().__init__()
        self.patch_size, self.search_size, self.num_bins, self.sigma = _check_params(
            patch_size, search_size, num_bins, sigma
        )

    def forward(self, s: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return local_mutual_information(s, y, self.patch_size, self.search_size, self.num_bins, self.sigma)

    def extra_repr(self) -> str:
        return (
            f"patch_size={self.patch_size}, search_size={self.search_size}, "
            f"num_bins={self.num_bins}, sigma={self.sigma:.6g}"
        )
