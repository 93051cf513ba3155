"""The computation behind :func:`scripts.lmidiffusion.lmi.local_mutual_information`: the same numbers as the
definition, with less work per pixel (measurements: docs/method.md, "Computing LMI fast"; the layer against the
plain way: ``benchmarks/bench_lmi.py``).

The plain way unfolds every patch pair and builds one K x K histogram each (vectorised over pixels). Each step
below removes work that the plain way repeats or that does not change the result.

1. Shared kernel weights. The Gaussian weights are computed once per pixel (a (H+2g, W+2g, K) map,
   ``g = p//2 + r//2``) and every patch reads them; the plain way recomputes them for each of the r*r pairs.
   The marginal histograms are p x p box sums of that map, so H(P_s(i)) is one map, and H(P_y(j)) is one map
   over the search-padded grid that the r*r candidates read shifted (no per-pair marginal work). The joint
   normaliser ``Z = sum_n (sum_k w(a_n, c_k)) (sum_l w(b_n, c_l))`` is a box sum of a product of per-pixel
   totals, one small map per shift; the y rows are scaled by ``1 / (Z + eps)`` before the product, which then
   yields ``p`` directly. Weights below exp(-36) are set to 0: subnormal floats make ``exp`` several times slower.
2. Joint histograms as batched matrix products. For pixel ``i`` and shift ``d`` the joint histogram is
   ``U_i^T V_{i+d}`` with ``U`` (p*p x K) the weight rows of the s patch and ``V`` those of the y patch. The
   patch matrices are materialised once per grid position (``as_strided`` copy); the r*r candidates of a pixel
   are rows ``q + offset_d`` of the y table (``index_select``), and one ``bmm`` per chunk gives all r*r joint
   histograms. "Outer product per pixel, then a p x p box filter" is memory bound and slower than the ``bmm``;
   the ``bmm`` runs as (K x p*p)(p*p x r*r*K), the faster of the two orientations.
3. Then the logarithms are the cost: ``sum p log(p + eps)`` over K*K entries per pixel and shift costs more than
   the ``bmm``. So the entries that are provably negligible are skipped: beyond
   ``sigma * sqrt(6^2 + (delta / 2 sigma)^2)`` (delta the bin spacing) a sample's weight is below 1.5e-8 of its
   own largest bin weight, so a patch only touches the bins within that margin of its [min, max] intensity
   (clamped to [0, 1]). Each grid position gets a bin window ``[k0, k0 + L)``, ``L`` the narrowest of a few
   widths that fits (12, 16 or 27 at K = 27; 8 or 16 at K = 16); the s side uses the s patch's window, the y side
   the widest of its r*r candidates'. Pixels are grouped by (s width, y width) and each group computes L_s x L_y
   entries instead of K x K. On brain images most pixels fit a narrow window; against a noisy diffusion sample
   the clean source side still fits; where nothing fits (noise against noise) the cost stays that of the dense
   computation. At K = 8 the only narrower width, 5 of 8 bins, is slower than dense, so K = 8 stays dense.
   Error: ~1e-8 in NMI on the tests' images (checked against a plain float64 implementation at 1e-5).
4. Memory traffic. Chunks of ~1 M histogram entries written into per-thread buffers (``out=``), reused from chunk
   to chunk: allocating each chunk's tensors anew page-faults. Images go through in sub-batches of at most 256 MB
   of tables, so peak memory does not grow with the batch.
5. Threads. The ops are many and small; under OpenMP each ends in a barrier, and on a shared CPU a barrier waits
   whenever another job holds a core, which can make a call many times slower. So on the CPU the layer runs with
   one intra-op thread and spreads independent chunks over as many helper threads as the caller had intra-op
   threads (scoped to the call; ``torch.get_num_threads()`` is restored). On a GPU everything is dense (no
   windows) and serial.
6. Gradients. The search runs under ``no_grad``. When a gradient is needed, each pixel's winning pair is
   evaluated again exactly (dense K x K) by an autograd Function whose backward is analytic and recomputes
   chunk by chunk: about 1/r^2 of the search's pairs, nothing of size B*H*W*K^2 is stored (an autograd graph
   of the plain way stores every pair's K x K histogram). The gradient of the max is the gradient
   of the winning candidate; ``aligned`` is a gather of ``y`` and is differentiable with respect to ``y``.
"""

from __future__ import annotations

import logging
import math
import threading

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from scripts.lmidiffusion.cpu_workers import cpu_threading, run_tasks

