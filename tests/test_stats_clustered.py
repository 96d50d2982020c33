"""The clustered bootstrap: whole prompts are resampled, never single seeds of a prompt."""

from __future__ import annotations

import numpy as np
import pytest

from artaug.stats import bootstrap_ci, clustered


def test_copies_within_a_cluster_add_no_information():
    """Five identical seeds per prompt: the interval is that of the 10 prompts, not of 50 values."""
    per_prompt = np.random.default_rng(1).normal(size=10)
    values = np.repeat(per_prompt, 5)
    prompts = np.repeat([f"p{i}" for i in range(10)], 5)
    result = clustered(values, prompts, seed=3)
    assert result["n"] == 50 and result["clusters"] == 10 and result["missing"] == 0
    assert result["mean"] == pytest.approx(per_prompt.mean())
    assert result["ci"] == pytest.approx(list(bootstrap_ci(per_prompt, seed=3)))
    naive = bootstrap_ci(values, seed=3)
    assert result["ci"][1] - result["ci"][0] > 1.5 * (naive[1] - naive[0])


def test_a_ratio_to_a_reference_and_missing_values():
    reference = np.array([2.0, 4.0, 6.0, 8.0, 1.0, 3.0])
    values = 0.5 * reference
    values[1] = np.nan
    result = clustered(values, ["a", "a", "b", "b", "c", "c"], reference=reference)
    assert result["mean"] == pytest.approx(0.5) and result["ci"] == pytest.approx([0.5, 0.5])
    assert (result["n"], result["missing"], result["clusters"]) == (5, 1, 3)
    empty = clustered([np.nan], ["a"])
    assert (empty["mean"], empty["ci"], empty["clusters"]) == (None, None, 0)
