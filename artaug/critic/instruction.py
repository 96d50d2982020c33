"""The instruction the critic receives with each image. Versioned: a change is a new version."""

from __future__ import annotations

TEMPLATE_VERSION = "instruction-v1"

_INSTRUCTION = """You are an expert photographer and art director. The image was generated from this prompt:
"{prompt}"
Say what would make it more beautiful while keeping its content. Consider exposure, lighting, \
contrast, saturation, colour temperature, sharpness, composition, camera angle and atmosphere, and \
name up to 4 regions that should be redrawn, each with a short prompt for that region.
Answer with one JSON object and nothing else:
{{"assessment": "<one or two sentences>",
 "rating": <integer 1-10, aesthetic quality>,
 "adjustments": [{{"aspect": "<exposure|contrast|saturation|color_temperature|lighting|sharpness|\
composition|camera_angle|atmosphere|color|other>", "direction": "<increase|decrease|change>", \
"strength": <integer 1-5>, "note": "<short note>"}}],
 "regions": [{{"box": [x0, y0, x1, y1], "prompt": "<what this region should show>"}}],
 "rewritten_prompt": "<an improved prompt for the whole image, or empty>"}}
{box_rule}"""

BOX_RULES = {
    "norm1000": "Boxes are integers from 0 to 1000 relative to the image width and height, "
    "with x0 < x1 and y0 < y1.",
    "pixels": "Boxes are integer pixel coordinates of the image as you see it, with x0 < x1 and y0 < y1.",
}


def instruction(prompt: str, box_format: str = "norm1000") -> str:
    return _INSTRUCTION.format(prompt=prompt.replace('"', "'"), box_rule=BOX_RULES[box_format])


def chat_messages(image_url: str, prompt: str, box_format: str = "norm1000") -> list[dict]:
    """OpenAI-style chat messages: the image (a data URL) then the instruction."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": instruction(prompt, box_format)},
            ],
        }
    ]