logger = logging.getLogger(__name__)


EPS = 1e-10
# Bins whose kernel weight is below exp(-TAIL_SIGMAS^2 / 2) = 1.5e-8 of a sample's largest bin weight, for every
# sample of a patch, are dropped from that patch's joint histogram (see _tail_margin).
TAIL_SIGMAS = 6.0
_LN2 = math.log(2.0)
_LOG_CUTOFF = -36.0


def _entropy_bits(hist: torch.Tensor, dim: int) -> torch.Tensor:
    """Entropy in bits of the unnormalised histograms along ``dim`` (definition: p = h / (sum h + eps))."""
    prob = hist / (hist.sum(dim, keepdim=True) + EPS)
    return -(prob * torch.log2(prob + EPS)).sum(dim)


def _box_sum(x: torch.Tensor, p: int, dims: tuple[int, int]) -> torch.Tensor:
    """Sums over p x p windows along ``dims`` (valid part only, indexed by the window's top-left corner)."""
    for dim in dims:
        n = x.shape[dim] - p + 1
        acc = x.narrow(dim, 0, n).clone()
        for k in range(1, p):
            acc += x.narrow(dim, k, n)
        x = acc
    return x


def _kernel(values: torch.Tensor, centres: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian Parzen weights ``values[..., None]`` against ``centres``, shape (..., K).

    Weights below exp(-36) (2.3e-16) are set to exactly 0: far below anything the entropies can resolve, and it
    keeps every product of two weights a normal float32, since subnormal numbers make exp, bmm and log several
    times slower on x86 CPUs.
    """
    arg = (values.unsqueeze(-1) - centres).square_().mul_(-0.5 / sigma**2)
    return torch.exp(arg.clamp_min(_LOG_CUTOFF)).mul_(arg > _LOG_CUTOFF)


def _entropy_and_grad(hist: torch.Tensor, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Entropy in bits of the unnormalised histograms (n, M) and, if asked, its gradient with respect to ``hist``.

    With Z = sum h, p = h / (Z + eps), H = -sum p log2(p + eps) and g = dH/dp = -(log2(p + eps) + p / ((p + eps) ln 2)):
    dH/dh_j = (g_j - sum_k g_k p_k) / (Z + eps).
    """
    z_eps = hist.sum(-1, keepdim=True) + EPS
    prob = hist / z_eps
    log_p = torch.log2(prob + EPS)
    entropy = -(prob * log_p).sum(-1)
    if not need_grad:
        return entropy, None
    g = log_p.add_(prob / ((prob + EPS) * _LN2)).neg_()
    return entropy, (g - (g * prob).sum(-1, keepdim=True)) / z_eps


def _pair_chunk(u, v, grad_out=None, a=None, b=None, centres=None, sigma=None):
    """Exact (dense K x K) NMI of patch pairs from their kernel weights u, v: (n, p*p, K).

    With ``grad_out`` (n,), returns instead the gradients with respect to the sample values ``a``, ``b`` (n, p*p).
    """
    need_grad = grad_out is not None
    h_a, g_a = _entropy_and_grad(u.sum(1), need_grad)
    h_b, g_b = _entropy_and_grad(v.sum(1), need_grad)
    joint = torch.bmm(u.transpose(1, 2), v)  # n, K, K
    n, K = joint.shape[0], joint.shape[1]
    h_ab, g_ab = _entropy_and_grad(joint.view(n, K * K), need_grad)
    h_sum = h_a + h_b + EPS
    if not need_grad:
        return 2.0 * (h_a + h_b - h_ab) / h_sum
    # NMI = 2 (S - H_ab) / (S + eps), S = H_a + H_b
    c_s = (grad_out * 2.0 * (h_ab + EPS) / h_sum.square()).view(n, 1, 1)
    c_ab = (grad_out * -2.0 / h_sum).view(n, 1, 1)
    g_ab = g_ab.view(n, K, K)
    grads = []
    for w, other, g_marg, values, g_joint in ((u, v, g_a, a, g_ab.transpose(1, 2)), (v, u, g_b, b, g_ab)):
        d_w = torch.bmm(other, g_joint).mul_(c_ab).add_(g_marg.unsqueeze(1) * c_s)  # dNMI/dw: n, P, K
        # dw/dx = w (c - x) / sigma^2
        t = d_w.mul_(w)
        grads.append(((t * centres).sum(-1) - values * t.sum(-1)) / sigma**2)
    return grads


class PairNMI(torch.autograd.Function):
    """NMI of one patch pair per pixel, chunked, with an analytic backward that recomputes each chunk.

    Inputs are the flattened zero-padded images and, per pixel, the flat indices of its p*p samples in each
    (the s patch and the winning y candidate). Kernel weights are computed once per pixel and gathered per
    patch. Nothing of size n*K^2 is kept between forward and backward, so memory is bounded by the chunk.
    """

    @staticmethod
    def forward(ctx, s_flat, y_flat, idx_s, idx_y, centres, sigma: float, step: int):
        ctx.save_for_backward(s_flat, y_flat, idx_s, idx_y, centres)
        ctx.sigma, ctx.step = sigma, step
        with cpu_threading(s_flat.device) as workers:
            w_s, w_y = _kernel(s_flat, centres, sigma), _kernel(y_flat, centres, sigma)  # pixels, K
            n_all, P = idx_s.shape
            out = torch.empty(n_all, device=s_flat.device, dtype=s_flat.dtype)

            def chunk(sl: slice) -> None:
                u = w_s.index_select(0, idx_s[sl].reshape(-1)).view(-1, P, w_s.shape[1])
                v = w_y.index_select(0, idx_y[sl].reshape(-1)).view(-1, P, w_y.shape[1])
                out[sl] = _pair_chunk(u, v)

            run_tasks(chunk, [slice(i, i + step) for i in range(0, n_all, step)], workers)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        s_flat, y_flat, idx_s, idx_y, centres = ctx.saved_tensors
        sigma, step = ctx.sigma, ctx.step
        with cpu_threading(s_flat.device) as workers:  # every op: the OpenMP barriers are what it avoids
            w_s, w_y = _kernel(s_flat, centres, sigma), _kernel(y_flat, centres, sigma)
            n_all, P = idx_s.shape
            grad_a = torch.empty(n_all, P, device=s_flat.device, dtype=s_flat.dtype)  # per sample, disjoint per chunk
            grad_b = torch.empty_like(grad_a)

            def chunk(sl: slice) -> None:
                i_s, i_y = idx_s[sl].reshape(-1), idx_y[sl].reshape(-1)
                u = w_s.index_select(0, i_s).view(-1, P, w_s.shape[1])
                v = w_y.index_select(0, i_y).view(-1, P, w_y.shape[1])
                a, b = s_flat[i_s].view(-1, P), y_flat[i_y].view(-1, P)
                grad_a[sl], grad_b[sl] = _pair_chunk(u, v, grad_out[sl], a, b, centres, sigma)

            run_tasks(chunk, [slice(i, i + step) for i in range(0, n_all, step)], workers)
            grad_s = torch.zeros_like(s_flat).index_add_(0, idx_s.reshape(-1), grad_a.reshape(-1))
            grad_y = torch.zeros_like(y_flat).index_add_(0, idx_y.reshape(-1), grad_b.reshape(-1))
        return grad_s, grad_y, None, None, None, None, None


def _tail_margin(num_bins: int, sigma: float) -> float:
    """Intensity distance beyond which a bin's weight is < exp(-TAIL_SIGMAS^2 / 2) of the sample's largest weight.

    The nearest bin of a sample is at most delta / 2 away, so its weight is at least exp(-(delta / 2 sigma)^2 / 2)
    (0.074 at K = 8, sigma = 8/255): the margin grows accordingly so that the cut is relative to the sample's own mass.
    """
    delta = 1.0 / (num_bins - 1)
    return sigma * math.sqrt(TAIL_SIGMAS**2 + (delta / (2.0 * sigma)) ** 2)


def bin_window_widths(num_bins: int, sigma: float, device: torch.device) -> list[int]:
    """Bin-window widths to try, narrowest first; the last is always ``num_bins`` (dense)."""
    if device.type != "cpu":
        # On a GPU the grouping (host syncs, small launches) costs more than the arithmetic it saves.
        return [num_bins]
    delta = 1.0 / (num_bins - 1)
    flat = int(math.floor(2.0 * _tail_margin(num_bins, sigma) / delta)) + 1  # widest window of a constant patch
    # (at K = 8 the only candidate, 5 of 8 bins, is slower than dense: docs/method.md, "Computing LMI fast")
    return [width for width in (flat + 2, flat + 6) if width <= 0.6 * num_bins] + [num_bins]


def chunk_budgets(device: torch.device) -> tuple[int, int]:
    """(histogram entries per chunk, bytes of per-position tables per sub-batch) for ``device``."""
    if device.type == "cpu":
        return 1 << 20, 256 << 20
    return 1 << 25, 4 << 30


@torch.no_grad()
def search_max_nmi(
    s: torch.Tensor, y: torch.Tensor, p: int, r: int, num_bins: int, sigma: float, tiers: list[int], workers: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max NMI over the search window and its shift index (row-major in the r x r window); s, y: (B, H, W)."""
    B, H, W = s.shape
    a, h = p // 2, r // 2
    g = a + h
    P, R, K = p * p, r * r, num_bins
    Hp, Wp = H + 2 * g, W + 2 * g
    dev, dt = s.device, s.dtype
    N = B * H * W
    centres = torch.linspace(0.0, 1.0, K, device=dev, dtype=dt)
    chunk_entries, _ = chunk_budgets(dev)

    sp = F.pad(s, (g, g, g, g))  # B, Hp, Wp
    yp = F.pad(y, (g, g, g, g))
    ws = _kernel(sp, centres, sigma)  # B, Hp, Wp, K
    wy = _kernel(yp, centres, sigma)

    # Grid positions are indexed by the top-left corner of their patch, q = b * Hp * Wp + row * Wp + col: the s
    # patch of pixel (i, j) starts at (i + h, j + h), its candidate for shift (ey, ex) at (i + ey, j + ex).
    shifts = [(ey, ex) for ey in range(r) for ex in range(r)]
    hs = _entropy_bits(_box_sum(ws, p, dims=(1, 2)), -1)[:, h : h + H, h : h + W].reshape(N, 1)
    hy_all = _entropy_bits(_box_sum(wy, p, dims=(1, 2)), -1)  # B, H + 2h, W + 2h
    hy = torch.stack([hy_all[:, ey : ey + H, ex : ex + W] for ey, ex in shifts], -1).reshape(N, R)
    ts, ty = ws.sum(-1), wy.sum(-1)  # per-sample kernel totals
    ts_win = ts[:, h : h + H + 2 * a, h : h + W + 2 * a]
    prods = torch.stack([ts_win * ty[:, ey : ey + H + 2 * a, ex : ex + W + 2 * a] for ey, ex in shifts], -1)
    z = _box_sum(prods, p, dims=(1, 2)).reshape(N, R)  # joint normaliser: sum_n (sum_k w_s) (sum_l w_y)
    inv_z = 1.0 / (z + EPS)

    # patch matrices of every position (positions past a row's end are never used)
    qmax = (B - 1) * Hp * Wp + (H + 2 * h - 1) * Wp + W + 2 * h
    u_full = ws.reshape(-1).as_strided((qmax, p, p, K), (K, Wp * K, K, 1)).reshape(qmax, P, K)
    v_full = wy.reshape(-1).as_strided((qmax, K, p, p), (K, 1, Wp * K, K)).reshape(qmax, K, P)
    bb = torch.arange(B, device=dev)[:, None, None]
    rows = torch.arange(H, device=dev)
    cols = torch.arange(W, device=dev)
    q_s = (bb * Hp * Wp + (rows[:, None] + h) * Wp + cols[None, :] + h).reshape(N)
    offsets = torch.tensor([(ey - h) * Wp + (ex - h) for ey, ex in shifts], device=dev)

    if len(tiers) > 1:
        delta = 1.0 / (K - 1)
        margin = _tail_margin(K, sigma)

        def window(xp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """First bin and number of bins within the tail margin of the patch's (clamped) intensity range."""
            xc = xp.clamp(0.0, 1.0).unsqueeze(1)
            hi_v = F.max_pool2d(xc, p, stride=1)[:, 0]
            lo_v = -F.max_pool2d(-xc, p, stride=1)[:, 0]
            lo = torch.ceil((lo_v - margin) / delta).clamp(0, K - 1)
            hi = torch.floor((hi_v + margin) / delta).clamp(0, K - 1)
            flat = torch.zeros(2, B, Hp, Wp, device=dev, dtype=torch.long)
            flat[0, :, : H + 2 * h, : W + 2 * h] = lo.long()
            flat[1, :, : H + 2 * h, : W + 2 * h] = (hi - lo + 1).long()
            flat = flat.reshape(2, -1)[:, :qmax]
            return flat[0], flat[1]

        lo_s, span_s = window(sp)
        lo_y, span_y = window(yp)
        widths = torch.tensor(tiers, device=dev)
        tier_s = torch.searchsorted(widths, span_s[q_s])
        tier_y = torch.searchsorted(widths, span_y[q_s[:, None] + offsets].amax(1))
        group_id = tier_s * len(tiers) + tier_y
        used = set(torch.unique(group_id).tolist())
        u_tab, v_tab = {}, {}
        for t, width in enumerate(tiers):
            ar = torch.arange(width, device=dev)
            if width == K:
                u_tab[t], v_tab[t] = u_full, v_full
                continue
            if any(gid // len(tiers) == t for gid in used):
                k0 = lo_s.clamp(max=K - width)
                u_tab[t] = torch.gather(u_full, 2, (k0[:, None, None] + ar).expand(qmax, P, width))
            if any(gid % len(tiers) == t for gid in used):
                k0 = lo_y.clamp(max=K - width)
                v_tab[t] = torch.gather(v_full, 1, (k0[:, None, None] + ar[None, :, None]).expand(qmax, width, P))
        groups = [(gid // len(tiers), gid % len(tiers), torch.nonzero(group_id == gid).squeeze(1)) for gid in used]
    else:
        u_tab, v_tab = {0: u_full}, {0: v_full}
        groups = [(0, 0, torch.arange(N, device=dev))]

    plogp = torch.empty(N, R, device=dev, dtype=dt)  # sum over the joint histogram of p log(p + eps)
    tasks = []  # (s window, y window, pixels), the costliest first
    for t_s, t_y, pix_all in groups:
        step = max(1, chunk_entries // (R * tiers[t_s] * tiers[t_y]))
        tasks += [(tiers[t_s], tiers[t_y], t_s, t_y, pix_all[i : i + step]) for i in range(0, pix_all.numel(), step)]
    tasks.sort(key=lambda task: -task[0] * task[1] * task[4].numel())
    # per-thread buffer sizes: u patches, y candidates, joint histograms (and their logs)
    sizes = [0, 0, 0]
    for ls, ly, _, _, pix in tasks:
        n = pix.numel()
        sizes = [max(sizes[0], n * P * ls), max(sizes[1], n * R * ly * P), max(sizes[2], n * R * ls * ly)]
    local = threading.local()

    def joint_entropy(task) -> None:
        ls, ly, t_s, t_y, pix = task
        if not hasattr(local, "buffers"):  # reused chunk to chunk: fresh allocations page-fault
            local.buffers = [torch.empty(size, device=dev, dtype=dt) for size in (*sizes, sizes[2])]
        u_buf, v_buf, j_buf, l_buf = local.buffers
        n = pix.numel()
        q = q_s[pix]
        ug = torch.index_select(u_tab[t_s], 0, q, out=u_buf[: n * P * ls].view(n, P, ls))
        v_t = v_tab[t_y].reshape(-1, ly * P)
        cand = (q[:, None] + offsets).reshape(-1)
        vg = torch.index_select(v_t, 0, cand, out=v_buf[: n * R * ly * P].view(n * R, ly * P))
        vg.mul_(inv_z[pix].view(n * R, 1))  # the product is then p = J / (Z + eps) directly
        shape = (n, ls, R * ly)
        prob = torch.bmm(
            ug.transpose(1, 2), vg.view(n, R * ly, P).transpose(1, 2), out=j_buf[: math.prod(shape)].view(shape)
        )
        logs = torch.add(prob, EPS, out=l_buf[: math.prod(shape)].view(shape))
        logs.log_()
        logs.mul_(prob)
        plogp[pix] = logs.sum(1).view(n, R, ly).sum(-1)

    run_tasks(joint_entropy, tasks, workers)

    h_sum = hs + hy
    nmi = 2.0 * (h_sum + plogp / _LN2) / (h_sum + EPS)  # H(a, b) = -sum p log2(p + eps)

    # candidates outside the image are skipped; the centre comes first so that it wins exact ties
    e = torch.arange(r, device=dev) - h
    row_ok = (rows[:, None] + e >= 0) & (rows[:, None] + e < H)  # H, r
    col_ok = (cols[:, None] + e >= 0) & (cols[:, None] + e < W)  # W, r
    valid = (row_ok[:, None, :, None] & col_ok[None, :, None, :]).reshape(H * W, R).repeat(B, 1)
    nmi = nmi.masked_fill(~valid, float("-inf"))
    order = torch.tensor([R // 2] + [k for k in range(R) if k != R // 2], device=dev)
    best, k = nmi[:, order].max(1)
    return best.view(B, H, W), order[k].view(B, H, W)
