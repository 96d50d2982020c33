"""The miniature world: coloured shapes on plain backgrounds, its vocabulary, renderer and taste.

A picture in this world is a scene (shape, colour, background) drawn with four free attributes:
subject size (share of the frame), placement (offset of the subject's centre from the frame's),
exposure (a gain on every pixel) and contrast (a stretch about mid-grey). Each attribute has words
(`ATTRIBUTES`) and one word names its comfortable middle: a picture is best with a medium subject,
centred, well lit and crisp; too much is as bad as too little (`quality`).

Everything else builds on this description, never on each other:
- the synthesis model is pretrained on `render`ed scenes captioned with `caption` (models/world_flux.py);
- the world critic measures a picture (`measure`) and asks for the middle word of every attribute
  that is off (critic/world_critic.py): its rules come from `ATTRIBUTES`, not from a scorer;
- the filter's aesthetic is `quality(measure(image))`, a hand-written estimate from the pixels;
- the evaluation's aesthetic is a small CNN trained on rendered pictures labelled with `quality` of
  their true attributes (scorers/world.py), so the filter and the evaluation do not share a function.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

SIDE = 128
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "orange": (235, 130, 30),
    "purple": (140, 50, 170),
    "white": (235, 235, 235),
    "black": (25, 25, 25),
}
GREY = 128.0  # contrast stretches about mid-grey


@dataclass(frozen=True)
class Attribute:
    """A free attribute: its prior range, the bins its words name, and where its optimum lies."""

    name: str
    low: float
    high: float
    bins: tuple[tuple[str, float, float], ...]
    """(word, from, to): the value range each word describes; the middle bin is the comfortable one."""
    best: float
    width: float
    """quality falls as exp(-((value - best) / width)^2)."""

    @property
    def middle(self) -> str:
        return self.bins[len(self.bins) // 2][0]

    def word(self, value: float) -> str:
        return next((w for w, lo, hi in self.bins if lo <= value < hi), self.bins[-1][0])

    def term(self, value: float) -> float:
        return math.exp(-(((value - self.best) / self.width) ** 2))


# Size is log(area share); placement the distance of the subject's centre from the frame's centre in
# frame sides; exposure log(gain); contrast the stretch factor.
ATTRIBUTES = (
    Attribute("size", math.log(0.02), math.log(0.45),
              (("small", -9, math.log(0.07)), ("medium", math.log(0.07), math.log(0.22)),
               ("large", math.log(0.22), 9)), math.log(0.125), 0.55),
    Attribute("placement", 0.0, 0.35, (("centered", -1, 0.09), ("off-center", 0.09, 9)), 0.0, 0.13),
    Attribute("exposure", math.log(0.45), math.log(1.9),
              (("dark", -9, math.log(0.72)), ("well lit", math.log(0.72), math.log(1.35)),
               ("bright", math.log(1.35), 9)), 0.0, 0.32),
    Attribute("contrast", 0.35, 1.75,
              (("flat", -9, 0.7), ("crisp", 0.7, 1.35), ("harsh", 1.35, 9)), 1.0, 0.3),
)  # fmt: skip
BY_NAME = {a.name: a for a in ATTRIBUTES}
# Placement's middle bin is its first ("centered"); the others have three bins.
MIDDLE = {"size": "medium", "placement": "centered", "exposure": "well lit", "contrast": "crisp"}
WORDS = {w: a.name for a in ATTRIBUTES for w, _, _ in a.bins}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: float
    """log of the subject's share of the frame's area."""
    dx: float
    dy: float
    """Offset of the subject's centre from the frame's centre, in frame sides."""
    exposure: float
    """log of the gain on every pixel."""
    contrast: float

    @property
    def placement(self) -> float:
        return math.hypot(self.dx, self.dy)

    def value(self, name: str) -> float:
        return getattr(self, name)


def scenes() -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) with two different colours: 3 x 8 x 7 = 168."""
    return [(s, c, b) for s in SHAPES for c in COLOURS for b in COLOURS if c != b]


def prompt(shape: str, colour: str, background: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} on {background}"


def caption(scene: Scene, words: list[str] | None = None) -> str:
    """The scene's prompt, then the given attribute words (the pretraining captions' form)."""
    return ", ".join([prompt(scene.shape, scene.colour, scene.background), *(words or [])])


def attribute_words(scene: Scene) -> list[str]:
    return [a.word(scene.value(a.name)) for a in ATTRIBUTES]


def parse(text: str) -> tuple[str, str, str] | None:
    """(shape, colour, background) of a world prompt, or None when it names no scene."""
    found = re.search(r"\b(\w+) (circle|square|triangle) on (\w+)", text.lower())
    if not found or found[1] not in COLOURS or found[3] not in COLOURS:
        return None
    return found[2], found[1], found[3]


def requested(text: str) -> dict[str, str]:
    """{attribute: word} for the attribute words a prompt asks for."""
    return {WORDS[w]: w for w in sorted(WORDS, key=len, reverse=True) if re.search(rf"\b{w}\b", text.lower())}


