"""artaug: a Ray-native implementation of ArtAug (arXiv 2412.12888)."""

__version__ = "0.1.0"
