"""Statistics with training seeds as the unit (scipy.stats): a paired permutation test, a bootstrap interval, and how
many seeds a real difference needs.

Two rows of a table scored by the same seeds give one difference per seed; whether a method is better is a question
about that difference across seeds (another seed trains another model), not about the questions one model answered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from eval.tables.render import MISSING

PERMUTATIONS = 20_000  # sign-flip draws; exact enumeration up to 14 seeds (2**14 <= 20,000)
BOOTSTRAPS = 10_000
ALPHA = 0.05
CI_LEVEL = 0.95
EFFECT = 3.0  # points: the real difference the seed count is sized to find (issue 27)
POWER = 0.8
MAX_SEEDS = 1000  # seeds_needed gives up beyond this


@dataclass(frozen=True)
class SeedTest:
    """A - B in points with training seeds as the unit: each seed's difference on the same questions, their mean and
    spread, a permutation test and a bootstrap interval over seeds, and the seeds a real ``effect`` would need."""

    per_seed: tuple[float, ...]  # (seeds,): mean over the questions of A - B, one value per seed
    diff: float  # mean of per_seed
    sd: float  # sample sd of per_seed (ddof 1; NaN for one seed)
    ci_low: float
    ci_high: float
    p: float
    p_floor: float  # the smallest two-sided p a sign-flip test over n_seeds values can give: 2 / 2**n_seeds
    n_docs: int
    seeds_needed: int | None  # for a real difference of ``effect`` points at ``power`` (None: no spread measured)
    significant: bool

    @property
    def n_seeds(self) -> int:
        """How many seeds the test was over."""
        return len(self.per_seed)

    @property
    def verdict(self) -> str:
        """``better`` / ``worse`` (A than B, significant at alpha) or ``indistinguishable``."""
        if not self.significant:
            return "indistinguishable"
        return "better" if self.diff > 0 else "worse"


def seed_test(
    a: np.ndarray, b: np.ndarray, n_docs: int = 0, permutations: int = PERMUTATIONS, bootstraps: int = BOOTSTRAPS,
    seed: int = 0, alpha: float = ALPHA, level: float = CI_LEVEL, effect: float = EFFECT, power: float = POWER,
) -> SeedTest:  # fmt: skip
    """Rows A and B, each scored by the same training seeds (on the same questions): is A - B non-zero across seeds?

    ``a``, ``b``: (seeds,) each seed's score (a mean over the same ``n_docs`` questions). The p-value is
    ``scipy.stats.permutation_test`` with ``permutation_type="samples"`` (A and B swapped within a seed: the sign of
    that seed's difference flipped), exact when 2**seeds <= ``permutations``; the interval is
    ``scipy.stats.bootstrap``'s percentile interval of the mean difference over seeds (narrow for few seeds: a
    resample of three values takes at most three distinct ones). ``seeds_needed``: :func:`seeds_needed` from the
    measured sd.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"expected two arrays of one shape (seeds,) with seeds > 0, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("scores must be finite")
    d = a - b  # (seeds,)
    sd = float(d.std(ddof=1)) if d.size > 1 else math.nan
    p = _permutation_p(a, b, permutations, seed)
    low, high = _bootstrap_ci(d, bootstraps, seed, level)
    needed = seeds_needed(sd, effect, alpha, power) if not math.isnan(sd) else None
    floor = min(1.0, 2.0 / 2.0**d.size)
    per_seed = tuple(float(x) for x in d)
    return SeedTest(per_seed, float(d.mean()), sd, low, high, p, floor, n_docs, needed, p < alpha)


def _permutation_p(a: np.ndarray, b: np.ndarray, permutations: int, seed: int) -> float:
    """Two-sided p of ``mean(a - b) = 0`` over the seeds' sign flips (``scipy.stats.permutation_test``)."""
    if a.size == 1:  # one seed: flipping its sign is the only permutation, and it always ties in absolute value
        return 1.0
    result = stats.permutation_test(
        (a, b), _mean_difference, permutation_type="samples", vectorized=True, n_resamples=permutations,
        alternative="two-sided", rng=np.random.default_rng(seed),
    )  # fmt: skip
    return float(result.pvalue)


def _mean_difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x - y, axis=axis)


def _bootstrap_ci(d: np.ndarray, draws: int, seed: int, level: float) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(d)`` over seeds (``scipy.stats.bootstrap``); (d, d) when all agree."""
    if d.size == 1 or np.ptp(d) == 0:  # nothing to resample: every resample has the same mean
        return float(d.mean()), float(d.mean())
    result = stats.bootstrap(
        (d,), np.mean, n_resamples=draws, confidence_level=level, method="percentile", rng=np.random.default_rng(seed)
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def sign_flip_floor_seeds(alpha: float = ALPHA) -> int:
    """The fewest seeds whose exact two-sided sign-flip test can reach p <= ``alpha`` (2 / 2**n <= alpha): 6 at 5%."""
    return max(1, math.ceil(math.log2(2.0 / alpha)))


def t_test_power(n: int, sd: float, effect: float, alpha: float = ALPHA) -> float:
    """Power of a two-sided one-sample t-test over ``n`` per-seed differences of sd ``sd`` when the true mean is
    ``effect`` (the noncentral t distribution, ``scipy.stats.nct``); the sign-flip test's power is close to it."""
    if n < 2:
        return 0.0
    if sd == 0:
        return 1.0
    df, shift = n - 1, effect / sd * math.sqrt(n)
    critical = stats.t.ppf(1.0 - alpha / 2.0, df)
    return float(stats.nct.sf(critical, df, shift) + stats.nct.cdf(-critical, df, shift))


