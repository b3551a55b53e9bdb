"""Token relation distillation (TRD, VideoREPA) with pair routing (SARA), computed in row blocks.

    l_ij = relu(|cos(z_i, z_j) - cos(y_i, y_j)| - margin),   L = sum_ij W_ij l_ij / sum_ij W_ij

Every route is a soft-logic form W_ij = c0 + c1 (w_i + w_j) + c2 w_i w_j (uniform 1, OR w_i + w_j - w_i w_j,
AND w_i w_j, XOR w_i + w_j - 2 w_i w_j), so sum_ij W_ij has a closed form in N and S = sum_i w_i:
c0 N^2 + 2 c1 N S + c2 S^2 (uniform N^2, OR 2NS - S^2, AND S^2, XOR 2NS - 2S^2). Memory is O(N * block): the
N x N matrices exist only one [block, N] row block at a time (at most three such buffers alive).

Decisions where the papers are silent:
- Pairs are ordered and the diagonal i = j is included, as in VideoREPA's plain mean over all N x N entries, so
  `uniform` is exactly VideoREPA. l_ii = relu(0 - margin) = 0, so the diagonal only enters the normaliser
  (excluding it would subtract Q = sum w_i^2 terms; we don't).
- A batch is the mean over clips of per-clip ratios (VideoREPA averages per sample too): every clip counts the
  same however much of it is salient. A clip with sum W = 0 (e.g. OR with all w = 0) contributes 0.
- `motion`, a motion-weighted TRD of our own (MoAlign's motion subspace is not public, so this is not MoAlign):
  w = per-token temporal change of the
  target, 1 - cos(y[t], y[t-1]) at the same (h, w), frame 0 copying frame 1, min-max scaled per clip, routed
  by OR. A clip with no motion range (e.g. one frame) gets w = 1, i.e. uniform TRD.
"""
import torch
import torch.nn.functional as F

# W_ij = c0 + c1 (w_i + w_j) + c2 w_i w_j
ROUTES = {'uniform': (1., 0., 0.), 'or': (0., 1., -1.), 'and': (0., 0., 1.), 'xor': (0., 1., -2.)}


def motion_saliency(y, grid):
    """y: [N, D] target tokens in (t, h, w) order, grid = (T, H, W) -> [N] motion cue in [0, 1]."""
    T, H, W = grid
    y = F.normalize(y.detach(), dim=-1).reshape(T, H * W, -1)
    if T < 2:
        return y.new_ones(T * H * W)
    m = 1 - (y[1:] * y[:-1]).sum(-1)                  # [T-1, HW]: change from the previous frame
    m = torch.cat([m[:1], m]).flatten()                # frame 0 has no previous frame: take frame 1's value
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi - lo > 1e-12 else torch.ones_like(m)


class _PairSum(torch.autograd.Function):
    """sum_ij W_ij l_ij for one clip of unit tokens z, y [N, D], one [block, N] row block at a time.

    The output is a scalar, so its gradient is fixed up to the factor grad_output: it is accumulated in the same
    pass ([N, D] for z, [N] for w) and backward only scales it. Nothing is recomputed and no block outlives its
    iteration (checkpointing would redo both Gram products in backward). Because W and l are
    symmetric, d/dz_i = 2 sum_j M_ij z_j with M = W * dl/dcos_z, so rows alone cover every gradient term."""

    @staticmethod
    def forward(ctx, z, y, w, margin, c, block, grad, rows):
        N = z.shape[0]
        gz = torch.zeros_like(z) if grad and ctx.needs_input_grad[0] else None
        gw = torch.zeros_like(w) if grad and ctx.needs_input_grad[2] else None
        total = z.new_zeros(())
        for r in range(*rows, block):
            wr = w[r:min(r + block, rows[1])]
            d = z[r:r + len(wr)] @ z.T
            d -= y[r:r + len(wr)] @ y.T                                 # cos_z - cos_y, [b, N]
            l = d.abs().sub_(margin).relu_()
            W = torch.addr(c[0] + c[1] * w, wr, c[1] + c[2] * w)        # = c0 + c1 w_j + w_i (c1 + c2 w_j)
            total += torch.dot(W.flatten(), l.flatten())
            if gw is not None:                                          # dW_ij/dw_i = c1 + c2 w_j, twice by symmetry
                gw[r:r + len(wr)] = 2 * (l @ (c[1] + c[2] * w))
            if gz is not None:                                          # in place: three [b, N] buffers at most
                M = W.mul_(d.sign_()).mul_(l.gt_(0))                     # W_ij dl_ij/dcos(z_i, z_j)
                gz[r:r + len(wr)] = 2 * (M @ z)
                del M
            del d, l, W                                                 # free before the next block allocates
        ctx.save_for_backward(gz, gw)
        return total

    @staticmethod
    def backward(ctx, g):
        gz, gw = ctx.saved_tensors
        return (None if gz is None else g * gz, None, None if gw is None else g * gw, None, None, None, None, None)


