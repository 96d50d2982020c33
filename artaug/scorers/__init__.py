"""Image scorers behind one interface: `scorer.score(images, prompts) -> {column: values}`.

from artaug.scorers import build_scorer
scorer = build_scorer("laion_aesthetic", cfg.scorers)
scorer.score([image], ["a red fox at dawn"])  # {"laion_aesthetic": array([5.8])}
"""

from artaug.scorers.base import SCORERS, Scorer, ScorerWeightsError, build_scorer, scorer_for_column

__all__ = ["SCORERS", "Scorer", "ScorerWeightsError", "build_scorer", "scorer_for_column"]
