"""Where a stage's input rows are, and that an evaluation has two models, checked without model code:
the stage commands refuse a wrong input with these before they import the stage (torch, diffusers:
seconds), and the stages ask them too.

Each input check returns the folder that holds the rows (the path itself or its `<stage>` sub-folder,
`contract.resolve_input`) or raises StageInputError naming the path.
"""

from __future__ import annotations

import os

from artaug import storage
from artaug.config import ModelConfig
from artaug.rows import CRITIQUE, GENERATE, PAIR
from artaug.stages.contract import StageInputError, resolve_input

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CRITIQUED = ("prompt_id", "prompt", "seed", "round", "image", "error")  # the generate columns critique reads


def image_folder(path: str) -> bool:
    """A local folder with image files (the critique reads them as they are)."""
    return (
        not storage.is_uri(path)
        and os.path.isdir(path)
        and any(f.lower().endswith(IMAGE_SUFFIXES) for f in os.listdir(path))
    )


def images_to_critique(path: str) -> str | None:
    """The critique's input: the folder of a completed generate stage, else None for a local folder
    of images."""
    try:
        return resolve_input(path, "generate", CRITIQUED)
    except StageInputError:
        if image_folder(path):
            return None
        raise


def generated(path: str) -> str:
    """A completed generate stage (enhance's images)."""
    return resolve_input(path, "generate", tuple(GENERATE.names))


def critiques(path: str) -> str:
    """A completed critique stage."""
    return resolve_input(path, "critique", tuple(CRITIQUE.names))


def pairs(path: str) -> str:
    """The enhance stage's pair rows (a folder without the marker is read, with a warning)."""
    return resolve_input(path, "enhance", tuple(PAIR.names), require_complete=False)


def compared(base: ModelConfig, enhanced: ModelConfig) -> None:
    """The evaluation compares two models: the base model twice is nothing to compare."""
    if base == enhanced:
        raise StageInputError("nothing to compare: the enhanced model is the base model (give a --lora)")