def _clip_loss(z, y, w, c, margin, block, part):
    N = z.shape[0]
    step = -(-N // part[1])
    rows = (min(N, part[0] * step), min(N, (part[0] + 1) * step))
    dtype = torch.promote_types(z.dtype, torch.float32)    # cosines within a 0.1 margin need more than bf16
    with torch.autocast(z.device.type, enabled=False):
        z = F.normalize(z.to(dtype), dim=-1)
        y = F.normalize(y.detach().to(dtype), dim=-1)          # frozen target: no gradient
        w = z.new_zeros(N) if w is None else w.to(dtype)
        total = _PairSum.apply(z, y, w, margin, c, block, torch.is_grad_enabled(), rows)
        S = w.sum()
        norm = c[0] * N * N + 2 * c[1] * N * S + c[2] * S * S  # sum_ij W_ij, diagonal included
        return total / norm.clamp_min(1e-12)                   # a clip with no weight contributes 0


def trd_loss(z, y, w=None, route='or', margin=0.1, block=256, grid=None, part=(0, 1)):
    """z, y: [B, N, D] or lists of [N_b, D] (DiT projection, frozen target); w: saliency [B, N] or list in [0, 1],
    required for or/and/xor (ignored by uniform and motion); grid: (T, H, W) or a list of them, required for
    motion, tokens in (t, h, w) order. route: uniform | or | and | xor | motion. Returns a scalar.
    part = (i, n): only the i-th of n equal row ranges, against all columns (sequence parallelism: the n parts sum to
    the loss, and because W and l are symmetric each part's row gradients sum to the full gradient)."""
    if route not in ROUTES and route != 'motion':
        raise ValueError(f"unknown route '{route}'; have: {', '.join(ROUTES)}, motion")
    if route == 'motion':
        if grid is None:
            raise ValueError("route 'motion' needs grid=(T, H, W)")
        grids = grid if isinstance(grid, list) else [grid] * len(z)
        w, route = [motion_saliency(yb, g) for yb, g in zip(y, grids)], 'or'
    if w is None and route != 'uniform':
        raise ValueError(f"route '{route}' needs a saliency w")
    ws = [None] * len(z) if w is None else w
    losses = [_clip_loss(zb, yb, wb, ROUTES[route], margin, block, part) for zb, yb, wb in zip(z, y, ws)]
    return torch.stack(losses).mean()


def pair_budget(w, threshold=0.5):
    """Shares of FG-FG / FG-BG / BG-BG ordered pairs (w > threshold is FG), and for each route the share of its
    total weight that each pair class gets, plus `coverage` = mean W (the fraction of pairs supervised when w is
    binary). w: [N], [B, N] or a list; shares are averaged over clips. All from closed forms, O(N)."""
    clips = [w] if torch.is_tensor(w) and w.dim() == 1 else list(w)
    out = {}
    for wb in clips:
        wb = wb.detach().double()
        fg = wb > threshold
        nf, nb = fg.sum().item(), (~fg).sum().item()
        sf, sb = wb[fg].sum().item(), wb[~fg].sum().item()
        n2 = (nf + nb) ** 2
        stats = {'fg_fg': nf * nf / n2, 'fg_bg': 2 * nf * nb / n2, 'bg_bg': nb * nb / n2}
        for name, (c0, c1, c2) in ROUTES.items():   # sum of W over each class (FG-BG counts both orders)
            ff = c0 * nf * nf + 2 * c1 * nf * sf + c2 * sf * sf
            fb = 2 * (c0 * nf * nb + c1 * (nb * sf + nf * sb) + c2 * sf * sb)
            bb = c0 * nb * nb + 2 * c1 * nb * sb + c2 * sb * sb
            tot = max(ff + fb + bb, 1e-12)
            stats.update({f'{name}/fg_fg': ff / tot, f'{name}/fg_bg': fb / tot, f'{name}/bg_bg': bb / tot,
                          f'{name}/coverage': (ff + fb + bb) / n2})
        for k, v in stats.items():
            out[k] = out.get(k, 0.) + v / len(clips)
    return out
