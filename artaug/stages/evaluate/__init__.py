"""The evaluate stage: running (`run`), what it measures (`metrics`) and how it is shown (`presentation`)."""

from artaug.stages.evaluate.run import evaluate

__all__ = ["evaluate"]
