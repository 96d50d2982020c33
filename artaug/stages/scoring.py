"""Scoring the images in one or more binary columns of each row, on the warm scorer hosts.

Every selected scorer and the safety checker are loaded once per host and kept for the run. For
each image column C and score column S it adds `S_C` (float, null when the image is missing or
corrupt); with safety it adds `unsafe_C`, `safety_margin_C` and `unsafe_concept_C`; `image_problem`
says which images were unusable and why. Used by the filter (columns before/after) and by evaluation
(base/lora).
"""

from __future__ import annotations

import pyarrow as pa

from artaug.config import SafetyConfig, ScorersConfig
from artaug.images import BadImageError, decode_image
from artaug.scorers.base import SCORERS, build_scorer, check_scorer_sources, check_source, pick_device
from artaug.scorers.safety import ClipConceptChecker, concept_thresholds
from artaug.stages.hosts import Hosts, ModelHost, map_on_hosts


def score_columns(names: list[str]) -> list[str]:
    return [column for name in names for column in SCORERS[name][2]]


def scored_schema(
    base: pa.Schema, names: list[str], image_columns: tuple[str, ...], safety: bool
) -> pa.Schema:
    fields = list(base)
    for image in image_columns:
        fields += [pa.field(f"{column}_{image}", pa.float64()) for column in score_columns(names)]
        if safety:
            fields += [
                pa.field(f"unsafe_{image}", pa.bool_()),
                pa.field(f"safety_margin_{image}", pa.float64()),
                pa.field(f"unsafe_concept_{image}", pa.string()),
            ]
    return pa.schema([*fields, pa.field("image_problem", pa.string())])


def check_sources(names: list[str], scorers: ScorersConfig, safety: SafetyConfig | None) -> None:
    """Fail before Ray starts when a scorer's or the checker's weights are missing."""
    for name in names:
        check_scorer_sources(name, scorers)
    if safety is not None:
        check_source("safety.model", safety.model, is_file=False)
        concept_thresholds(safety)


class ImageScorer:
    """Work class for a scorer host (or alone, loading its own scorers): rows in, the same rows with
    score columns out."""

    def __init__(self, scorers: ScorersConfig, names: list[str], safety: SafetyConfig | None,
                 image_columns: tuple[str, ...], schema: pa.Schema,
                 host: ModelHost | None = None):  # fmt: skip
        device = pick_device(scorers.device)

        def kept(kind: str, key: str, build):
            return build() if host is None else host.cached(kind, f"{key} {scorers!r}", build)

        self.scorers = [kept("scorer", n, lambda n=n: build_scorer(n, scorers, device)) for n in names]
        self.safety = None
        if safety is not None:
            self.safety = kept("safety", repr(safety), lambda: ClipConceptChecker(safety, scorers, device))
        self.image_columns = image_columns
        self.schema = schema

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        problems: list[list[str]] = [[] for _ in rows]
        for column in self.image_columns:
            images, kept = [], []
            for i, row in enumerate(rows):
                try:
                    if row.get(column) is None:
                        why = f"error: {row['error']}" if row.get("error") else "no image"
                        raise BadImageError(why)
                    images.append(decode_image(row[column]))
                    kept.append(i)
                except BadImageError as err:
                    problems[i].append(f"{column}: {err}")
            self._score_into(rows, column, images, kept)
        for row, found in zip(rows, problems, strict=True):
            row["image_problem"] = "; ".join(found) or None
        return pa.Table.from_pylist(rows, schema=self.schema)

    def _score_into(self, rows: list[dict], column: str, images: list, kept: list[int]) -> None:
        for scorer in self.scorers:
            for name in scorer.columns:
                for row in rows:
                    row[f"{name}_{column}"] = None
            if images:
                prompts = [rows[i]["prompt"] for i in kept]
                for name, values in scorer.score(images, prompts).items():
                    for i, value in zip(kept, values, strict=True):
                        rows[i][f"{name}_{column}"] = float(value)
        if self.safety is None:
            return
        for row in rows:
            row.update(
                {f"unsafe_{column}": None, f"safety_margin_{column}": None, f"unsafe_concept_{column}": None}
            )
        for i, result in zip(kept, self.safety.check(images) if images else [], strict=True):
            rows[i].update({f"unsafe_{column}": result.unsafe, f"safety_margin_{column}": result.margin,
                            f"unsafe_concept_{column}": result.concept})  # fmt: skip


def score_images(ds, hosts: Hosts, scorers: ScorersConfig, names: list[str], safety, image_columns,
                 schema: pa.Schema):  # fmt: skip
    """`ds` with every image column scored on the scorer hosts."""
    kwargs = {"scorers": scorers, "names": names, "safety": safety, "image_columns": image_columns,
              "schema": schema}  # fmt: skip
    return map_on_hosts(ds, hosts.pool("scorers"), ImageScorer, kwargs, scorers.batch_size)
