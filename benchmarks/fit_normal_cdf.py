"""Fits the rational erf of the fused kernel's `normal_cdf` (src/dwvit/models/csrc/dw_shortcut_normal.h) and prints
its coefficients and errors, so that they can be checked or refitted.

erf(u) ~ u * P(u^2) / Q(u^2) on [0, 4] with Q(0) = 1: linearised least squares (minimise u * P - erf * Q), each
round weighted by 1 / Q of the last and reweighted toward the largest errors (Lawson), which tends to the minimax
fit. The kernel clamps u at 4, where erf(4) = 1 - 1.5e-8, and caps the result at 1 (the fit reaches 1 + 4e-8
just below 4).

    python benchmarks/fit_normal_cdf.py                  # degrees 6 / 4, the kernel's
    python benchmarks/fit_normal_cdf.py --degrees 5 4    # another pair
"""

from __future__ import annotations

import argparse
import math

import numpy as np

CLAMP = 4.0


def fit(numerator_degree: int, denominator_degree: int, rounds: int = 60) -> tuple[np.ndarray, np.ndarray]:
    u = np.sort(np.concatenate([(1 - np.cos(np.linspace(0, np.pi, 4000))) * CLAMP / 2, np.linspace(0, CLAMP, 4000)]))
    s, target = u * u, np.vectorize(math.erf)(u)
    numerator_terms = u[:, None] * s[:, None] ** np.arange(numerator_degree + 1)
    denominator_terms = -target[:, None] * s[:, None] ** np.arange(1, denominator_degree + 1)
    design = np.concatenate([numerator_terms, denominator_terms], axis=1)
    weights, denominator = np.ones_like(u), np.ones_like(u)
    for _ in range(rounds):
        row_weights = weights / denominator
        solution = np.linalg.lstsq(design * row_weights[:, None], target * row_weights, rcond=None)[0]
        p, q = solution[: numerator_degree + 1], np.concatenate([[1.0], solution[numerator_degree + 1 :]])
        denominator = np.polyval(q[::-1], s)
        error = u * np.polyval(p[::-1], s) / denominator - target
        weights = weights * (np.abs(error) + 1e-300) ** 0.3
        weights /= weights.mean()
    return p, q


def float32_errors(p: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    """The largest errors of Phi and of GELU = x * Phi, evaluated in float32 as the kernel does, on [-12, 12]."""
    f32 = np.float32
    x = np.linspace(-12, 12, 2_400_001).astype(f32)
    u = np.minimum(np.abs(x) * f32(0.707106781), f32(CLAMP))
    s = u * u
    numerator, denominator = f32(0), f32(0)
    for coefficient in p[::-1]:
        numerator = numerator * s + f32(coefficient)
    for coefficient in q[::-1]:
        denominator = denominator * s + f32(coefficient)
    uncapped = f32(0.5) * u * numerator / denominator
    phi = {}
    for name, half in (("uncapped", uncapped), ("capped", np.minimum(uncapped, f32(0.5)))):
        phi[name] = np.where(x >= 0, f32(0.5) + half, f32(0.5) - half).astype(np.float64)
    print(f"float32 Phi ranges over [{phi['uncapped'].min():.2e}, 1 + {phi['uncapped'].max() - 1:.2e}] uncapped; the "
          f"kernel caps erf at 1: [{phi['capped'].min():.2e}, 1 + {phi['capped'].max() - 1:.2e}]")
    exact = 0.5 * np.vectorize(math.erfc)(-x.astype(np.float64) / math.sqrt(2))
    return float(np.abs(phi["capped"] - exact).max()), float(np.abs(x * (phi["capped"] - exact)).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--degrees", type=int, nargs=2, default=[6, 4], metavar=("P", "Q"))
    args = parser.parse_args()
    p, q = fit(*args.degrees)
    u = np.linspace(0, CLAMP, 100_001)
    exact_error = np.abs(u * np.polyval(p[::-1], u * u) / np.polyval(q[::-1], u * u) - np.vectorize(math.erf)(u))
    phi_error, gelu_error = float32_errors(p, q)
    print("P (constant term first):", ", ".join(f"{value:.9e}" for value in p))
    print("Q (constant term first):", ", ".join(f"{value:.9e}" for value in q))
    print(f"erf error in float64 on [0, {CLAMP}]: {exact_error.max():.2e}")
    print(f"in float32: Phi within {phi_error:.2e}, GELU within {gelu_error:.2e}")


if __name__ == "__main__":
    main()
