"""The method check's figures as text, and its paired contrast against the null control."""

from __future__ import annotations

import numpy as np

from artaug.stats import clustered

CONTROL = "null enhancement (control)"


def versus_control(runs: dict, prompts: list[str], shift: dict) -> dict:
    """{variant: {metric: figure}} of (variant - null control) per held-out image, each side averaged
    over the training seeds both have: what the enhancement adds beyond training on pictures of the
    model's own (the null control learns those, and nothing else). `runs`: {variant: {seed: record}}."""
    control, out = runs.get(CONTROL, {}), {}
    for variant, by_seed in runs.items():
        seeds = sorted(set(by_seed) & set(control))
        if variant == CONTROL or not seeds:
            continue
        figures = {"seeds": [int(s) for s in seeds]}
        for metric in by_seed[seeds[0]]["differences"]:
            ours = np.mean([by_seed[s]["differences"][metric] for s in seeds], axis=0)
            theirs = np.mean([control[s]["differences"][metric] for s in seeds], axis=0)
            figures[metric] = clustered(ours - theirs, prompts, reference=shift.get(metric))
        out[variant] = figures
    return out


def cell(figure: dict, width: int = 26) -> str:
    if figure.get("mean") is None:
        return f"{'n/a':>{width}s}"
    ci = figure.get("ci") or [float("nan")] * 2
    return f" {figure['mean']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]".rjust(width)


def table(results: dict, columns_of: dict) -> str:
    """Per enhancement: the enhancement itself, each variant, then each variant minus the null control."""
    lines = []
    for name, record in results.items():
        columns = [c for c in columns_of[name] if c[0] in record["reference"]]
        columns.append(("content_error", "content error", False))
        lines.append(f"\n{name} enhancement ({record['pairs']} pairs; mean [95% CI clustered by prompt])")
        header = "".join(f"{label:>26s}" for _, label, _ in columns)
        lines.append(f"{'':30s}{header}{'train s':>9s}{'worker s/pair':>15s}")
        reference = "".join(cell(record["reference"].get(m, {})) for m, _, _ in columns)
        lines.append(f"{'the enhancement (reference)':30s}{reference}")
        for variant, summary in record["variants"].items():
            row = "".join(cell(summary["pooled"].get(m, {})) for m, _, _ in columns)
            cost = summary.get("worker_seconds_per_pair")
            cost = f"{cost:>15.2f}" if cost is not None else f"{'-':>15s}"
            lines.append(f"{variant:30s}{row}{summary['train_seconds']:>9.0f}{cost}")
        for variant, figures in record.get("versus_control", {}).items():
            row = "".join(cell(figures.get(m, {})) for m, _, _ in columns)
            lines.append(f"{variant + ' - null':30s}{row}")
    return "\n".join(lines)
