"""Statistics for evaluation: bootstrap confidence intervals, paired differences, judge win rates.

Every interval is a percentile bootstrap over prompts (resampling prompts with replacement), so
paired quantities keep their pairing. Missing values (NaN, or an unparseable judgement) are dropped
and counted, never imputed: a judgement the judge did not give is not a tie.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

OUTCOMES = ("win", "tie", "loss")


def bootstrap_ci(
    values: Sequence[float], samples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; (nan, nan) without values."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(samples, data.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return (float(low), float(high))


def describe(values: Sequence[float], samples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """n, missing, mean, its confidence interval and the standard deviation of the finite values."""
    data = np.asarray(values, dtype=np.float64)
    finite = data[np.isfinite(data)]
    return {
        "n": int(finite.size),
        "missing": int(data.size - finite.size),
        "mean": float(finite.mean()) if finite.size else None,
        "ci": _finite_or_none(bootstrap_ci(finite, samples, confidence, seed)),
        "std": float(finite.std(ddof=1)) if finite.size > 1 else None,
    }


def paired(base: Sequence[float], other: Sequence[float], samples: int = 2000, confidence: float = 0.95,
           seed: int = 0, clusters: Sequence | None = None) -> dict:  # fmt: skip
    """Both means and the paired difference (other - base) over rows where both are present.

    With `clusters` (one label per row, e.g. the prompt of rows that differ only by seed), every
    interval resamples whole clusters (`clustered`), since rows of one cluster are not independent.
    """
    a, b = np.asarray(base, dtype=np.float64), np.asarray(other, dtype=np.float64)
    both = np.isfinite(a) & np.isfinite(b)
    difference = b[both] - a[both]
    result = {
        "base": describe(a[both], samples, confidence, seed),
        "lora": describe(b[both], samples, confidence, seed),
        "difference": describe(difference, samples, confidence, seed),
        "lora_higher_share": float((difference > 0).mean()) if difference.size else None,
        "pairs": int(both.sum()),
        "pairs_missing": int((~both).sum()),
    }
    if clusters is not None:
        labels = np.asarray(list(clusters), dtype=object)[both]
        for key, values in (("base", a[both]), ("lora", b[both]), ("difference", difference)):
            grouped = clustered(values, labels, samples=samples, confidence=confidence, seed=seed)
            result[key].update(ci=grouped["ci"], clusters=grouped["clusters"])
    return result


def clustered(values: Sequence[float], clusters: Sequence, reference: Sequence[float] | None = None,
              samples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:  # fmt: skip
    """Mean of `values` with a percentile bootstrap interval that resamples whole clusters.

    Several values per cluster (seeds of one prompt) are not independent: resampling values alone
    would make the interval too narrow, so each bootstrap sample draws clusters with replacement
    and keeps all their values. With `reference`, the statistic is sum(values) / sum(reference)
    over the drawn values (e.g. a shift as a fraction of the shift a reference applies to the same
    images). Values that are not finite are dropped with their reference and counted as missing.
    """
    data = np.asarray(values, dtype=np.float64)
    denominator = np.ones_like(data) if reference is None else np.asarray(reference, dtype=np.float64)
    keep = np.isfinite(data) & np.isfinite(denominator)
    labels = np.asarray(list(clusters), dtype=object)[keep]
    data, denominator = data[keep], denominator[keep]
    result = {"n": int(data.size), "missing": int(keep.size - data.size), "mean": None, "ci": None}
    names = list(dict.fromkeys(labels.tolist()))
    result["clusters"] = len(names)
    if not names:
        return result
    index = {name: i for i, name in enumerate(names)}
    owner = np.array([index[label] for label in labels])
    # per-cluster sums: a drawn sample's statistic is a ratio of sums over its drawn clusters
    top = np.bincount(owner, weights=data, minlength=len(names))
    bottom = np.bincount(owner, weights=denominator, minlength=len(names))
    result["mean"] = float(top.sum() / bottom.sum())
    draws = np.random.default_rng(seed).integers(0, len(names), size=(samples, len(names)))
    with np.errstate(divide="ignore", invalid="ignore"):
        statistics = top[draws].sum(axis=1) / bottom[draws].sum(axis=1)
    tail = (1 - confidence) / 2 * 100
    result["ci"] = _finite_or_none(tuple(float(v) for v in np.percentile(statistics, [tail, 100 - tail])))
    return result


def vote(winner: str | None, lora_shown: str) -> int | None:
    """A judgement as a vote for the LoRA image: +1, 0 (tie) or -1; None when it is missing.

    `winner` is "left", "right", "tie" or None (unparseable); `lora_shown` says where the LoRA
    image was ("left" or "right").
    """
    if winner is None:
        return None
    if winner == "tie":
        return 0
    if winner not in ("left", "right"):
        raise ValueError(f"unknown winner {winner!r}")
    return 1 if winner == lora_shown else -1


def symmetrise(
    votes_lora_right: Sequence[int | None], votes_lora_left: Sequence[int | None]
) -> list[str | None]:
    """One outcome per prompt from its two judgements (the LoRA image on the right, then on the left).

    The votes are summed, so a judge that always picks one side yields a tie and position bias
    cancels. A prompt with either judgement missing is missing: scoring it from one order alone
    would bring the bias back.
    """
    outcomes: list[str | None] = []
    for first, second in zip(votes_lora_right, votes_lora_left, strict=True):
        if first is None or second is None:
            outcomes.append(None)
        else:
            total = first + second
            outcomes.append("win" if total > 0 else "loss" if total < 0 else "tie")
    return outcomes


def win_rates(outcomes: Sequence[str | None], samples: int = 2000, confidence: float = 0.95,
              seed: int = 0) -> dict:  # fmt: skip
    """Win / tie / loss counts and rates over judged prompts, with bootstrap intervals.

    `missing` counts prompts without a usable outcome; they are excluded from every rate.
    `win_rate_ties_half` counts a tie as half a win (0.5 means no preference).
    """
    judged = [o for o in outcomes if o is not None]
    unknown = set(judged) - set(OUTCOMES)
    if unknown:
        raise ValueError(f"unknown outcomes {sorted(unknown)}")
    result: dict = {"judged": len(judged), "missing": len(outcomes) - len(judged)}
    for name in OUTCOMES:
        hits = np.array([o == name for o in judged], dtype=np.float64)
        result[name] = int(hits.sum())
        result[f"{name}_rate"] = float(hits.mean()) if hits.size else None
        result[f"{name}_rate_ci"] = _finite_or_none(bootstrap_ci(hits, samples, confidence, seed))
    half = np.array([{"win": 1.0, "tie": 0.5, "loss": 0.0}[o] for o in judged])
    result["win_rate_ties_half"] = float(half.mean()) if half.size else None
    result["win_rate_ties_half_ci"] = _finite_or_none(bootstrap_ci(half, samples, confidence, seed))
    return result


def left_share(winners: Sequence[str | None]) -> float | None:
    """Share of decisive judgements that picked the left image: position bias shows as far from 0.5."""
    decisive = [w for w in winners if w in ("left", "right")]
    return sum(w == "left" for w in decisive) / len(decisive) if decisive else None


def _finite_or_none(interval: tuple[float, float]) -> list[float] | None:
    return list(interval) if all(np.isfinite(interval)) else None
