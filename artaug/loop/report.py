"""RUN_DIR/report/index.html: what each round did, in one page a person can open.

Per round: before/after thumbnails with the critique and the enhanced regions drawn, score
distributions and acceptance counts, the training loss curves; then the final evaluation's table,
its first held-out images drawn by the base model and by base + LoRA, and stage timings. Thumbnails
only (loop.thumbnail_side), so the report stays small; the scores of every row are read without
images, and only the shown pairs' images are streamed in. Thumbnail file names are made from the
round (or "eval") and position, never from a prompt_id; a missing, undecodable or oversized image
shows as "(no image)", and a NaN or infinite number as "n/a".

    artaug report runs/artaug-20261126-120000
"""

from __future__ import annotations

import io
import json
import math
import time
from html import escape

from PIL import Image, ImageDraw

from artaug import charts, storage
from artaug.config import load_config
from artaug.layout import RunLayout
from artaug.loop.manifest import Manifest
from artaug.loop.observe import pool_usage
from artaug.preview import stream_rows, thumbnail
from artaug.stages.contract import read_stage

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; font-size: 13px; text-align: left; }
.pairs { display: flex; flex-wrap: wrap; gap: 12px; }
.pair { border: 1px solid #ddd; padding: 6px; width: 300px; font-size: 12px; }
.pair img { margin-right: 4px; }
.kept { border-color: #55a868; } .dropped { border-color: #c44e52; }
.critique { max-height: 6em; overflow: auto; background: #f6f6f6; white-space: pre-wrap; }
.charts svg { margin-right: 12px; }
"""


def summary_table(manifest: dict) -> str:
    """The per-round table `artaug run` prints at the end: rows, accepted pairs, mean gain, seconds."""
    lines = [f"{'round':>5}  {'rows':>5}  {'accepted':>8}  {'mean gain':>9}  {'seconds':>8}  status"]
    for k, stages in sorted(manifest.get("rounds", {}).items(), key=lambda kv: int(kv[0])):
        filt = stages.get("filter", {}).get("metrics", {})
        gain = filt.get("mean_aesthetic_gain")
        seconds = sum(s.get("seconds") or 0 for s in stages.values())
        status = (
            "trained" if stages.get("register", {}).get("status") == "complete" else _round_status(stages)
        )
        lines.append(
            f"{k:>5}  {stages.get('generate', {}).get('rows') or 0:>5}  {filt.get('accepted', 0):>8}"
            f"  {number(gain, '+.4f'):>9}  {seconds:>8.1f}  {status}"
        )
    for pool in pool_usage(manifest):
        lines.append(f"{pool['pool']}: {pool['detail']}, busy {number(pool['busy_fraction'], '.0%')}"
                     f" of {number(pool['held_s'], '.0f')} s held")  # fmt: skip
    return "\n".join(lines) + "\n"


def number(value, spec: str) -> str:
    """`value` formatted, or "n/a" when it is missing, NaN or infinite."""
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "n/a"
    return format(value, spec)


def _round_status(stages: dict) -> str:
    if any(s.get("status") == "skipped" for s in stages.values()):
        return "stopped before training"
    return next((f"{name} {s['status']}" for name, s in stages.items() if s.get("status") != "complete"), "?")


def write_report(run_dir: str, status: str | None = None) -> dict:
    """Write report/index.html and its thumbnails; returns {"path", "images", "stage", "seconds"}.

    `status` overrides the manifest's (the run writes its report as its last stage, while running).
    """
    start = time.perf_counter()
    layout = RunLayout(run_dir)
    manifest = Manifest.load(run_dir).data
    cfg = load_config(path=layout.run_yaml)
    out = layout.report
    page = _Page(out, cfg.loop.thumbnail_side)
    page.add(f"<h1>artaug run {escape(manifest['name'])}</h1>")
    page.add(
        f"<p>status <b>{escape(status or manifest['status'])}</b>, created {escape(manifest['created'])},"
        f" config hash {manifest['config_hash']}, artaug {manifest['artaug_version']}</p>"
    )
    if manifest.get("stopped_early"):
        page.add(f"<p>Stopped early: {escape(json.dumps(manifest['stopped_early']))}</p>")
    page.add("<h2>Rounds</h2><pre>" + escape(summary_table(manifest)) + "</pre>")
    for k in sorted(manifest.get("rounds", {}), key=int):
        _round_section(page, layout, int(k), cfg)
    _evaluation_section(page, layout, cfg)
    page.add("<h2>Stage timings</h2>" + _timings(manifest))
    page.add("<h2>Pools: time held and busy</h2>" + _pools(manifest))
    page.add(
        "<h2>Environment</h2><pre>"
        + escape(json.dumps({k: manifest.get(k) for k in ("models", "packages", "host")}, indent=1))
        + "</pre>"
    )
    path = page.write()
    summary = {"stage": "report", "path": path, "images": page.images, "seconds": time.perf_counter() - start}
    storage.mark_complete(out, summary)
    return summary


class _Page:
    def __init__(self, out: str, side: int):
        self.out, self.side, self.parts, self.images = out, side, [], 0

    def add(self, html: str) -> None:
        self.parts.append(html)

    def thumbnail(self, png: bytes | None, name: str, alt: str, boxes: list | None = None) -> str:
        """Write a thumbnail (regions drawn as boxes) under img/; returns its <img> tag."""
        image = thumbnail(png, self.side)
        if image is None:
            return '<span class="missing">(no image)</span>'
        draw = ImageDraw.Draw(image)
        for box in boxes or []:
            x0, y0, x1, y1 = (v * s for v, s in zip(box, (*image.size, *image.size), strict=True))
            draw.rectangle((x0, y0, x1, y1), outline=(255, 64, 64), width=2)
        return self.image(_png(image), name, alt)

    def image(self, data: bytes, name: str, alt: str) -> str:
        storage.write_bytes(storage.join(self.out, "img", name), data)
        self.images += 1
        return f'<img src="img/{escape(name)}" alt="{escape(alt)}">'

    def write(self) -> str:
        html = (
            '<!doctype html><html><head><meta charset="utf-8"><title>artaug report</title>'
            f"<style>{STYLE}</style></head><body>{''.join(self.parts)}</body></html>"
        )
        path = storage.join(self.out, "index.html")
        storage.write_text(path, html)
        return path


def _round_section(page: _Page, layout: RunLayout, k: int, cfg) -> None:
    d = layout.round(k)
    page.add(f"<h2>Round {k}</h2>")
    filt = d.stage("filter")
    if not storage.is_complete(filt):
        page.add("<p>(the filter stage has not completed: no pairs to show)</p>")
        return
    summary = storage.read_summary(filt)
    rows = read_stage(filt, exclude=("before", "after")).to_pylist()
    critiques = {}
    if storage.is_complete(d.stage("critique")):
        columns = ["prompt_id", "status", "critique", "error"]
        table = read_stage(d.stage("critique"), columns=columns)
        critiques = {r["prompt_id"]: r for r in table.to_pylist()}
    aesthetic = cfg.filter.aesthetic
    drawn = [
        charts.histogram(
            f"{aesthetic} before / after",
            {
                "before": [
                    r[f"{aesthetic}_before"] for r in rows if r.get(f"{aesthetic}_before") is not None
                ],
                "after": [r[f"{aesthetic}_after"] for r in rows if r.get(f"{aesthetic}_after") is not None],
            },
        ),  # fmt: skip
        charts.bars(
            "pairs",
            {
                "accepted": summary["accepted"],
                "rejected": summary["rejected"],
                **{k: v for k, v in summary["reject_reasons"].items() if v},
            },
        ),  # fmt: skip
        charts.lines("training loss", _loss_curves(d.train.metrics)),
    ]
    page.add(f'<div class="charts">{"".join(drawn)}</div>')
    shown = {row["prompt_id"]: (i, row) for i, row in enumerate(rows[: cfg.loop.report_pairs])}
    tags = {}
    for images in stream_rows(filt, ["before", "after"], set(shown)):  # a few images at a time
        i, row = shown[images["prompt_id"]]
        boxes = [r["box"] for r in _regions(row)]
        tags[i] = (
            page.thumbnail(
                images.get("before"), f"r{k}-{i:04d}-before.png", f"{row['prompt_id']} before", boxes
            ),
            page.thumbnail(images.get("after"), f"r{k}-{i:04d}-after.png", f"{row['prompt_id']} after"),
        )
    cells = []
    for i, row in shown.values():
        pid = row["prompt_id"]
        crit = critiques.get(pid, {})
        text = crit.get("critique") or crit.get("error") or crit.get("status") or ""
        before, after = tags.get(i, ('<span class="missing">(no image)</span>',) * 2)
        verdict = "kept" if row["accepted"] else "dropped: " + ", ".join(row["reject_reasons"])
        cells.append(
            f'<div class="pair {"kept" if row["accepted"] else "dropped"}">{before}{after}'
            f"<div><b>{escape(pid)}</b> {escape(row['prompt'][:120])}</div>"
            f"<div>{escape(verdict)}; gain {number(row.get('aesthetic_delta'), '+.4f')};"
            f" {len(_regions(row))} region(s)</div>"
            f'<div class="critique">{escape(_readable_critique(text))}</div></div>'
        )
    page.add(f'<div class="pairs">{"".join(cells)}</div>')


def _regions(row: dict) -> list[dict]:
    try:
        regions = json.loads(row.get("regions") or "[]")
    except json.JSONDecodeError:
        return []
    if not isinstance(regions, list):
        return []
    return [r for r in regions if isinstance(r, dict) and _drawable(r.get("box"))]


def _drawable(box) -> bool:
    return isinstance(box, list) and len(box) == 4 and "n/a" not in [number(v, "g") for v in box]


def _readable_critique(text: str) -> str:
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text[:600]
    parts = [data.get("assessment", "")]
    for a in data.get("adjustments", []):
        parts.append(f"{a.get('aspect')} {a.get('direction')} x{a.get('strength')}")
    parts += [f"region {r.get('box')}: {r.get('prompt')}" for r in data.get("regions", [])]
    return "\n".join(p for p in parts if p)[:600]


def _loss_curves(path: str) -> dict[str, list[tuple[float, float]]]:
    if not storage.exists(path):
        return {}
    curves: dict[str, list[tuple[float, float]]] = {}
    for line in storage.read_bytes(path).decode(errors="replace").splitlines():
        try:  # a run killed mid-write leaves a cut last line
            entry = json.loads(line)
            point = (float(entry["step"]), float(entry["loss"]))
        except (ValueError, KeyError, TypeError):
            continue
        curves.setdefault(f"{entry.get('phase')} images", []).append(point)
    return curves


def _evaluation_section(page: _Page, layout: RunLayout, cfg) -> None:
    page.add("<h2>Evaluation: base vs base + combined LoRA</h2>")
    table = storage.join(layout.evaluate, "report.txt")
    if not storage.exists(table):
        page.add("<p>(no evaluation: no round trained, loop.evaluate is off, or it has not finished)</p>")
        return
    page.add("<pre>" + escape(storage.read_bytes(table).decode()) + "</pre>")
    _evaluation_images(page, layout, cfg)
    for name in ("scores.svg", "differences.svg", "mllm_win_rate.svg"):
        chart = storage.join(layout.evaluate, "plots", name)
        if storage.exists(chart):
            page.add(f'<div class="charts">{storage.read_bytes(chart).decode()}</div>')


def _evaluation_images(page: _Page, layout: RunLayout, cfg) -> None:
    """The first `loop.report_pairs` held-out images in prompt order (not chosen by their scores),
    drawn by the base model and by base + LoRA from the same noise, with the evaluation's aesthetic."""
    scores_dir = storage.join(layout.evaluate, "scores")
    if not cfg.loop.report_pairs or not storage.exists(scores_dir):
        return
    aesthetic = cfg.evaluate.aesthetic
    columns = ["prompt", f"{aesthetic}_base", f"{aesthetic}_lora"] if aesthetic else ["prompt"]
    rows = read_stage(scores_dir, columns=columns).to_pylist()[: cfg.loop.report_pairs]
    tags: dict[tuple[str, str], str] = {}
    for side in ("base", "lora"):
        folder = storage.join(layout.evaluate, side, "generate")
        for images in stream_rows(folder, ["image"], {r["prompt_id"] for r in rows}):
            i = next(i for i, r in enumerate(rows) if r["prompt_id"] == images["prompt_id"])
            tags[images["prompt_id"], side] = page.thumbnail(
                images.get("image"), f"eval-{i:04d}-{side}.png", f"{images['prompt_id']} {side}"
            )
    cells = []
    for row in rows:
        pid, missing = row["prompt_id"], '<span class="missing">(no image)</span>'
        score = ""
        if aesthetic:
            base, lora = row.get(f"{aesthetic}_base"), row.get(f"{aesthetic}_lora")
            score = f"{escape(aesthetic)} {number(base, '.3f')} -> {number(lora, '.3f')}"
        cells.append(
            f'<div class="pair">{tags.get((pid, "base"), missing)}{tags.get((pid, "lora"), missing)}'
            f"<div><b>{escape(pid)}</b> {escape(row['prompt'][:120])}</div>"
            f"<div>base | base + LoRA; {score}</div></div>"
        )
    page.add(
        "<p>Held-out images, base (left) and base + LoRA (right), same prompt and noise; the first "
        f"{len(rows)} in prompt order, not chosen by score.</p>"
        + f'<div class="pairs">{"".join(cells)}</div>'
    )


def _timings(manifest: dict) -> str:
    rows = []
    rounds = sorted(manifest.get("rounds", {}).items(), key=lambda kv: int(kv[0]))
    groups = [(f"round {k}", stages) for k, stages in rounds]
    for group, stages in [*groups, ("final", manifest.get("final", {}))]:
        for name, s in stages.items():
            seconds = s.get("seconds")
            rows.append(
                f"<tr><td>{group}</td><td>{name}</td><td>{s.get('status')}</td><td>{s.get('rows') or ''}</td>"
                f"<td>{s.get('errors') or 0}</td><td>{'' if seconds is None else f'{seconds:.1f}'}</td></tr>"
            )
    head = "<tr><th>when</th><th>stage</th><th>status</th><th>rows</th><th>errors</th><th>seconds</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _pools(manifest: dict) -> str:
    """Per pool of workers: what it did, seconds held and busy (where the run idles)."""
    rows = [
        f"<tr><td>{escape(p['pool'])}</td><td>{escape(p['detail'])}</td><td>{number(p['held_s'], '.1f')}</td>"
        f"<td>{number(p['busy_s'], '.1f')}</td><td>{number(p['busy_fraction'], '.1%')}</td></tr>"
        for p in pool_usage(manifest)
    ]
    if not rows:
        return "<p>No pools (no stage that loads a model ran in this run's process).</p>"
    head = "<tr><th>pool</th><th>what</th><th>held (s)</th><th>busy (s)</th><th>busy</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
