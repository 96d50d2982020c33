"""Enhance stage: generated images + critiques -> (before, after) pairs.

Modes (`enhance.mode`):
- regional: regenerate with the same seed, size, steps and guidance while composing the global
  prompt's prediction with each regional prompt's under its blurred mask (`artaug.models.sampling`);
- img2img: diffusers' FluxImg2ImgPipeline from the original image with the rewritten or original
  prompt at `img2img_strength`;
- photometric: the critique's global adjustments applied to the original pixels.
A row whose critique failed, or that gives nothing this mode can use, becomes a pair marked
`unchanged` (after = before): counted, never dropped. Runs on the synthesis hosts (`stages.hosts`).

    artaug enhance --images out/generate --critiques out/critique --out out/
"""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from diffusers import FluxImg2ImgPipeline

from artaug import storage
from artaug.config import RunConfig
from artaug.errors import ArtaugError
from artaug.images import BadImageError, decode_image, png_bytes
from artaug.models.interaction import global_prompt, regional_job, sampling_options
from artaug.models.sampling import sample
from artaug.models.synthesis import check_source, host_pipeline
from artaug.photometric import apply_adjustments
from artaug.rows import PAIR
from artaug.stages import inputs as stage_inputs
from artaug.stages import parts as part_files
from artaug.stages.batching import run_in_groups
from artaug.stages.contract import read_stage, stage
from artaug.stages.hosts import Hosts, ModelHost, hosts_for, map_on_hosts

IDS = ("prompt_id", "seed", "round")


class EnhanceInputError(ArtaugError, ValueError):
    """The generate and critique inputs are missing or do not describe the same images."""


def key(row: dict) -> str:
    return f"{row['prompt_id']}|{row['seed']}|{row['round']}"


class Enhancer:
    """Work class for a synthesis host (or alone, loading its own pipeline): image rows, each with its
    critique (`with_critiques`), to pair rows."""

    def __init__(self, cfg: RunConfig, host: ModelHost | None = None):
        self.cfg, self.settings = cfg, cfg.enhance
        self.pipe = self.img2img = None
        if self.settings.mode != "photometric":
            self.pipe = host_pipeline(host, cfg.model)
        if self.settings.mode == "img2img":
            self.img2img = FluxImg2ImgPipeline(**self.pipe.components)

    def __call__(self, batch: pa.Table) -> pa.Table:
        pairs = [self._plan(row) for row in batch.to_pylist()]
        done = run_in_groups([p for p in pairs if p.pop("_work", False)], self._run)
        out = [done.get(p["prompt_id"], p) for p in pairs]
        for pair in out:
            pair.pop("_job", None)
        return pa.Table.from_pylist(out, schema=PAIR)

    def _plan(self, row: dict) -> dict:
        """The pair for this row: finished (error, unchanged, photometric) or marked as `_work`."""
        pair = {name: row.get(name) for name in PAIR.names if name in row}
        pair.update(before=row["image"], after=None, enhance_prompt=row["prompt"], mode=self.settings.mode,
                    regions="[]", unchanged=False, error=None, seconds=0.0)  # fmt: skip
        if row.get("error") or not row.get("image"):
            pair["error"] = f"no image: generation failed: {row.get('error')}"
            return pair
        critique = row.get("critique")
        if critique is None:
            return self._unchanged(pair)
        critique = json.loads(critique)
        pair["enhance_prompt"] = global_prompt(row["prompt"], critique, self.settings.global_prompt)
        if self.settings.mode == "photometric":
            return self._photometric(pair, critique)
        if self.settings.mode == "regional":
            planned = regional_job(row["prompt"], row["seed"], critique, self.settings)
            if planned is None:
                return self._unchanged(pair)
            pair["_job"], regions = planned
            pair["regions"] = json.dumps(regions)
        elif not critique["rewritten_prompt"].strip():  # img2img needs a new prompt to go toward
            return self._unchanged(pair)
        else:
            pair["enhance_prompt"] = critique["rewritten_prompt"].strip()
        pair["_work"] = True
        return pair

    def _unchanged(self, pair: dict) -> dict:
        return {**pair, "after": pair["before"], "unchanged": True}

    def _photometric(self, pair: dict, critique: dict) -> dict:
        start = time.perf_counter()
        try:
            image = decode_image(pair["before"])
        except BadImageError as err:
            return {**pair, "error": f"bad image: {err}"}
        after, applied = apply_adjustments(image, critique["adjustments"], self.settings.photometric_step)
        if not applied:
            return self._unchanged(pair)
        return {**pair, "after": png_bytes(after), "seconds": time.perf_counter() - start}

    def _run(self, pairs: list[dict]) -> list[dict]:
        first, start = pairs[0], time.perf_counter()
        size = dict(width=first["width"], height=first["height"])
        if self.settings.mode == "regional":
            images = sample(
                self.pipe, [p["_job"] for p in pairs], steps=first["steps"], guidance=first["guidance"],
                max_sequence_length=self.cfg.model.max_sequence_length, **sampling_options(self.settings),
                **size,
            )  # fmt: skip
        else:
            images = self.img2img(
                prompt=[p["enhance_prompt"] for p in pairs],
                image=[decode_image(p["before"]) for p in pairs],  # a bad one fails only its row
                strength=self.settings.img2img_strength,
                num_inference_steps=first["steps"],
                guidance_scale=first["guidance"],
                generator=[torch.Generator("cpu").manual_seed(p["seed"]) for p in pairs],
                max_sequence_length=self.cfg.model.max_sequence_length,
                **size,
            ).images
        share = (time.perf_counter() - start) / len(pairs)
        return [{**p, "after": png_bytes(im), "seconds": share} for p, im in zip(pairs, images, strict=True)]