def seeds_needed(
    sd: float, effect: float = EFFECT, alpha: float = ALPHA, power: float = POWER, most: int = MAX_SEEDS
) -> int | None:
    """The fewest seeds at which a real ``effect``-point difference, spread over seeds with sd ``sd``, is found with
    probability ``power`` at ``alpha`` (:func:`t_test_power`), and no fewer than the sign-flip test needs to reach
    ``alpha`` at all; None when ``sd`` is unknown or more than ``most`` seeds would be needed."""
    if math.isnan(sd) or sd < 0 or effect <= 0:
        return None
    floor = max(2, sign_flip_floor_seeds(alpha))
    for n in range(floor, most + 1):
        if t_test_power(n, sd, effect, alpha) >= power:
            return n
    return None


@dataclass(frozen=True)
class Comparison:
    """Row A vs row B (same tokens) on one column."""

    a: str
    b: str
    tokens: int
    column: str
    test: SeedTest


COMPARISON_HEADER = (
    "| A | B | Tokens | Column | Per seed (points) | Mean | SD | 95% CI | p | A vs B | Seeds for 3 pts |",
    "|---|---|---:|---|---|---:|---:|---|---:|---|---:|",
)


def comparison_lines(comparisons: Sequence[Comparison]) -> list[str]:
    """The comparisons as Markdown table lines (header included; none when there are no comparisons)."""
    if not comparisons:
        return []
    lines = list(COMPARISON_HEADER)
    for c in comparisons:
        t = c.test
        per_seed = ", ".join(f"{x:+.1f}" for x in t.per_seed)
        needed = MISSING if t.seeds_needed is None else str(t.seeds_needed)
        cells = [c.a, c.b, str(c.tokens), c.column, per_seed, f"{t.diff:+.2f}", _fmt(t.sd, 2),
                 f"[{t.ci_low:+.2f}, {t.ci_high:+.2f}]", _p_cell(t.p), t.verdict, needed]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def legend(comparisons: Sequence[Comparison], seeds: int, alpha: float = ALPHA, effect: float = EFFECT) -> str:
    """What the comparison table's columns are, the smallest p the seed count allows, and the seeds it would need."""
    docs = dict.fromkeys((c.column, c.test.n_docs) for c in comparisons)
    counts = ", ".join(f"{column} {n}" for column, n in docs)
    n = str(next(iter(docs))[1]) if len({n for _, n in docs}) == 1 else f"N ({counts})"
    floor = min(1.0, 2.0 / 2.0**seeds)
    text = (
        f"Seeds as the unit: each training seed's A - B in points on the same {n} questions (Per seed), their mean and "
        f"sd. p: two-sided paired permutation test over the {seeds} seeds (scipy.stats.permutation_test: the signs of "
        f"the per-seed differences flipped, exact); with {seeds} seeds the smallest p it can give is {floor:.3g}"
    )
    text += f", so no difference can reach {alpha:.0%}. " if floor > alpha else ". "
    text += (
        "CI: percentile bootstrap of the mean over seeds (scipy.stats.bootstrap; too narrow with few seeds). A vs B: "
        f"better / worse where p < {alpha:g}, else indistinguishable. Seeds for {effect:g} pts: the seeds a real "
        f"{effect:g}-point difference with this comparison's sd needs to be found with probability {POWER:g} at "
        f"{alpha:g} (power of a t-test over seeds; never fewer than {sign_flip_floor_seeds(alpha)}, the fewest with "
        "which the sign-flip test can reach it). No correction for multiple comparisons."
    )
    pooled = pooled_sd(comparisons)
    if not math.isnan(pooled):
        needed = seeds_needed(pooled, effect, alpha)
        count = f"{needed} seeds." if needed else f"more than {MAX_SEEDS} seeds."
        text += (
            f" Over all {len(comparisons)} comparisons the per-seed differences spread by {pooled:.1f} points "
            f"(root mean square of the sds): a real {effect:g}-point effect needs {count}"
        )
    return text


def pooled_sd(comparisons: Sequence[Comparison]) -> float:
    """Root mean square of the comparisons' per-seed sds (NaN when none has two seeds)."""
    sds = [c.test.sd for c in comparisons if not math.isnan(c.test.sd)]
    return math.sqrt(sum(x * x for x in sds) / len(sds)) if sds else math.nan


def _fmt(value: float | None, digits: int = 1) -> str:
    return MISSING if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _p_cell(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"
