"""How an evaluation is shown: the printed table (report.txt) and the charts (plots/*.svg)."""

from __future__ import annotations

from artaug import charts, storage

IMAGES = ("base", "lora")


def write_charts(metrics: dict, folder: str) -> None:
    level = f"{metrics['confidence']:.0%} bootstrap intervals over {metrics['prompts']} images"
    means, differences = [], []
    for column, result in metrics["scores"].items():
        for label in IMAGES:
            means.append((f"{column} {label}", label, result[label]["mean"], result[label]["ci"]))
        differences.append((column, "lora", result["difference"]["mean"], result["difference"]["ci"]))
    drawn = {
        "scores.svg": charts.intervals(
            "Mean scores: base vs base + LoRA (own axis per score)", level, means, 2
        ),
        "differences.svg": charts.intervals("Paired difference (base + LoRA minus base)", level, differences),
    }
    if "judge" in metrics:
        note = f"both orders per prompt; ties and missing judgements shown apart; {level}"
        title = "MLLM win rate of base + LoRA vs base (an MLLM judge, not human raters)"
        drawn["mllm_win_rate.svg"] = charts.win_rates(title, metrics["judge"], note)
    for name, svg in drawn.items():
        storage.write_text(storage.join(folder, name), svg)


def format_table(metrics: dict) -> str:
    level = f"{metrics['confidence']:.0%} CI"
    lines = [
        f"{'score':<24} {'base':>10} {'base+LoRA':>10} {'difference':>11} {level:>22} {'LoRA higher':>11}"
    ]
    for column, r in metrics["scores"].items():
        d = r["difference"]
        higher = "n/a" if r["lora_higher_share"] is None else f"{r['lora_higher_share']:.0%}"
        lines.append(f"{column:<24} {_num(r['base']['mean']):>10} {_num(r['lora']['mean']):>10} "
                     f"{_num(d['mean']):>11} {_interval(d['ci']):>22} {higher:>11}")  # fmt: skip
    if "safety" in metrics:
        s = metrics["safety"]
        lines.append(f"unsafe images: base {s['base']['unsafe']}/{s['base']['checked']},"
                     f" base+LoRA {s['lora']['unsafe']}/{s['lora']['checked']}")  # fmt: skip
    if "judge" in metrics:
        j = metrics["judge"]
        lines.append(
            f"MLLM judge (not human), both orders: win {_pct(j['win_rate'])} {_pcts(j['win_rate_ci'])},"
            f" tie {_pct(j['tie_rate'])}, loss {_pct(j['loss_rate'])} {_pcts(j['loss_rate_ci'])}"
            f" over {j['judged']} prompts; {j['missing']} prompts missing"
            f" ({j['unparseable_or_missing_judgements']} judgements unparseable or absent);"
            f" left image picked in {_pct(j['left_share'])} of decisive judgements"
        )
    verdict = metrics.get("verdict", {})
    if "aesthetic" in verdict:
        v = verdict["aesthetic"]
        shown = "higher" if v["better"] else "NOT shown higher"
        lines.append(f"verdict: {v['column']} {shown} with base+LoRA ({level} of the difference"
                     f" {_interval(v['ci'])}, above 0 needed)")  # fmt: skip
    if "alignment" in verdict:
        v = verdict["alignment"]
        lines.append(f"verdict: {v['column']} {'held' if v['held'] else 'NOT shown held'} (lower bound of"
                     f" {_interval(v['ci'])} above -{v['margin']:g} needed)")  # fmt: skip
    if "judge" not in metrics:
        lines.append("MLLM judge: off (evaluate.judge false)")
    lines += [f"warning: {warning}" for warning in metrics.get("warnings", [])]
    return "\n".join(lines) + "\n"


def _interval(interval) -> str:
    return f"[{interval[0]:.4g}, {interval[1]:.4g}]" if interval else "[n/a]"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _pcts(interval) -> str:
    return f"[{interval[0]:.1%}, {interval[1]:.1%}]" if interval else "[n/a]"
