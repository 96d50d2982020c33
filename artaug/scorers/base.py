"""The scorer interface, the registry of scorer families, and safe loading of weight files.

Third-party heads are often published as pickled `.pth`/`.pt` files. Unpickling can run arbitrary
code, so they are read with `torch.load(weights_only=True)` only: a file that needs more than
tensors (and plain containers) is refused. `artaug models convert` rewrites them as safetensors.
"""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from artaug.config import ScorersConfig
from artaug.errors import ArtaugError
from artaug.hub import looks_local

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class ScorerWeightsError(ArtaugError, FileNotFoundError):
    """Scorer weights are missing, not configured, or refused; the message names the path or field."""


class Scorer:
    """Scores a batch of images with their prompts. Subclasses set `name` and `columns`."""

    name: str = ""
    columns: tuple[str, ...] = ()
    """The score columns `score` returns, one value per image each."""

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, np.ndarray]:
        raise NotImplementedError


# name -> (module, builder name, columns). Imported lazily so `import artaug.scorers` stays cheap.
SCORERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "laion_aesthetic": ("artaug.scorers.clip_family", "LaionAesthetic", ("laion_aesthetic",)),
    "clip_score": ("artaug.scorers.clip_family", "ClipScore", ("clip_score",)),
    "preference": ("artaug.scorers.clip_family", "PreferenceScore", ("preference",)),
    "siglip_aesthetic": ("artaug.scorers.siglip", "SiglipAesthetic", ("siglip_aesthetic",)),
    "image_stats": (
        "artaug.scorers.image_stats",
        "ImageStats",
        tuple(f"stats_{key}" for key in ("exposure", "contrast", "saturation", "colourfulness", "sharpness")),
    ),
    # The miniature world's (artaug/world.py): the filter's aesthetic, the evaluation's, alignment.
    "world_aesthetic": ("artaug.scorers.world", "WorldAesthetic", ("world_aesthetic",)),
    "world_quality": ("artaug.scorers.world", "WorldQuality", ("world_quality",)),
    "world_alignment": ("artaug.scorers.world", "WorldAlignment", ("world_alignment",)),
}


def scorer_for_column(column: str) -> str:
    """The scorer that produces `column`; ScorerWeightsError-free ValueError when none does."""
    for name, (_, _, columns) in SCORERS.items():
        if column in columns:
            return name
    known = sorted(c for _, _, cols in SCORERS.values() for c in cols)
    raise ValueError(f"no scorer produces the column {column!r} (known: {', '.join(known)})")


def scorers_for_columns(columns: list[str]) -> list[str]:
    """The scorers (each once, in order) that produce `columns`; ValueError naming an unknown column."""
    return list(dict.fromkeys(scorer_for_column(c) for c in columns))


def check_scorer_name(name: str) -> None:
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r} (known: {', '.join(SCORERS)})")


def build_scorer(name: str, cfg: ScorersConfig, device: torch.device | None = None) -> Scorer:
    """Load scorer `name` with the sources in cfg (fails fast on missing weights, naming the path)."""
    check_scorer_name(name)
    module, builder, _ = SCORERS[name]
    factory: Callable[..., Scorer] = getattr(importlib.import_module(module), builder)
    return factory(cfg, device or pick_device(cfg.device))


def check_scorer_sources(name: str, cfg: ScorersConfig) -> None:
    """Before Ray starts: every local file or folder scorer `name` needs exists."""
    check_scorer_name(name)
    needs = {
        "laion_aesthetic": [("scorers.clip", cfg.clip, False), ("scorers.laion_head", cfg.laion_head, True)],
        "clip_score": [("scorers.clip", cfg.clip, False)],
        "preference": [
            ("scorers.preference", cfg.preference, False),
            *(
                [("scorers.preference_weights", cfg.preference_weights, True)]
                if cfg.preference_weights
                else []
            ),
        ],
        "siglip_aesthetic": [
            ("scorers.siglip", cfg.siglip, False),
            ("scorers.siglip_head", cfg.siglip_head, True),
        ],
        "image_stats": [],
        "world_aesthetic": [],
        "world_quality": [],
        "world_alignment": [],
    }[name]
    for field_name, source, is_file in needs:
        check_source(field_name, source, is_file)
    if name in ("world_quality", "world_alignment"):  # shipped weights: present unless a build failed
        importlib.import_module("artaug.scorers.world").check_weights(name)


def check_source(field_name: str, source: str, is_file: bool) -> None:
    if not source.strip():
        raise ScorerWeightsError(f'{field_name} is not set (a path, a hub id, or "tiny")')
    if source == "tiny":
        return
    path = os.path.expanduser(source)
    if is_file and not os.path.isfile(path):
        raise ScorerWeightsError(f"{field_name}: weights file {path!r} does not exist")
    if not is_file and looks_local(source) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ScorerWeightsError(f"{field_name}: {path!r} is not a model folder (no config.json)")


def pick_device(device: str) -> torch.device:
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or from a pickle read with weights_only=True only."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise ScorerWeightsError(f"weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        return load_file(path)
    if not path.endswith(PICKLE_SUFFIXES):
        raise ScorerWeightsError(
            f"{path!r}: expected .safetensors or a pickle ({', '.join(PICKLE_SUFFIXES)})"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ScorerWeightsError(
            f"{path!r}: refused: this pickle needs more than tensors to load ({first_line}); only "
            "weights_only pickles are read, because unpickling anything else can run code"
        ) from None
    return _tensors_only(data, path)


def _tensors_only(data, path: str) -> dict[str, torch.Tensor]:
    """A flat {name: tensor}; unwraps one {"state_dict": ...} level as training scripts save it."""
    if isinstance(data, dict) and set(data) & {"state_dict", "model"} and len(data) <= 4:
        inner = data.get("state_dict", data.get("model"))
        if isinstance(inner, dict):
            data = inner
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ScorerWeightsError(f"{path!r}: expected a state dict of tensors")
    return {str(k): v for k, v in data.items()}


def convert_to_safetensors(source: str, target: str) -> int:
    """`artaug models convert`: a weights_only pickle rewritten as safetensors; returns tensor count."""
    tensors = load_state_dict(source)
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, os.path.expanduser(target))
    return len(tensors)


def to_numpy(values: torch.Tensor) -> np.ndarray:
    return values.detach().float().cpu().numpy().astype(np.float64)
