"""UniPC (Zhao et al. 2023): the multistep predictor-corrector solver Wan samples with by default.

It is diffusers' `UniPCMultistepScheduler` with its defaults (solver_order 2, "bh2", data
prediction, lower_order_final, corrector on every step but the first), as one `jax.lax.scan`.

Step i at time s_i shows the model x_i (before correction) and converts its output to
m_i = x0_hat(x_i, s_i). Then
  * corrector (i >= 1, UniC of the previous step's order): x_i <- a linear combination of the
    previous corrected sample, m_{i-1}, m_{i-2} and m_i;
  * predictor (UniP; order 1 on the first and last step, else 2):
    x_{i+1} = (sigma_t / sigma_s) x_i - alpha_t (e^{-h} - 1) m_i - alpha_t B(h) rho D1,
    h = lambda_t - lambda_s, lambda = log(alpha / sigma), D1 = (m_{i-1} - m_i) / r.
Every coefficient depends only on the time grid, so they are computed once in float64 numpy
(`coefficients`) and each scan step is a handful of fused multiply-adds on the latents. At a
grid time where lambda is infinite (t = 1 or 0 of a flow path) the coefficients take their
limits, so vdm's own "uniform" grid works too; diffusers' grids avoid those points.
"""

from __future__ import annotations

import numpy as np

from vdm.diffusion import schedules
from vdm.diffusion.schedules import DiffusionSpec

_FIELDS = ("p_x", "p_m", "p_d", "c_x", "c_m", "c_d", "c_t")


def _alpha_sigma(t: np.ndarray, spec: DiffusionSpec) -> tuple[np.ndarray, np.ndarray]:
    """float64 (alpha, sigma) of the objective's path (`schedules.alpha_sigma` in numpy)."""
    if spec.is_flow:  # exact in float64, as diffusers' flow sigmas are.
        return 1.0 - t, t.copy()
    alpha, sigma = schedules.alpha_sigma(t.astype(np.float32), spec)
    return np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)


def _phi(h: float) -> tuple[float, float, float]:
    """(h phi_1 = e^{-h} - 1, B(h) ("bh2") = e^{-h} - 1, h phi_2 / ... = first b coefficient)
    of UniPC with data prediction (hh = -h); their limits where h is infinite."""
    hh = -h
    h_phi_1 = np.expm1(hh)
    b_h = np.expm1(hh)
    h_phi_k = (h_phi_1 / hh - 1.0) if np.isfinite(hh) else -1.0
    return h_phi_1, b_h, h_phi_k


def _second_b(h: float, h_phi_k: float) -> float:
    """diffusers' b[1] = (h_phi_k / hh - 1/2) * 2 / B(h) for order 2 (finite h only)."""
    hh = -h
    return (h_phi_k / hh - 0.5) * 2.0 / np.expm1(hh)


def coefficients(times: np.ndarray, spec: DiffusionSpec) -> dict[str, np.ndarray]:
    """Per-step coefficients of the scan in `sample_unipc`, each float32 [n].

    Predictor: x_next = p_x x + p_m m_i + p_d (m_{i-1} - m_i).
    Corrector (step i >= 1; zeros at i = 0, where it is skipped):
    x = c_x x_last + c_m m_{i-1} + c_d (m_{i-2} - m_{i-1}) + c_t (m_i - m_{i-1}).
    """
    t = np.asarray(times, np.float64)
    n = len(t) - 1
    alpha, sigma = _alpha_sigma(t, spec)
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.log(alpha) - np.log(sigma)
        orders = [1 if i in (0, n - 1) else 2 for i in range(n)]
        co = {k: np.zeros(n) for k in _FIELDS}
        for i in range(n):
            # Predictor from s = t_i to t_{i+1}, with m0 = m_i (and m_{i-1} for order 2).
            h = lam[i + 1] - lam[i]
            h_phi_1, b_h, _ = _phi(h)
            co["p_x"][i] = sigma[i + 1] / sigma[i]
            co["p_m"][i] = -alpha[i + 1] * h_phi_1
            if orders[i] == 2:
                rk = (lam[i - 1] - lam[i]) / h
                co["p_d"][i] = 0.0 if not np.isfinite(rk) else -alpha[i + 1] * b_h * 0.5 / rk
            if i == 0:
                continue
            # Corrector at t_i from the previous corrected sample at t_{i-1}, m0 = m_{i-1}.
            h = lam[i] - lam[i - 1]
            h_phi_1, b_h, h_phi_k = _phi(h)
            co["c_x"][i] = sigma[i] / sigma[i - 1]
            co["c_m"][i] = -alpha[i] * h_phi_1
            if orders[i - 1] == 1:
                rho_d, rho_t = 0.0, 0.5
            else:
                rk = (lam[i - 2] - lam[i - 1]) / h
                b = np.array([h_phi_k / b_h, _second_b(h, h_phi_k)])
                if np.isfinite(rk):
                    rho_d, rho_t = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), b)
                    rho_d = rho_d / rk  # D1 = (m_{i-2} - m_{i-1}) / rk
                else:  # the limit rk -> inf of that solve
                    rho_d, rho_t = 0.0, b[0]
            co["c_d"][i] = -alpha[i] * b_h * rho_d
            co["c_t"][i] = -alpha[i] * b_h * rho_t
    return {k: v.astype(np.float32) for k, v in co.items()}
