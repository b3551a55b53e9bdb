"""The flow-matching samplers: UniPC, the default solver of official Wan2.2 (wan/utils/fm_solvers_unipc.py), and Euler.

Settings as Wan2.2 runs it: order 2, B(h) = e^h - 1 ("bh2"), data (x0) prediction, the UniC corrector on every step
but the first, first order on the first and the last step, final sigma 0. The model predicts the velocity
v = eps - x0 of x_t = (1 - sigma) x0 + sigma eps, so x0 = x_t - sigma v.

    solver = UniPC(steps, shift)
    for t in solver.timesteps:
        x = solver.step(model(x, t), x)
"""
import numpy as np
import torch

# The official scheduler takes its sigma range from a float32 training grid 1 - linspace(1, 1/1000, 1000)[::-1]:
# first 0.999 (as float32), last 0. diffusers' use_flow_sigmas grid, linspace(1, 1/1000)[:-1], is 0.001 higher.
SIGMA_MAX = float(np.float32(0.999))


def shifted(sigma, shift):
    """Wan's timestep shift sigma -> shift*sigma / (1 + (shift-1)*sigma): > 1 spends more steps at high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def unshifted(sigma, shift):
    """The inverse of shifted."""
    return sigma / (shift - (shift - 1) * sigma)


def expert_split(timesteps, boundary):
    """Number of leading steps for the A14B high-noise expert (official: t >= boundary * 1000)."""
    return int((timesteps >= boundary * 1000).sum())


def _lam(sigma):
    """log-SNR lambda = log(alpha / sigma) with alpha = 1 - sigma; +inf at sigma 0."""
    return torch.log(1 - sigma) - torch.log(sigma)


class UniPC:
    def __init__(self, steps, shift):
        base = np.linspace(SIGMA_MAX, 0.0, steps + 1)[:-1]  # numpy float64, as official
        sigmas = shifted(base, shift)
        self.timesteps = torch.from_numpy(sigmas * 1000).long()  # truncated, not rounded: the model sees these
        self.sigmas = torch.from_numpy(np.append(sigmas, 0.0))
        self._sig = self.sigmas.float()  # the official solver does all its scalar math on float32 sigmas
        self.index = 0
        self.x0 = []  # x0 predictions of the last two steps (the multistep history)
        self.last = None  # sample the last predictor step started from, which the corrector redoes
        self.order = 1  # order of the last predictor step; the corrector uses the same

    def _first_order(self, x, s):
        """Step x from sigma[s] to sigma[s+1] with x0 = self.x0[-1] (exact for a constant x0); also returns the
        weight alpha*B(h) of the higher-order terms, r = lambda ratio of the step before, and h."""
        sig_s, sig_t = self._sig[s], self._sig[s + 1]
        h = _lam(sig_t) - _lam(sig_s)
        phi = torch.expm1(-h)  # h*phi_1 in the x0 form; with bh2, B(h) is the same value
        alpha = 1 - sig_t
        x = sig_t / sig_s * x - alpha * phi * self.x0[-1]
        r = (_lam(self._sig[s - 1]) - _lam(sig_s)) / h if s > 0 else None
        return x, alpha * phi, r, h

    def _corrector_rhos(self, r, h):
        """UniC-2 weights: solve [[1, 1], [r, 1]] rho = b, b from the phi_k(h) expansion (as official, float32)."""
        hh = -h
        phi_1 = torch.expm1(hh)
        phi_2 = phi_1 / hh - 1
        phi_3 = phi_2 / hh - 1 / 2
        b = torch.stack([phi_2 / phi_1, phi_3 * 2 / phi_1])
        R = torch.stack([torch.ones(2), torch.stack([r, torch.ones(())])])
        return torch.linalg.solve(R, b)

    def step(self, model_output, sample):
        """One solver step at timesteps[index]: model_output = v(sample, t). Returns the sample at the next sigma."""
        i, n = self.index, len(self.timesteps)
        if i >= n:
            raise IndexError(f'UniPC: all {n} steps are done')
        sample, v = sample.float(), model_output.float()
        x0 = sample - self._sig[i] * v
        if i > 0:  # UniC: redo the last step now that the model's x0 at its end point is known
            x, w, r, h = self._first_order(self.last, i - 1)
            d = x0 - self.x0[-1]
            if self.order == 1:
                sample = x - w * (0.5 * d)
            else:
                rho = self._corrector_rhos(r, h)
                d1 = (self.x0[-2] - self.x0[-1]) / r
                sample = x - w * (rho[0] * d1 + rho[1] * d)
        self.x0 = (self.x0 + [x0])[-2:]
        self.order = 1 if i == 0 or i == n - 1 else 2  # no history yet / lower_order_final
        self.last = sample
        x, w, r, _ = self._first_order(sample, i)
        if self.order == 2:  # UniP-2: the official simplified rho = 1/2
            x = x - w * (0.5 * ((self.x0[-2] - self.x0[-1]) / r))
        self.index += 1
        return x


class Euler:
    """First-order flow steps x += (sigma_next - sigma) v on the shifted grid from sigma = 1; UniPC's interface."""
    def __init__(self, steps, shift):
        self.sigmas = shifted(torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift)
        self.timesteps = (self.sigmas[:-1] * 1000).long()  # integer model timesteps, as officially
        self.index = 0

    def step(self, v, x):
        self.index += 1
        return x.float() + (self.sigmas[self.index] - self.sigmas[self.index - 1]).item() * v.float()