def random_scene(shape: str, colour: str, background: str, rng: np.random.Generator, words=()) -> Scene:
    """A scene with free attributes drawn from the prior; a word given for an attribute confines it
    to that word's bin (so a caption's words always tell the truth)."""
    fixed = {WORDS[w]: w for w in words}
    values = {}
    for a in ATTRIBUTES:
        low, high = a.low, a.high
        if a.name in fixed:
            _, lo, hi = next(b for b in a.bins if b[0] == fixed[a.name])
            low, high = max(low, lo), min(high, hi)
        values[a.name] = float(rng.uniform(low, high))
    side = math.sqrt(math.exp(values["size"]))  # the subject's extent, in frame sides
    room = max(0.0, 0.5 - 0.6 * side)  # keep the subject inside the frame
    reach = min(values["placement"], room * math.sqrt(2))
    angle = float(rng.uniform(0, 2 * math.pi))
    dx, dy = np.clip([reach * math.cos(angle), reach * math.sin(angle)], -room, room)
    return Scene(shape, colour, background, values["size"], float(dx), float(dy), values["exposure"],
                 values["contrast"])  # fmt: skip


def render(scene: Scene, side: int = SIDE) -> np.ndarray:
    """A side x side uint8 RGB picture of the scene."""
    area = math.exp(scene.size) * side * side
    cx, cy = (0.5 + scene.dx) * side, (0.5 + scene.dy) * side
    y, x = np.mgrid[:side, :side] + 0.5
    if scene.shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= area / math.pi
    elif scene.shape == "square":
        half = math.sqrt(area) / 2
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    else:  # an upright equilateral triangle whose centroid is (cx, cy)
        edge = math.sqrt(4 * area / math.sqrt(3))
        height = edge * math.sqrt(3) / 2
        top, bottom = cy - 2 * height / 3, cy + height / 3
        half_width = (y - top) / height * edge / 2
        inside = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)
    image = np.empty((side, side, 3), dtype=np.float64)
    image[:] = COLOURS[scene.background]
    image[inside] = COLOURS[scene.colour]
    image = GREY + scene.contrast * (image - GREY)
    image = image * math.exp(scene.exposure)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def quality(scene: Scene) -> float:
    """The world's taste, 0-1: the mean of each attribute's closeness to its optimum."""
    return float(np.mean([a.term(scene.value(a.name)) for a in ATTRIBUTES]))


@dataclass(frozen=True)
class Measurement:
    """What `measure` reads off a picture: the scene's free attributes and the subject's box."""

    scene: Scene
    box: tuple[float, float, float, float]
    """The subject's bounding box, x0, y0, x1, y1 as fractions of the frame."""
    found: bool
    """False when no subject stands out from the background (then size and placement are guesses)."""


def measure(image: np.ndarray, text: str) -> Measurement:
    """Estimate a picture's free attributes from its pixels and the scene its prompt names.

    The background is the median of the frame's border; the subject, the pixels far from it. The
    nominal colours of the prompt's subject and background are then fitted to the observed ones
    with observed = a + b * nominal per channel, which the renderer makes exact: b = gain x stretch,
    a = gain x mid-grey x (1 - stretch).
    """
    pixels = np.asarray(image, dtype=np.float64)[..., :3]
    h, w = pixels.shape[:2]
    shape, colour, background = parse(text) or ("circle", "white", "black")
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])  # fmt: skip
    back = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - back, axis=-1)
    subject = distance > max(24.0, 0.35 * float(distance.max()))
    found = bool(subject.sum() >= 4)
    if found:
        ys, xs = np.nonzero(subject)
        front = np.median(pixels[subject], axis=0)
        share = subject.mean()
        dx, dy = (xs.mean() + 0.5) / w - 0.5, (ys.mean() + 0.5) / h - 0.5
        box = (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)
    else:
        front, share, dx, dy, box = back, 1.0 / (h * w), 0.0, 0.0, (0.0, 0.0, 1.0, 1.0)
    nominal = np.concatenate([COLOURS[background], COLOURS[colour]]).astype(np.float64)
    observed = np.concatenate([back, front])
    unclipped = (observed > 1) & (observed < 254)  # a clipped channel says only "at least" or "at most"
    if unclipped.sum() >= 3 and np.ptp(nominal[unclipped]) > 0:
        nominal, observed = nominal[unclipped], observed[unclipped]
    b, a = np.polyfit(nominal, observed, 1) if np.ptp(nominal) > 0 else (1.0, 0.0)
    gain = float(np.clip((a + GREY * b) / GREY, 1e-3, 1e3))
    stretch = float(np.clip(b / gain, 1e-3, 1e3))
    scene = Scene(shape, colour, background, math.log(max(share, 1e-4)), float(dx), float(dy),
                  math.log(gain), float(stretch))  # fmt: skip
    return Measurement(scene, tuple(float(v) for v in box), found)
