"""Quality measurement: scorers and their weight loading, safety, the filter's decisions and stage,
the statistics, the MLLM judge's parsing, the shipped prompt sets, and `artaug evaluate` end to end
on the tiny models with the tiny VLM judge (on the session's vLLM server)."""

import dataclasses
import io
import json
import os
from importlib import resources
from xml.etree import ElementTree

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from artaug import stats, storage
from artaug.cli import main as cli
from artaug.config import FilterConfig, SafetyConfig, load_config
from artaug.critic.judge import JUDGE_SCHEMA, compose, parse_judgement
from artaug.rows import PAIR
from artaug.scorers import ScorerWeightsError, build_scorer
from artaug.scorers.base import load_state_dict
from artaug.scorers.clip_family import ClipBackbone
from artaug.scorers.heads import head_state_dict, random_head
from artaug.scorers.safety import ClipConceptChecker, SafetyConfigError
from artaug.stages.contract import read_stage
from artaug.stages.filter import apply_decisions, decision_schema
from tests.conftest import tiny_config
from tests.pairs import pair_row, write_pairs

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """A private cache for the tiny scorer models (built on first use, like ~/.cache/artaug)."""
    return str(tmp_path_factory.mktemp("scorer-cache"))


def scorers_cfg(cache: str, **fields):
    return dataclasses.replace(tiny_config(**{"scorers.cache_dir": cache}).scorers, **fields)


def solid(colour, size=(48, 40)) -> Image.Image:
    return Image.new("RGB", size, colour)


