"""The interaction algorithm's plan: what a critique asks the synthesis model to regenerate.

A parsed critique (`artaug.critic.schema`) becomes the global prompt P and the regions (box, local
prompt P_i, weight s_i) of a regional job (`artaug.models.sampling.Job`) with the image's own seed, or
nothing when it asks for nothing this mode can draw. The enhance stage and the served API
(`/v1/images/enhance`, `"enhance": true`) plan with this one function, so both regenerate alike.
"""

from __future__ import annotations

from artaug.config import EnhanceConfig
from artaug.models.sampling import Job, Region


def global_prompt(prompt: str, critique: dict, choice: str) -> str:
    """The global prompt P of the enhancement job for `enhance.global_prompt`.

    - "original": the prompt the image was generated with; the critique's global adjustments are
      left out (regional mode then changes only what its regions ask for);
    - "rewritten": the critic's rewritten prompt when it gives one, else the original;
    - "folded": the original prompt followed by each global adjustment as text (its note, or
      "increase exposure" when the note is empty), so exposure, camera angle or atmosphere reach
      the whole image while the prompt's own words stay first (CLIP reads only 77 tokens).
    """
    if choice == "rewritten":
        return critique["rewritten_prompt"].strip() or prompt
    if choice == "folded":
        notes = [
            a["note"].strip() or f"{a['direction']} {a['aspect'].replace('_', ' ')}"
            for a in critique["adjustments"]
        ]
        return ", ".join([prompt.rstrip(" ,."), *notes]) if notes else prompt
    return prompt


def regional_job(prompt: str, seed: int, critique: dict, settings: EnhanceConfig) -> tuple[Job, list] | None:
    """(the regenerate job, the critique's regions it uses), or None when the critique asks for no
    region and leaves the global prompt as it was (the image stays as it is)."""
    regions = critique["regions"][: settings.max_regions]
    enhance_prompt = global_prompt(prompt, critique, settings.global_prompt)
    if not regions and enhance_prompt == prompt:
        return None
    composed = [Region(tuple(r["box"]), r["prompt"], settings.mask_scale) for r in regions]
    return Job(enhance_prompt, seed, composed), regions


def sampling_options(settings: EnhanceConfig) -> dict:
    """The keyword arguments of `sample` that shape the regional masks."""
    return {"blur_kernel": settings.blur_kernel, "blur_sigma": settings.blur_sigma,
            "coverage": settings.mask_coverage}  # fmt: skip
