"""The miniature world (artaug/world.py) and its critics: fast, no Ray, no model."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from PIL import Image

from artaug import world
from artaug.critic.schema import parse_critique
from artaug.critic.world_critic import random_critique, silent_critique, world_critique

BEST = world.Scene("circle", "red", "blue", world.BY_NAME["size"].best, 0.0, 0.0, 0.0, 1.0)


def picture(scene: world.Scene) -> Image.Image:
    return Image.fromarray(world.render(scene))


def test_quality_has_an_interior_optimum_on_every_attribute():
    assert world.quality(BEST) == pytest.approx(1.0)
    for name, (less, more) in {"size": (-1.2, 1.0), "exposure": (-0.5, 0.5), "contrast": (-0.5, 0.5)}.items():
        low = dataclasses.replace(BEST, **{name: getattr(BEST, name) + less})
        high = dataclasses.replace(BEST, **{name: getattr(BEST, name) + more})
        assert world.quality(low) < 0.85 and world.quality(high) < 0.85, name  # too little and too much
    assert world.quality(dataclasses.replace(BEST, dx=0.25)) < 0.85


def test_measure_reads_the_attributes_back_from_the_pixels():
    rng = np.random.default_rng(3)
    agree = []
    for _ in range(150):
        scene = world.random_scene(*world.scenes()[rng.integers(168)], rng)
        measured = world.measure(
            world.render(scene), world.prompt(scene.shape, scene.colour, scene.background)
        )
        agree.append(
            [a.word(scene.value(a.name)) == a.word(measured.scene.value(a.name)) for a in world.ATTRIBUTES]
        )
    share = np.mean(agree, axis=0)
    assert share[0] > 0.95 and share[1] > 0.95  # size and placement: exact but for edge pixels
    assert share[2] > 0.8 and share[3] > 0.8  # exposure and contrast: clipped channels hide some


def test_a_caption_s_words_tell_the_truth_and_parse_back():
    rng = np.random.default_rng(0)
    scene = world.random_scene("triangle", "orange", "white", rng, words=["small", "dark"])
    assert world.BY_NAME["size"].word(scene.size) == "small"
    assert world.BY_NAME["exposure"].word(scene.exposure) == "dark"
    text = world.caption(scene, ["small", "dark"])
    assert text == "an orange triangle on white, small, dark"
    assert world.parse(text) == ("triangle", "orange", "white")
    assert world.requested(text) == {"size": "small", "exposure": "dark"}
    assert world.parse("a watercolour of a fox") is None


def test_the_world_critic_asks_for_the_comfortable_word_of_each_attribute_that_is_off():
    poor = dataclasses.replace(BEST, size=math.log(0.03), dx=0.2, exposure=math.log(0.5))
    critique = parse_critique(json.dumps(world_critique(picture(poor), "a red circle on blue")))
    notes = {a["note"] for a in critique["adjustments"]}
    assert notes == {"medium", "centered", "well lit"}
    (region,) = critique["regions"]
    x0, y0, x1, y1 = region["box"]
    assert x0 <= 0.5 + 0.2 - 0.1 and x1 >= 0.7 and x0 < 0.5 - 0.17 < 0.5 + 0.17 < x1  # subject and target
    assert region["prompt"].startswith("a red circle on blue") and "medium" in region["prompt"]
    assert critique["rating"] < 8
    best = world_critique(picture(BEST), "a red circle on blue")
    assert best["adjustments"] == [] and best["regions"] == [] and best["rating"] == 10


def test_the_world_critic_does_not_second_guess_a_word_the_prompt_chose():
    dark = dataclasses.replace(BEST, exposure=math.log(0.5))
    asked = world_critique(picture(dark), "a red circle on blue, dark")
    assert asked["adjustments"] == []
    assert world_critique(picture(dark), "a photo of a dog")["adjustments"] == []  # not a world scene


def test_the_controls_random_and_silent_are_schema_valid_and_reproducible():
    image, prompt = picture(BEST), "a red circle on blue"
    first = random_critique(image, prompt)
    assert first == random_critique(image, prompt)
    parsed = parse_critique(json.dumps(first))
    assert parsed["regions"] and parsed["adjustments"]
    assert {a["note"] for a in parsed["adjustments"]} <= set(world.WORDS)
    other = random_critique(picture(dataclasses.replace(BEST, dx=0.1)), prompt)
    assert other != first  # seeded by the image
    silent = parse_critique(json.dumps(silent_critique(image, prompt)))
    assert silent["adjustments"] == [] and silent["regions"] == [] and silent["rewritten_prompt"] == ""


def test_the_world_model_s_text_tells_subject_from_background():
    """FLUX gives text tokens no position: with words read alone, "a red circle on blue" and "a blue
    circle on red" reach the transformer as the same bag of tokens (each token of one has a near twin
    in the other). Reading each word with the one before it leaves tokens without a twin."""
    import torch

    from artaug.models.world_flux import untrained_world_flux

    def farthest_from_a_twin(pipe, caption: str, other: str) -> float:
        """The largest distance from a token of `caption` to its nearest token of `other`, relative
        to its length (position-less attention sees only the set of tokens)."""
        a, b = (pipe.encode_prompt([c], None, max_sequence_length=32)[0][0] for c in (caption, other))
        return float((torch.cdist(a, b).min(dim=1).values / a.norm(dim=1)).max())

    ours, plain = untrained_world_flux(), untrained_world_flux(previous_word=False)
    first, swapped = "a red circle on blue", "a blue circle on red"
    assert farthest_from_a_twin(plain, first, swapped) < 0.1
    assert farthest_from_a_twin(ours, first, swapped) > 0.5
    assert farthest_from_a_twin(ours, first, first) < 0.01