def noisy(seed: int, size=(48, 48)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES = [solid((200, 30, 30)), noisy(1), solid((20, 40, 220), (64, 32))]
PROMPTS = ["a red square", "static noise", "a blue banner"]


def save_both(tensors: dict, folder, stem: str) -> tuple[str, str]:
    """The same tensors as .safetensors and as a weights_only-readable .pth."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    st, pth = os.path.join(folder, f"{stem}.safetensors"), os.path.join(folder, f"{stem}.pth")
    save_file(tensors, st)
    torch.save(tensors, pth)
    return st, pth


# ---------------------------------------------------------------- scorers: loading round trips


def test_laion_aesthetic_head_round_trips_safetensors_and_pickle(cache, tmp_path):
    backbone = ClipBackbone("tiny", CPU, cache, 0)
    head = random_head(backbone.model.config.projection_dim, seed=7)
    with torch.no_grad():
        expected = head(backbone.image_embeddings(IMAGES)).numpy()
    for path in save_both(head_state_dict(head, "layers."), tmp_path, "laion-head"):
        scorer = build_scorer("laion_aesthetic", scorers_cfg(cache, laion_head=path), CPU)
        scores = scorer.score(IMAGES, PROMPTS)["laion_aesthetic"]
        assert scores.shape == (3,) and np.allclose(scores, expected, atol=1e-6)
    assert len(set(np.round(expected, 6))) == 3  # the head sees the images: they score differently


def test_siglip_aesthetic_head_in_the_v2_5_layout_round_trips(cache, tmp_path):
    tiny = build_scorer("siglip_aesthetic", scorers_cfg(cache), CPU)
    head = random_head(tiny.model.config.hidden_size, seed=8)
    pixels = tiny.processor(images=IMAGES, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        pooled = torch.nn.functional.normalize(tiny.model(pixel_values=pixels).pooler_output, dim=-1)
        expected = head(pooled).numpy()
    results = []
    for path in save_both(head_state_dict(head, "scoring_head."), tmp_path, "v25-head"):
        scorer = build_scorer("siglip_aesthetic", scorers_cfg(cache, siglip_head=path), CPU)
        results.append(scorer.score(IMAGES, PROMPTS)["siglip_aesthetic"])
    assert np.allclose(results[0], expected, atol=1e-6) and np.allclose(results[1], expected, atol=1e-6)
    assert not np.allclose(tiny.score(IMAGES, PROMPTS)["siglip_aesthetic"], expected)  # not the tiny head


def test_clip_score_from_a_saved_folder_is_scaled_cosine(cache, tmp_path):
    from transformers import CLIPModel

    source = ClipBackbone("tiny", CPU, cache, 0)
    folder = str(tmp_path / "clip")
    source.model.save_pretrained(folder)  # safetensors
    source.tokenizer.save_pretrained(folder)
    source.image_processor.save_pretrained(folder)
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    scorer = build_scorer("clip_score", scorers_cfg(cache, clip=folder), CPU)
    scores = scorer.score(IMAGES, PROMPTS)["clip_score"]
    reloaded = CLIPModel.from_pretrained(folder)
    assert torch.equal(reloaded.logit_scale, source.model.logit_scale)
    cosine = (source.image_embeddings(IMAGES) * source.text_embeddings(PROMPTS)).sum(-1)
    assert np.allclose(scores, 100 * cosine.numpy(), atol=1e-4)
    # The text matters: the same images with other prompts score differently.
    assert not np.allclose(scorer.score(IMAGES, PROMPTS[::-1])["clip_score"], scores)


def test_preference_weights_round_trip_safetensors_and_pickle(cache, tmp_path):
    tiny = build_scorer("preference", scorers_cfg(cache), CPU)
    before = tiny.score(IMAGES, PROMPTS)["preference"]
    tuned = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in tiny.backbone.model.state_dict().items()}  # fmt: skip
    results = []
    for path in save_both(tuned, tmp_path, "preference"):
        scorer = build_scorer("preference", scorers_cfg(cache, preference_weights=path), CPU)
        assert torch.equal(scorer.backbone.model.state_dict()["logit_scale"], tuned["logit_scale"])
        results.append(scorer.score(IMAGES, PROMPTS)["preference"])
    assert np.allclose(results[0], results[1]) and not np.allclose(results[0], before)
    partial = {k: v for k, v in list(tuned.items())[:3]}
    bad = save_both(partial, tmp_path, "partial")[0]
    with pytest.raises(ScorerWeightsError, match="missing keys"):
        build_scorer("preference", scorers_cfg(cache, preference_weights=bad), CPU)


def test_image_statistics_measure_what_they_say():
    scorer = build_scorer("image_stats", scorers_cfg("unused"), CPU)
    dark, bright, flat, busy = solid((20, 20, 20)), solid((230, 230, 230)), solid((128, 128, 128)), noisy(3)
    out = scorer.score([dark, bright, flat, busy], [""] * 4)
    assert out["stats_exposure"][0] < 0.1 < 0.85 < out["stats_exposure"][1]
    assert out["stats_sharpness"][3] > 0.01 > out["stats_sharpness"][2]
    assert out["stats_contrast"][3] > 0.1 > out["stats_contrast"][2]
    assert set(out) == set(scorer.columns)


# ---------------------------------------------------------------- unsafe files and missing weights


class NotATensor:
    """Anything a weights_only unpickler must refuse."""

    def __reduce__(self):
        return (print, ("this would run at load time",))


def test_a_pickle_needing_more_than_tensors_is_refused(tmp_path, capsys):
    evil = str(tmp_path / "evil.pth")
    torch.save({"layers.0.weight": torch.zeros(1, 4), "extra": NotATensor()}, evil)
    with pytest.raises(ScorerWeightsError, match="refused"):
        load_state_dict(evil)
    assert cli(["models", "convert", evil, str(tmp_path / "out.safetensors")]) == 2
    assert "refused" in capsys.readouterr().err and not (tmp_path / "out.safetensors").exists()


def test_models_convert_rewrites_a_weights_only_pickle(tmp_path, capsys):
    tensors = {"layers.0.weight": torch.randn(3, 5), "layers.0.bias": torch.randn(3)}
    source = str(tmp_path / "head.pt")
    torch.save({"state_dict": tensors}, source)  # a training script's wrapping
    target = str(tmp_path / "head.safetensors")
    assert cli(["models", "convert", source, target]) == 0
    assert "2 tensors" in capsys.readouterr().out
    loaded = load_state_dict(target)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_missing_scorer_weights_fail_at_start_naming_the_path(tmp_path, capsys):
    missing = str(tmp_path / "nowhere" / "sac+logos.pth")
    pairs = write_pairs(str(tmp_path / "pairs"), [pair_row(0)])  # a readable input: the weights are refused
    args = [
        "filter",
        "--pairs",
        pairs,
        "--out",
        str(tmp_path / "f"),
        "--preset",
        "tiny",  # whose filter and evaluation use the LAION and SigLIP heads
        "--set",
        f"scorers.laion_head={missing}",
    ]
    assert cli(args) == 2
    assert missing in capsys.readouterr().err
    args = ["evaluate", "--base", "tiny", "--lora", missing, "--out", str(tmp_path / "e"), "--preset", "tiny"]
    assert cli(args) == 2
    assert missing in capsys.readouterr().err  # the LoRA file is checked before anything starts
    args = ["evaluate", "--base", "tiny", "--lora", __file__, "--out", str(tmp_path / "e"),
            "--preset", "tiny", "--set", f"scorers.siglip_head={missing}"]  # fmt: skip
    assert cli(args) == 2 and missing in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_a_head_that_does_not_fit_the_backbone_is_refused(cache, tmp_path):
    wrong = save_both(head_state_dict(random_head(999, seed=1)), tmp_path, "wrong")[0]
    with pytest.raises(ScorerWeightsError, match="999"):
        build_scorer("laion_aesthetic", scorers_cfg(cache, laion_head=wrong), CPU)


# ---------------------------------------------------------------- safety


def test_clip_concepts_checker_flags_by_per_concept_threshold(cache, tmp_path):
    scorers = scorers_cfg(cache)
    base = SafetyConfig(model="tiny", concepts=["gore", "weapon"], threshold=1.01)
    checker = ClipConceptChecker(base, scorers, CPU)
    similarity = checker.similarities(IMAGES)  # rows: images, columns: concepts
    assert not any(r.unsafe for r in checker.check(IMAGES))  # threshold above any cosine
    # A threshold between the images' similarities to "gore" flags exactly the images above it.
    values = sorted(similarity[:, 0].tolist())
    middle = (values[0] + values[1]) / 2
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps({"gore": middle, "weapon": 1.5}))
    checker = ClipConceptChecker(SafetyConfig(model="tiny", concepts_file=str(concepts)), scorers, CPU)
    results = checker.check(IMAGES)
    assert [r.unsafe for r in results] == [s >= middle for s in similarity[:, 0].tolist()]
    assert {r.concept for r in results if r.unsafe} == {"gore"} and sum(r.unsafe for r in results) == 2
    concepts.write_text("[1, 2]")
    with pytest.raises(SafetyConfigError, match="concepts.json"):
        ClipConceptChecker(SafetyConfig(model="tiny", concepts_file=str(concepts)), scorers, CPU)


# ---------------------------------------------------------------- the filter's decisions


def scored_row(pid, aesthetic, alignment, unsafe=False, unchanged=False, problem=None) -> dict:
    row = {name: None for name in PAIR.names}
    row.update(prompt_id=pid, prompt="p", seed=1, round=1, unchanged=unchanged, image_problem=problem)
    row.update(laion_aesthetic_before=aesthetic[0], laion_aesthetic_after=aesthetic[1],
               clip_score_before=alignment[0], clip_score_after=alignment[1], unsafe_after=unsafe,
               safety_margin_after=0.02 if unsafe else -0.3, unsafe_concept_after="gore")  # fmt: skip
    return row


def decisions(rows: list[dict], **rule) -> dict:
    from artaug.stages.scoring import scored_schema

    table = pa.Table.from_pylist(rows, schema=scored_schema(PAIR, ["laion_aesthetic", "clip_score"],
                                                            ("before", "after"), True))  # fmt: skip
    out = apply_decisions(table, FilterConfig(**rule))
    assert out.schema == decision_schema(table.schema)
    return {
        r["prompt_id"]: (r["accepted"], [x.split(":")[0] for x in r["reject_reasons"]])
        for r in out.to_pylist()
    }


def test_filter_rule_on_a_hand_made_score_table():
    rows = [
        scored_row("better", (5.0, 5.5), (30.0, 30.0)),
        scored_row("exactly-delta", (5.0, 5.25), (30.0, 29.5)),  # both bounds are inclusive
        scored_row("too-small-gain", (5.0, 5.2), (30.0, 31.0)),
        scored_row("less-faithful", (5.0, 6.0), (30.0, 29.4)),
        scored_row("unsafe", (5.0, 6.0), (30.0, 30.0), unsafe=True),
        scored_row("unchanged", (5.0, 5.0), (30.0, 30.0), unchanged=True),
        scored_row("everything-wrong", (6.0, 5.0), (30.0, 20.0), unsafe=True),
        scored_row("no-after", (5.0, None), (30.0, None), problem="after: no image"),
    ]
    got = decisions(rows, delta=0.25, epsilon=0.5, safety=True, keep_unchanged=False)
    assert got == {
        "better": (True, []),
        "exactly-delta": (True, []),
        "too-small-gain": (False, ["aesthetic"]),
        "less-faithful": (False, ["alignment"]),
        "unsafe": (False, ["unsafe"]),
        "unchanged": (False, ["unchanged", "aesthetic"]),
        "everything-wrong": (False, ["aesthetic", "alignment", "unsafe"]),
        "no-after": (False, ["missing_image"]),
    }
    relaxed = decisions(rows, delta=-1, epsilon=100, safety=False, keep_unchanged=True)
    assert [pid for pid, (ok, _) in relaxed.items() if not ok] == ["no-after"]


def test_a_pair_without_the_configured_scores_is_rejected_not_accepted():
    rows = [scored_row("a", (5.0, 5.5), (30.0, 30.0))]
    assert decisions(rows, delta=0.1) == {"a": (True, [])}
    # A rule naming a column the scoring did not produce never accepts silently.
    assert decisions(rows, aesthetic="siglip_aesthetic", delta=0.1) == {"a": (False, ["missing_score"])}


# ---------------------------------------------------------------- statistics


def test_win_rates_count_ties_apart_and_exclude_missing():
    outcomes = ["win"] * 5 + ["tie"] * 3 + ["loss"] * 2 + [None] * 4
    r = stats.win_rates(outcomes, samples=500)
    assert (r["win"], r["tie"], r["loss"], r["judged"], r["missing"]) == (5, 3, 2, 10, 4)
    assert r["win_rate"] == 0.5 and r["tie_rate"] == 0.3 and r["loss_rate"] == 0.2
    assert r["win_rate_ties_half"] == pytest.approx(0.65)
    low, high = r["win_rate_ci"]
    assert 0 <= low < 0.5 < high <= 1
    empty = stats.win_rates([None, None])
    assert empty["judged"] == 0 and empty["missing"] == 2 and empty["win_rate"] is None


def test_both_orders_cancel_position_bias_and_missing_is_never_a_tie():
    # The LoRA image is on the right in the first order and on the left in the second.
    always_left = stats.symmetrise([stats.vote("left", "right")] * 3, [stats.vote("left", "left")] * 3)
    assert always_left == ["tie"] * 3  # a judge that only ever picks the left image prefers nothing
    consistent = stats.symmetrise([stats.vote("right", "right"), stats.vote("left", "right")],
                                  [stats.vote("left", "left"), stats.vote("right", "left")])  # fmt: skip
    assert consistent == ["win", "loss"]
    one_sided = stats.symmetrise([stats.vote("right", "right"), None], [stats.vote("tie", "left"), 0])
    assert one_sided == ["win", None]
    assert stats.vote(None, "left") is None and stats.vote("tie", "left") == 0
    assert stats.left_share(["left", "left", "right", "tie", None]) == pytest.approx(2 / 3)


def test_bootstrap_interval_covers_the_true_mean_at_its_level():
    rng = np.random.default_rng(123)
    trials, hits, widths = 300, 0, []
    for trial in range(trials):
        sample = rng.normal(1.0, 2.0, size=40)
        low, high = stats.bootstrap_ci(sample, samples=600, confidence=0.9, seed=trial)
        hits += low <= 1.0 <= high
        widths.append(high - low)
    assert 0.84 <= hits / trials <= 0.95  # nominal 0.90; percentile bootstrap runs a little narrow
    assert np.mean(widths) == pytest.approx(2 * 1.645 * 2.0 / np.sqrt(40), rel=0.15)


def test_paired_differences_drop_incomplete_pairs():
    base = [1.0, 2.0, float("nan"), 4.0, 5.0]
    lora = [1.5, 2.5, 9.0, float("nan"), 6.0]
    r = stats.paired(base, lora, samples=300)
    assert r["pairs"] == 3 and r["pairs_missing"] == 2
    assert r["difference"]["mean"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert r["lora_higher_share"] == 1.0 and r["base"]["mean"] == pytest.approx(8 / 3)
    lo, hi = r["difference"]["ci"]
    assert 0.5 <= lo <= hi <= 1.0


def test_paired_intervals_resample_whole_prompts_when_clusters_are_given():
    # Two seeds of each prompt that agree: a row bootstrap treats them as independent (too narrow).
    per_prompt = [0.1, -0.05, 0.2, 0.0, 0.15, -0.1, 0.05, 0.3]
    base = [0.0] * 16
    lora = [v for v in per_prompt for _ in range(2)]
    prompts = [f"p{i}" for i in range(8) for _ in range(2)]
    rows = stats.paired(base, lora, samples=2000)["difference"]["ci"]
    grouped = stats.paired(base, lora, samples=2000, clusters=prompts)
    ci = grouped["difference"]["ci"]
    assert grouped["difference"]["clusters"] == 8
    assert ci[1] - ci[0] > 1.2 * (rows[1] - rows[0])


def test_evaluation_verdict_needs_an_interval_above_zero_and_alignment_within_the_margin():
    from artaug.config import load_config
    from artaug.stages.evaluate.metrics import verdict
    from artaug.stages.evaluate.presentation import format_table

    cfg = load_config(
        overrides=["evaluate.aesthetic=q", "evaluate.alignment=a", "evaluate.alignment_margin=0.05"]
    )
    scores = {"q": {"difference": {"ci": [0.01, 0.04]}}, "a": {"difference": {"ci": [-0.03, 0.01]}}}
    got = verdict(cfg, scores)
    assert got["aesthetic"]["better"] and got["alignment"]["held"]
    scores = {"q": {"difference": {"ci": [-0.01, 0.04]}}, "a": {"difference": {"ci": [-0.06, 0.01]}}}
    got = verdict(cfg, scores)
    assert not got["aesthetic"]["better"] and not got["alignment"]["held"]
    table = format_table({"confidence": 0.95, "scores": {}, "verdict": got})
    assert "q NOT shown higher" in table and "a NOT shown held" in table and "judge: off" in table


# ---------------------------------------------------------------- the judge's answers


def test_judge_answers_parse_or_count_as_missing():
    import jsonschema

    assert parse_judgement('{"winner":"left","reason":"warmer light"}') == ("left", "warmer light")
    assert parse_judgement('{"winner":"tie","reason":""}')[0] == "tie"
    for raw in (None, "", "the left one", '{"winner":"both","reason":""}', '{"winner":"left"}'):
        assert parse_judgement(raw)[0] is None
    jsonschema.Draft202012Validator.check_schema(JUDGE_SCHEMA)
    side_by_side = compose(solid((255, 0, 0), (64, 32)), solid((0, 0, 255), (32, 64)), 48)
    assert side_by_side.size == (2 * 48 + 8, 48)
    assert side_by_side.getpixel((24, 24)) == (255, 0, 0) and side_by_side.getpixel((48 + 8 + 24, 24)) == (
        0,
        0,
        255,
    )


def test_evaluation_warns_when_it_reuses_the_filters_scorers():
    from artaug.stages.evaluate.metrics import overlap_warnings

    filter_scorers = ["laion_aesthetic", "clip_score"]
    assert overlap_warnings(tiny_config(), filter_scorers) == []
    overlapping = tiny_config(**{"evaluate.scorers": "clip_score,image_stats"})
    assert any("clip_score" in w for w in overlap_warnings(overlapping, filter_scorers))
    same_judge = load_config("flux-dev", overrides=["evaluate.judge_model=Qwen/Qwen2.5-VL-72B-Instruct"])
    assert any("critic" in w for w in overlap_warnings(same_judge, filter_scorers))
    assert load_config("flux-dev").evaluate.judge_model != load_config("flux-dev").critique.model


# ---------------------------------------------------------------- prompt sets


def test_shipped_prompt_sets_are_large_varied_and_disjoint():
    from artaug.prompts import read_prompts

    presets = resources.files("artaug.presets")
    sets = {}
    for name, size in (("train_prompts.txt", 500), ("eval_prompts.txt", 200)):
        with resources.as_file(presets / name) as path:
            rows = read_prompts(str(path)).rows
        sets[name] = [r["prompt"] for r in rows]
        assert len(rows) == size and len(set(sets[name])) == size
    train, held_out = sets.values()
    assert not set(train) & set(held_out)
    subject = lambda p: p.split(" in ")[0].split(" at ")[0].split(" on ")[0]  # noqa: E731
    assert not {subject(p) for p in train} & {subject(p) for p in held_out}
    assert len({subject(p) for p in train}) >= 100 and len({subject(p) for p in held_out}) >= 30
    for fragment in ("golden hour", "moonlight", "watercolour", "photograph"):
        assert any(fragment in p for p in train) and any(fragment in p for p in held_out)
    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")) as f:
        assert '"presets/*.txt"' in f.read()  # shipped in the wheel, as prompts.txt is


def test_the_world_s_held_out_prompts_are_48_scenes_x_2_seeds_apart_from_its_training_prompts():
    from artaug.config import load_config
    from artaug.loop.prompt_sets import eval_prompts, train_prompts

    cfg = load_config("world")
    held = eval_prompts(cfg).rows
    assert len(held) == 96 and {r["seed"] for r in held} == {9001, 9002}
    scenes = {r["prompt"] for r in held}
    assert len(scenes) == 48
    one, two = (train_prompts(cfg, k).rows for k in (1, 2))
    assert not scenes & {r["prompt"] for r in one + two}
    assert not {r["prompt"] for r in one} & {r["prompt"] for r in two}  # each round draws new prompts


# ---------------------------------------------------------------- the filter stage on Ray


def pair_rows() -> list[dict]:
    rows = []
    for i in range(6):
        before, after = png(noisy(10 + i)), png(solid((40 * i, 90, 200 - 30 * i)))
        rows.append({"prompt_id": f"p{i}", "prompt": f"a harbour at dusk {i}", "seed": i, "round": 1,
                     "width": 48, "height": 48, "steps": 4, "guidance": 3.5, "before": before, "after": after,
                     "enhance_prompt": "warmer", "mode": "regional", "regions": "[]", "unchanged": False,
                     "error": None, "seconds": 0.1})  # fmt: skip
    rows[4].update(after=None, error="enhance failed: OOM")
    rows[5].update(after=b"\x89PNG truncated")
    return rows


def test_filter_stage_end_to_end(ray_local, cache, tmp_path, capsys):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    rows = pair_rows()
    for part in (0, 1):  # two files, as a Ray Data writer leaves them
        pq.write_table(pa.Table.from_pylist(rows[part::2], schema=PAIR), str(pairs / f"part-{part}.parquet"))
    out = str(tmp_path / "out")
    settings = [f"scorers.cache_dir={cache}", "filter.delta=0", "filter.epsilon=1000"]
    args = [
        "filter",
        "--pairs",
        str(pairs),
        "--out",
        out,
        "--preset",
        "tiny",
        *sum((["--set", s] for s in settings), []),
    ]
    assert cli(args) == 0
    printed = capsys.readouterr().out
    assert "6 pairs" in printed and "2 with missing images" in printed
    table = read_stage(f"{out}/filter")
    assert table.num_rows == 6 and set(PAIR.names) <= set(table.column_names)
    got = {r["prompt_id"]: r for r in table.to_pylist()}
    # The stored scores are the scorers' own, for the right image of the right pair.
    scorer = build_scorer("laion_aesthetic", scorers_cfg(cache), CPU)
    for pid in ("p0", "p1", "p2", "p3"):
        row, source = got[pid], rows[int(pid[1:])]
        images = [Image.open(io.BytesIO(source[k])).convert("RGB") for k in ("before", "after")]
        expected = scorer.score(images, [source["prompt"]] * 2)["laion_aesthetic"]
        assert np.allclose([row["laion_aesthetic_before"], row["laion_aesthetic_after"]], expected, atol=1e-5)
        assert row["accepted"] == (expected[1] - expected[0] >= 0)
        assert row["unsafe_after"] is False and row["before"] == source["before"]
    for pid, why in (("p4", "enhance failed: OOM"), ("p5", "corrupt image")):
        assert not got[pid]["accepted"] and why in got[pid]["reject_reasons"][0]
        assert got[pid]["laion_aesthetic_after"] is None and got[pid]["laion_aesthetic_before"] is not None
    summary = storage.read_summary(f"{out}/filter")
    accepted = sum(r["accepted"] for r in got.values())
    assert summary["accepted"] == accepted and summary["rejected"] == 6 - accepted
    assert summary["missing_images"] == 2 and sorted(summary["missing_image_ids"]) == ["p4", "p5"]
    assert summary["reject_reasons"]["missing_image"] == 2
    assert summary["reject_reasons"]["aesthetic"] == 4 - accepted
    assert (
        summary["scores"]["laion_aesthetic_before"]["n"] == 6
        and summary["scores"]["clip_score_after"]["n"] == 4
    )
    assert cli(args) == 2  # a completed stage is not overwritten
    assert "already holds a completed stage" in capsys.readouterr().err


def test_filter_refuses_rows_that_are_not_pairs(ray_local, tmp_path, capsys):
    folder = tmp_path / "not-pairs"
    folder.mkdir()
    pq.write_table(pa.table({"prompt_id": ["a"], "image": [b""]}), str(folder / "x.parquet"))
    assert cli(["filter", "--pairs", str(folder), "--out", str(tmp_path / "o")]) == 2
    assert "missing columns" in capsys.readouterr().err


# ---------------------------------------------------------------- evaluate end to end


@pytest.mark.heavy
def test_evaluate_base_vs_lora_end_to_end(ray_local, vlm_server, cache, tmp_path, capsys):
    from tests.test_models import make_lora

    lora = make_lora(tmp_path / "lora", seed=1)
    prompts = tmp_path / "eval.txt"
    prompts.write_text("\n".join(f"a lighthouse at dusk, view {i}" for i in range(4)) + "\n")
    out = str(tmp_path / "eval")
    settings = [f"scorers.cache_dir={cache}", "generate.num_actors=1", *vlm_server.judge_settings()]
    args = [
        "evaluate",
        "--base",
        "tiny",
        "--lora",
        lora,
        "--prompts",
        str(prompts),
        "--out",
        out,
        "--preset",
        "tiny",
    ]
    args += sum((["--set", s] for s in settings), [])
    assert cli(args) == 0
    printed = capsys.readouterr().out
    assert "MLLM judge (not human)" in printed and "siglip_aesthetic" in printed

    base, enhanced = (read_stage(f"{out}/{label}/generate").to_pylist() for label in ("base", "lora"))
    assert [r["seed"] for r in base] == [r["seed"] for r in enhanced]  # same prompts, same seeds
    assert all(b["image"] != e["image"] for b, e in zip(base, enhanced, strict=True))  # the LoRA acts

    metrics = json.loads(open(f"{out}/metrics.json").read())
    assert metrics["prompts"] == 4 and metrics["loras"] == [lora] and metrics["warnings"] == []
    stats_columns = {
        f"stats_{k}" for k in ("exposure", "contrast", "saturation", "colourfulness", "sharpness")
    }
    assert set(metrics["scores"]) == {"siglip_aesthetic", "preference", *stats_columns}
    exposure = metrics["scores"]["stats_exposure"]
    expected = np.mean(
        [image_exposure(e["image"]) - image_exposure(b["image"]) for b, e in zip(base, enhanced, strict=True)]
    )
    assert exposure["difference"]["mean"] == pytest.approx(expected, abs=1e-9)
    lo, hi = exposure["difference"]["ci"]
    assert lo <= exposure["difference"]["mean"] <= hi and exposure["pairs"] == 4
    assert metrics["safety"]["base"]["checked"] == 4 and metrics["safety"]["lora"]["unsafe"] == 0

    judge = metrics["judge"]
    assert judge["kind"].startswith("MLLM") and judge["judgements"] == 8  # 4 prompts x 2 orders
    assert judge["judged"] + judge["missing"] == 4
    assert judge["win"] + judge["tie"] + judge["loss"] == judge["judged"]
    judgements = pq.read_table(f"{out}/judge").to_pylist()
    assert sorted({j["order"] for j in judgements}) == ["lora_left", "lora_right"]
    for j in judgements:  # constrained decoding reached the tiny judge: every answer parses
        assert j["winner"] in ("left", "right", "tie"), j
    assert metrics["judge_model"] == vlm_server.model

    for chart in ("scores.svg", "differences.svg", "mllm_win_rate.svg"):
        svg = ElementTree.parse(f"{out}/plots/{chart}").getroot()
        assert svg.tag.endswith("svg") and int(svg.get("width")) >= 600
        assert len(list(svg.iter())) > 5  # drawn, not an empty frame
    assert "MLLM judge (not human)" in open(f"{out}/report.txt").read()
    assert cli(args) == 2  # an existing evaluation is kept unless --overwrite


def image_exposure(data: bytes) -> float:
    from artaug.images import image_statistics

    return image_statistics(Image.open(io.BytesIO(data)).convert("RGB"))["exposure"]
