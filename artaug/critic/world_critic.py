"""Critics of the miniature world (artaug/world.py) that look at the pixels, and its two controls.

- world: measures the picture (`world.measure`) and, for every free attribute the prompt leaves open
  and the picture gets wrong, asks for the attribute's comfortable word ("medium", "centered", "well
  lit", "crisp") as a global adjustment whose note is that word, so `enhance.global_prompt: folded`
  regenerates with it. When the subject is badly sized or placed it also names a region: a box around
  the subject and where a medium, centred subject would stand, with the scene's own prompt and those
  words as the local prompt. Its rules come from the world's description (`world.ATTRIBUTES`), not
  from any scorer.
- random: the control that does not look: the same kind of suggestions (attribute words, one box,
  a local prompt in the world's vocabulary) chosen at random, seeded by the image, so a run shows
  what looking adds.
- silent: asks for nothing (the null enhancement: every after image is its before image).
"""

from __future__ import annotations

import zlib

import numpy as np
from PIL import Image

from artaug import world

ASPECT = {"size": "composition", "placement": "composition", "exposure": "exposure", "contrast": "contrast"}
TARGET_SIDE = float(np.sqrt(np.exp(world.BY_NAME["size"].best)))  # a medium subject's extent
PAD = 0.04


def _critique(assessment: str, rating: int, adjustments: list, regions: list, rewritten: str = "") -> dict:
    return {
        "assessment": assessment[:200],
        "rating": int(min(10, max(1, rating))),
        "adjustments": adjustments[:4],
        "regions": regions[:4],
        "rewritten_prompt": rewritten[:200],
    }


def world_critique(image: Image.Image, prompt: str) -> dict:
    """A schema-shaped critique (0-1000 integer boxes) of a world picture."""
    scene_id = world.parse(prompt)
    if scene_id is None:
        return _critique("Not a scene of the miniature world; nothing to suggest.", 5, [], [])
    measured = world.measure(np.asarray(image.convert("RGB")), prompt)
    asked = world.requested(prompt)
    adjustments, problems = [], []
    for attribute in world.ATTRIBUTES:
        value = measured.scene.value(attribute.name)
        word, middle = attribute.word(value), world.MIDDLE[attribute.name]
        if attribute.name in asked or word == middle:
            continue  # a word the user chose is not second-guessed
        distance = abs(value - attribute.best) / attribute.width
        direction = "change" if attribute.name == "placement" else (
            "increase" if value < attribute.best else "decrease")  # fmt: skip
        strength = int(min(5, max(1, round(distance * 1.5))))
        adjustments.append({"aspect": ASPECT[attribute.name], "direction": direction,
                            "strength": strength, "note": middle})  # fmt: skip
        problems.append(f"{attribute.name} is {word}")
    words = [a["note"] for a in adjustments]
    regions = []
    if measured.found and any(p.startswith(("size", "placement")) for p in problems):
        regions.append(
            {"box": _subject_box(measured.box), "prompt": world.caption(measured.scene, words)[:100]}
        )
    full = [world.MIDDLE[a.name] for a in world.ATTRIBUTES if a.name not in asked]
    rewritten = world.caption(measured.scene, full) if adjustments else ""
    assessment = (
        ("The " + "; ".join(problems) + ".") if problems else "Well composed and exposed; no change needed."
    )
    rating = 10 - sum(a["strength"] for a in adjustments)
    return _critique(assessment, rating, adjustments, regions, rewritten)


def _subject_box(box: tuple[float, float, float, float]) -> list[int]:
    """Around the subject and the place a medium, centred subject takes, padded; 0-1000 integers."""
    half = TARGET_SIDE / 2
    x0, y0 = min(box[0], 0.5 - half) - PAD, min(box[1], 0.5 - half) - PAD
    x1, y1 = max(box[2], 0.5 + half) + PAD, max(box[3], 0.5 + half) + PAD
    return [int(round(1000 * min(1.0, max(0.0, v)))) for v in (x0, y0, x1, y1)]


def random_critique(image: Image.Image, prompt: str) -> dict:
    """Suggestions of the world critic's kind, chosen at random (seeded by the image and prompt)."""
    seed = zlib.crc32(np.asarray(image.convert("RGB")).tobytes() + prompt.encode())
    rng = np.random.default_rng(seed)
    scene_id = world.parse(prompt)
    if scene_id is None:
        return _critique("Not a scene of the miniature world; nothing to suggest.", 5, [], [])
    picked = rng.permutation(len(world.ATTRIBUTES))[: rng.integers(1, len(world.ATTRIBUTES) + 1)]
    adjustments = []
    for index in sorted(picked):
        attribute = world.ATTRIBUTES[index]
        word = attribute.bins[rng.integers(len(attribute.bins))][0]
        direction = ("increase", "decrease", "change")[rng.integers(3)]
        adjustments.append({"aspect": ASPECT[attribute.name], "direction": direction,
                            "strength": int(rng.integers(1, 6)), "note": word})  # fmt: skip
    words = [a["note"] for a in adjustments]
    corner = rng.uniform(0, 0.6, size=2)
    extent = rng.uniform(0.25, 1.0 - corner.max())
    box = [int(round(1000 * v)) for v in (corner[0], corner[1], corner[0] + extent, corner[1] + extent)]
    regions = [{"box": box, "prompt": world.caption(world.Scene(*scene_id, 0, 0, 0, 0, 1), words)[:100]}]
    return _critique("Random suggestions (the control critic does not look).", int(rng.integers(1, 11)),
                     adjustments, regions)  # fmt: skip


def silent_critique(image: Image.Image, prompt: str) -> dict:
    return _critique("No change suggested (the silent critic never suggests one).", 5, [], [])


# Critics that need no model: the critique stage runs them in a plain Ray Data map.
PIXEL_CRITICS = {"world": world_critique, "random": random_critique, "silent": silent_critique}
