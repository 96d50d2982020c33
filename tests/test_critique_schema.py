"""The critique schema, the parser, box conversion and the heuristic critic (no model, no Ray)."""

import json

import jsonschema
import numpy as np
import pytest
from PIL import Image

from artaug.critic.heuristic import heuristic_critique
from artaug.critic.instruction import TEMPLATE_VERSION, instruction
from artaug.critic.schema import (
    CritiqueError,
    critique_schema,
    normalise_box,
    parse_critique,
    qwen25_resized_size,
)
from artaug.images import BadImageError, decode_image, image_statistics

GOOD = {
    "assessment": "Pleasant but dim.",
    "rating": 6,
    "adjustments": [{"aspect": "exposure", "direction": "increase", "strength": 2, "note": "brighter"}],
    "regions": [{"box": [100, 200, 500, 900], "prompt": "a glowing lantern"}],
    "rewritten_prompt": "a lantern-lit street at dusk, warm light",
}


def test_good_critique_validates_and_boxes_are_normalised():
    jsonschema.validate(GOOD, critique_schema())
    parsed = parse_critique(json.dumps(GOOD))
    assert parsed["regions"][0]["box"] == [0.1, 0.2, 0.5, 0.9]
    assert parsed["rejected_regions"] == [] and parsed["schema_version"] == "critique-v1"


def test_schema_is_bounded_so_a_decoder_always_finishes():
    def walk(node):
        if node.get("type") == "string":
            assert "maxLength" in node
        if node.get("type") == "integer":
            assert "minimum" in node and "maximum" in node
        if node.get("type") == "array":
            assert "maxItems" in node
            walk(node["items"])
        for child in node.get("properties", {}).values():
            walk(child)

    schema = critique_schema()
    walk(schema)
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rating": 11}, "rating"),
        ({"rating": "7"}, "rating"),
        (
            {"adjustments": [{"aspect": "vibes", "direction": "increase", "strength": 2, "note": ""}]},
            "aspect",
        ),
        (
            {"adjustments": [{"aspect": "exposure", "direction": "up", "strength": 2, "note": ""}]},
            "direction",
        ),
        ({"regions": [{"box": [1, 2, 3], "prompt": "x"}]}, "box"),
        ({"regions": [{"box": [0, 0, 1001, 10], "prompt": "x"}]}, "box"),
        ({"assessment": "x" * 201}, "assessment"),
        ({"extra": 1}, "Additional properties"),
    ],
)
def test_bad_critiques_are_invalid(change, message):
    with pytest.raises(CritiqueError, match=message):
        parse_critique(json.dumps({**GOOD, **change}))


@pytest.mark.parametrize("raw", ["", "not json", '{"assessment": "cut off', "[1, 2]", '{"rating": 5}'])
def test_malformed_answers_are_invalid(raw):
    with pytest.raises(CritiqueError):
        parse_critique(raw)


def test_raw_control_characters_in_strings_are_tolerated():
    raw = json.dumps(GOOD).replace("Pleasant", "Plea\tsant")
    assert parse_critique(raw)["assessment"].startswith("Plea\tsant")


def test_inverted_or_empty_boxes_are_rejected_with_the_reason():
    answer = {**GOOD, "regions": [{"box": [500, 100, 400, 200], "prompt": "bad"}, GOOD["regions"][0]]}
    parsed = parse_critique(json.dumps(answer))
    assert [r["prompt"] for r in parsed["regions"]] == ["a glowing lantern"]
    assert "x0<x1" in parsed["rejected_regions"][0]["reason"]
    with pytest.raises(CritiqueError, match="region 3"):
        normalise_box([10, 10, 10, 20], (1000, 1000), 3)


def test_qwen25_pixel_boxes_are_converted_by_the_resized_size():
    # A 1024x768 image is resized by the Qwen2.5-VL processor to multiples of 28.
    size = qwen25_resized_size(1024, 768, 3136, 12845056)
    assert size == (1036, 756)
    parsed = parse_critique(
        json.dumps({**GOOD, "regions": [{"box": [0, 0, 518, 378], "prompt": "top left"}]}),
        box_format="pixels",
        image_size=size,
    )
    assert parsed["regions"][0]["box"] == [0.0, 0.0, 0.5, 0.5]
    # A budget smaller than the image shrinks it, keeping the aspect ratio within a patch.
    w, h = qwen25_resized_size(2000, 1000, 3136, 200_000)
    assert w * h <= 200_000 and w % 28 == 0 and h % 28 == 0 and abs(w / h - 2) < 0.2


def test_instruction_is_versioned_and_names_the_prompt():
    text = instruction('a "quoted" cat')
    assert TEMPLATE_VERSION == "instruction-v1"
    assert "a 'quoted' cat" in text and "rating" in text and "0 to 1000" in text


def flat(value: float, size=64) -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), int(value * 255), dtype=np.uint8))


def test_heuristic_critic_finds_known_faults():
    rng = np.random.default_rng(0)
    texture = rng.random((64, 64, 1))
    dark = Image.fromarray((np.repeat(texture, 3, axis=2) * 50).astype(np.uint8))
    washed = Image.fromarray((150 + np.repeat(texture, 3, axis=2) * 20).astype(np.uint8))
    for image, aspect, direction in ((dark, "exposure", "increase"), (washed, "contrast", "increase")):
        critique = heuristic_critique(image, "a street")
        jsonschema.validate(critique, critique_schema())
        found = {(a["aspect"], a["direction"]) for a in critique["adjustments"]}
        assert (aspect, direction) in found, critique
    bright = Image.fromarray((205 + np.repeat(texture, 3, axis=2) * 50).astype(np.uint8))
    assert ("exposure", "decrease") in {
        (a["aspect"], a["direction"]) for a in heuristic_critique(bright, "")["adjustments"]
    }


def test_heuristic_critic_marks_a_dark_region_and_is_deterministic():
    pixels = np.random.default_rng(1).integers(60, 200, (90, 90, 3)).astype(np.uint8)
    pixels[:30, :30] = 5  # the top-left ninth is nearly black
    image = Image.fromarray(pixels)
    critique = heuristic_critique(image, "a garden")
    assert critique == heuristic_critique(image, "a garden")
    assert [r["box"] for r in critique["regions"]] == [[0, 0, 333, 333]]
    assert "shadows" in critique["regions"][0]["prompt"]
    assert image_statistics(flat(0.5))["contrast"] == 0


def test_corrupt_and_empty_images_are_refused():
    with pytest.raises(BadImageError, match="empty"):
        decode_image(b"")
    with pytest.raises(BadImageError, match="corrupt"):
        decode_image(b"\x89PNG\r\n\x1a\nnot really")