def with_critiques(batch: pa.Table, critiques: dict[str, str | None]) -> pa.Table:
    """Ray Data task: each image row with its critique (JSON, or null) in a `critique` column."""
    ids = batch.select(list(IDS)).to_pylist()
    return batch.append_column("critique", pa.array([critiques.get(key(r)) for r in ids], pa.string()))


def load_critiques(critique_dir: str) -> dict[str, str | None]:
    """{image key: critique JSON, or None when the critic gave no usable answer}."""
    fs, path = storage.resolve(critique_dir)
    table = pq.read_table(path, filesystem=fs, columns=[*IDS, "status", "critique"])
    return {key(r): (r["critique"] if r["status"] == "ok" else None) for r in table.to_pylist()}


def check_ids(generated: list[dict], critiques: dict) -> None:
    """Both inputs must describe the same images; name what does not match."""
    have = {key(r) for r in generated}
    missing, extra = sorted(have - set(critiques)), sorted(set(critiques) - have)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} image(s) without a critique (e.g. {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} critique(s) without an image (e.g. {', '.join(extra[:3])})")
        raise EnhanceInputError(
            "generate and critique inputs do not match (prompt_id|seed|round): " + "; ".join(parts)
        )


def _inputs(images: str, critiques: str) -> tuple[str, dict[str, str | None]]:
    """(the generate folder, the critiques by image key), checked to describe the same images."""
    generate_dir = stage_inputs.generated(images)
    critique_map = load_critiques(stage_inputs.critiques(critiques))
    check_ids(read_stage(generate_dir, columns=list(IDS)).to_pylist(), critique_map)
    return generate_dir, critique_map


def _checks(cfg: RunConfig, images: str, critiques: str, *_, **__) -> None:
    if cfg.enhance.mode != "photometric":
        check_source(cfg.model)
    _inputs(images, critiques)


@stage("enhance", resumable=True, checks=_checks)
def enhance(cfg: RunConfig, images: str, critiques: str, stage_dir: str, hosts: Hosts | None = None) -> dict:
    """Pair every generated image with its enhancement into `stage_dir` (keeping an earlier attempt's
    complete parts: `artaug.stages.parts`) on the run's warm `hosts` (else hosts of its own); returns
    the summary."""
    generate_dir, critique_map = _inputs(images, critiques)
    inputs = storage.read_summary(generate_dir), critique_map
    key = part_files.fingerprint(cfg.model, cfg.enhance, cfg.generate, *inputs)
    done = part_files.resume(stage_dir, key)
    rows = part_files.without(ray.data.read_parquet(generate_dir, file_extensions=["parquet"]), done)
    rows = rows.map_batches(with_critiques, fn_kwargs={"critiques": critique_map}, batch_format="pyarrow")
    with hosts_for(cfg, hosts) as warm:
        pairs = map_on_hosts(rows, warm.pool("synthesis"), Enhancer, {"cfg": cfg}, cfg.generate.batch_size)
        written = part_files.write(pairs, stage_dir, key)
    table = read_stage(stage_dir, columns=["unchanged", "error"])
    errors = sum(1 for e in table.column("error").to_pylist() if e)
    unchanged = sum(1 for u in table.column("unchanged").to_pylist() if u)
    return {"mode": cfg.enhance.mode, "rows": table.num_rows, "enhanced": table.num_rows - errors - unchanged,
            "unchanged": unchanged, "errors": errors,
            "rows_reused": len(done), "rows_enhanced": written}  # fmt: skip
