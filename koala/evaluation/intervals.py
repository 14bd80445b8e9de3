"""Confidence intervals for paired comparisons over training seeds and pictures (the ablation's statistics).

A figure of a variant is a mean over a (seeds x pictures) matrix: `x[s, p]` is picture `p` (a fixed prompt and
sampling seed, the same for every variant) scored on the model of training seed `s`. Two variants are compared on
the paired difference matrix `a - b` (same seed index, same picture). Both sources of chance are random effects:
another training seed gives another model, another prompt/seed set gives other pictures. The two-way crossed model

    x[s, p] = mu + a_s + b_p + e_sp,    Var(mean) = var_a / S + var_b / P + var_e / (S P)

is estimated by the ANOVA mean squares, each unbiased (MS_seed = var_e + P var_a, MS_pic = var_e + S var_b,
MS_err = var_e), so Var(mean) = (MS_seed + MS_pic - MS_err) / (S P), with Satterthwaite's degrees of freedom for a
Student-t interval. With P in the hundreds the picture term is estimated precisely and the seed term dominates: this
is a t-interval over seeds of the per-seed means, widened by the picture-level variance. Why not a bootstrap: a
percentile bootstrap over 5 seeds treats 5 values as the population and its intervals are too narrow
(`coverage(..., method="bootstrap")` measures it; docs/benchmarks.md has the numbers). With one seed the interval is
the paired t over pictures. numpy only: Student's t quantile comes from the regularised incomplete beta function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A mean and its two-sided confidence interval (`level`), with the standard error and degrees of freedom."""

    mean: float
    low: float
    high: float
    se: float
    df: float
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0 (a significant difference at `level`)."""
        return self.low > 0 or self.high < 0

    @property
    def p_value(self) -> float:
        """Two-sided p-value of mean = 0 under the interval's t distribution."""
        if self.se == 0:
            return 1.0 if self.mean == 0 else 0.0
        return t_pvalue(self.mean / self.se, self.df) if not math.isnan(self.df) else float("nan")

    def scaled(self, k: float) -> Interval:
        """The interval of `k` times the quantity (e.g. a share in [0, 1] as a percentage)."""
        lo, hi = sorted((self.low * k, self.high * k))
        return Interval(self.mean * k, lo, hi, self.se * abs(k), self.df, self.level)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes' betacf)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` (> 0, not necessarily whole) degrees of freedom."""
    if math.isinf(df):
        return 0.5 * math.erfc(-t / math.sqrt(2.0))
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The `q` quantile of Student's t with `df` degrees of freedom (bisection on `t_cdf`)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile {q} is not in (0, 1)")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_pvalue(t: float, df: float) -> float:
    """Two-sided p-value of a t statistic."""
    return 2.0 * (1.0 - t_cdf(abs(t), df))


def crossed_interval(x: np.ndarray, level: float = 0.95) -> Interval:
    """The mean of a (seeds x pictures) matrix and its interval under the two-way crossed random-effects model."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    S, P = x.shape
    if P < 2:
        raise ValueError(f"{P} picture(s): an interval needs at least 2")
    mean = float(x.mean())
    seed_means, pic_means = x.mean(1), x.mean(0)
    ms_pic = S * float(((pic_means - mean) ** 2).sum()) / (P - 1)
    if S == 1:  # one model: the paired t over pictures
        var, df = ms_pic / P, P - 1.0
    else:
        ms_seed = P * float(((seed_means - mean) ** 2).sum()) / (S - 1)
        resid = x - seed_means[:, None] - pic_means[None, :] + mean
        ms_err = float((resid**2).sum()) / ((S - 1) * (P - 1))
        if ms_pic >= ms_err:  # Var(mean) = (MS_seed + MS_pic - MS_err) / (S P), Satterthwaite's df
            num = ms_seed + ms_pic - ms_err
            denom = ms_seed**2 / (S - 1) + ms_pic**2 / (P - 1) + ms_err**2 / ((S - 1) * (P - 1))
            df = num * num / denom if denom > 0 else float("inf")
        else:  # the picture component's estimate is negative: truncated at 0, the t over the S seed means
            num, df = ms_seed, S - 1.0
        var = num / (S * P)
    se = math.sqrt(max(var, 0.0))
    half = t_quantile(0.5 + level / 2.0, df) * se if se > 0 else 0.0
    return Interval(mean, mean - half, mean + half, se, df, level)


def paired_difference(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> Interval:
    """Interval of mean(a - b) for two variants scored on the same seeds (rows) and pictures (columns)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"unpaired records: shapes {a.shape} and {b.shape} (same seeds and pictures needed)")
    return crossed_interval(a - b, level)


def bootstrap_interval(x: np.ndarray, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> Interval:
    """Percentile bootstrap of the mean of a (seeds x pictures) matrix, resampling seeds and pictures independently
    (Owen's pigeonhole bootstrap; with one seed, the paired bootstrap over pictures)."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    S, P = x.shape
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for i in range(n_boot):
        rows = rng.integers(0, S, S) if S > 1 else np.zeros(1, dtype=int)
        cols = rng.integers(0, P, P)
        means[i] = x[np.ix_(rows, cols)].mean()
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(x.mean()), float(lo), float(hi), float(means.std(ddof=1)), float("nan"), level)


def simulate_crossed(rng: np.random.Generator, S: int, P: int, sd_seed: float, sd_pic: float, sd_err: float,
                     mu: float = 0.0) -> np.ndarray:  # fmt: skip
    """A (S, P) matrix from the crossed model with normal effects: the synthetic case whose mean is known (mu)."""
    return mu + rng.normal(0, sd_seed, (S, 1)) + rng.normal(0, sd_pic, (1, P)) + rng.normal(0, sd_err, (S, P))


def coverage(method: str = "crossed", sims: int = 400, S: int = 5, P: int = 360, sd_seed: float = 1.0,
             sd_pic: float = 1.0, sd_err: float = 3.0, seed: int = 0, n_boot: int = 400) -> float:  # fmt: skip
    """Share of `sims` synthetic crossed data sets whose 95 % interval (`crossed` or `bootstrap`) holds the true mean."""
    rng = np.random.default_rng(seed)
    hits = 0
    for i in range(sims):
        x = simulate_crossed(rng, S, P, sd_seed, sd_pic, sd_err, mu=0.5)
        ci = crossed_interval(x) if method == "crossed" else bootstrap_interval(x, n_boot=n_boot, seed=i)
        hits += ci.low <= 0.5 <= ci.high
    return hits / sims


def holm(p_values: list[float], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down procedure: which of the hypotheses are rejected with family-wise error rate `alpha`."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = [False] * len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - rank):
            break
        rejected[i] = True
    return rejected
