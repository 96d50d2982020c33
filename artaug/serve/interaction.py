"""The interaction at request time: generate (or take the client's image), critique, regenerate.

The ingress runs these coroutines under the request's timeout; every deployment call is awaited
through `awaited`, so a timeout or a client that goes away cancels whichever call is running (the
denoising loop stops before its next step; a critique already asked finishes, and nothing follows
it). The plan from critique to regeneration is the enhance stage's (`artaug.models.interaction`).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses

from ray.serve.handle import DeploymentHandle

from artaug.config import RunConfig
from artaug.models.interaction import regional_job
from artaug.serve.api import ImageJob


async def awaited(response):
    """The result of a deployment call; cancelling the task that awaits it cancels the call too."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise


async def enhanced(model: DeploymentHandle, critic: DeploymentHandle, cfg: RunConfig, job: ImageJob,
                   originals: list[dict]) -> list[dict]:  # fmt: skip
    """Each original image ({"b64_json", "seed"}) critiqued and regenerated, concurrently."""
    return list(await asyncio.gather(*(_enhance(model, critic, cfg, job, o) for o in originals)))


async def _enhance(model, critic, cfg: RunConfig, job: ImageJob, original: dict) -> dict:
    answer = await awaited(critic.critique.remote(base64.b64decode(original["b64_json"]), job.prompt))
    item = {**original, "original_b64_json": original["b64_json"], "critique": answer["critique"],
            "critique_error": answer["error"], "regions": [], "enhance_prompt": job.prompt,
            "unchanged": True}  # fmt: skip
    planned = answer["critique"] and regional_job(
        job.prompt, original["seed"], answer["critique"], cfg.enhance
    )
    if not planned:  # no usable critique, or one that asks for nothing to redraw: the image stays
        return item
    regenerate, regions = planned
    again = dataclasses.replace(job, prompt=regenerate.prompt, n=1, seed=original["seed"])
    [after] = await awaited(model.generate.remote(again, tuple(regenerate.regions)))
    return {**item, "b64_json": after["b64_json"], "regions": regions, "enhance_prompt": regenerate.prompt,
            "unchanged": False}  # fmt: skip
