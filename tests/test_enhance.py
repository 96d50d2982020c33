"""The interaction algorithm (regional composition), photometric and img2img enhancement, and the
enhance stage on a local Ray."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from artaug import storage
from artaug.cli import main as cli
from artaug.config import ModelConfig
from artaug.models.sampling import Job, Region, compose, region_mask, sample
from artaug.models.synthesis import load_pipeline
from artaug.photometric import apply_adjustments
from artaug.rows import CRITIQUE
from artaug.stages.contract import StageInputError, read_stage
from artaug.stages.enhance import EnhanceInputError, check_ids, enhance
from tests.conftest import tiny_config


def test_composition_follows_the_formula():
    torch.manual_seed(0)
    global_v = torch.randn(2, 6, 4)  # 2 images, 6 tokens, 4 channels
    region_v = torch.randn(2, 6, 4)  # two regions, both on image 0
    s = 0.7
    masks = torch.tensor([[0, 1, 1, 0.5, 0, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.float32) * s
    owners = torch.tensor([0, 0])
    out = compose(global_v, region_v, masks, owners)
    # Where every mask is 0 the global prediction is untouched; image 1 has no regions at all.
    assert torch.equal(out[0, [0, 4, 5]], global_v[0, [0, 4, 5]])
    assert torch.equal(out[1], global_v[1])
    # Where only region 0 covers with mask 1 at scale s: (v + s v_0) / (1 + s).
    torch.testing.assert_close(out[0, 1], (global_v[0, 1] + s * region_v[0, 1]) / (1 + s))
    # Both regions on token 2; a half-covered token 3.
    expected = (global_v[0, 2] + s * region_v[0, 2] + s * region_v[1, 2]) / (1 + 2 * s)
    torch.testing.assert_close(out[0, 2], expected)
    torch.testing.assert_close(out[0, 3], (global_v[0, 3] + 0.5 * s * region_v[0, 3]) / (1 + 0.5 * s))


def test_masks_land_on_the_right_tokens_for_non_square_images():
    # 64 wide x 32 high -> 2 rows x 4 columns of 16x16 tokens, row-major like FLUX's packing.
    mask = region_mask((0.5, 0.0, 1.0, 0.5), width=64, height=32, blur_kernel=1).view(2, 4)
    assert torch.equal(mask, torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.float32))
    partial = region_mask((0.0, 0.0, 0.375, 1.0), width=64, height=32, blur_kernel=1).view(2, 4)
    torch.testing.assert_close(partial[:, :2], torch.tensor([[1.0, 0.5], [1.0, 0.5]]))
    assert partial[:, 2:].abs().sum() == 0
    # Blurred masks stay in [0, 1]; a box touching the border keeps full strength at the border.
    blurred = region_mask((0.0, 0.0, 0.5, 1.0), width=128, height=64, blur_kernel=5, blur_sigma=1.0).view(
        4, 8
    )
    assert blurred.min() >= 0 and blurred.max() <= 1
    assert torch.allclose(blurred[:, 0], torch.ones(4), atol=0.02) and blurred[:, -1].max() < 0.05
    assert 0.2 < blurred[0, 4] < 0.8  # the soft edge


@pytest.mark.parametrize(
    "box", [(0.5, 0.5, 1.2, 0.9), (-0.1, 0, 0.5, 0.5), (0.6, 0.2, 0.4, 0.8), (0, 0.3, 1, 0.3)]
)
def test_regions_outside_the_image_are_rejected(box):
    with pytest.raises(ValueError, match="outside the image"):
        region_mask(box, 64, 64)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(ModelConfig(source="tiny", device="cpu"))


def test_our_loop_matches_diffusers_and_regions_change_the_image(pipe):
    kw = dict(width=64, height=48, steps=3, guidance=3.5, max_sequence_length=64)
    jobs = [Job("a red boat", 3), Job("a green hill", 8)]
    ours = sample(pipe, jobs, **kw)
    reference = pipe(
        prompt=[j.prompt for j in jobs],
        generator=[torch.Generator().manual_seed(j.seed) for j in jobs],
        num_inference_steps=3, guidance_scale=3.5, width=64, height=48, max_sequence_length=64,
    ).images  # fmt: skip
    for a, b in zip(ours, reference, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # byte-identical without regions
    regional = sample(pipe, [Job("a red boat", 3, [Region((0, 0, 0.5, 1), "a lighthouse", 2.0)])], **kw)[0]
    assert np.abs(np.asarray(regional, dtype=int) - np.asarray(ours[0], dtype=int)).max() > 0


def luminance(image):
    return np.asarray(image.convert("L"), dtype=float)


def test_photometric_moves_each_statistic_in_the_asked_direction():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(60, 190, (32, 32, 3), dtype=np.uint8))
    base = np.asarray(image, dtype=float)

    def adjusted(aspect, direction, strength=3):
        out, applied = apply_adjustments(
            image, [{"aspect": aspect, "direction": direction, "strength": strength}]
        )
        assert len(applied) == 1
        return out

    assert luminance(adjusted("exposure", "increase")).mean() > luminance(image).mean()
    assert luminance(adjusted("exposure", "decrease")).mean() < luminance(image).mean()
    assert luminance(adjusted("contrast", "increase")).std() > luminance(image).std()
    warm = np.asarray(adjusted("color_temperature", "increase"), dtype=float)
    assert (warm[..., 0] - warm[..., 2]).mean() > (base[..., 0] - base[..., 2]).mean()
    dull = np.asarray(adjusted("saturation", "decrease").convert("HSV"), dtype=float)[..., 1].mean()
    assert dull < np.asarray(image.convert("HSV"), dtype=float)[..., 1].mean()
    same, applied = apply_adjustments(
        image, [{"aspect": "composition", "direction": "change", "strength": 2}]
    )
    assert applied == [] and np.array_equal(np.asarray(same), base.astype(np.uint8))
    # Deterministic.
    assert np.array_equal(
        np.asarray(adjusted("exposure", "increase")), np.asarray(adjusted("exposure", "increase"))
    )


def test_ids_that_do_not_match_are_named():
    generated = [{"prompt_id": "a", "seed": 1, "round": 1}, {"prompt_id": "b", "seed": 2, "round": 1}]
    with pytest.raises(EnhanceInputError, match=r"b\|2\|1.*critique\(s\) without an image \(e.g. c\|3\|1"):
        check_ids(generated, {"a|1|1": None, "c|3|1": None})


# ------------------------------------------------------------------ the stage on Ray

CRITIQUES = {
    "p000000": {"regions": [{"box": [0.0, 0.0, 0.5, 1.0], "prompt": "a tall lighthouse"}]},
    "p000001": {"adjustments": [{"aspect": "exposure", "direction": "increase", "strength": 3, "note": ""}]},
    "p000002": {"rewritten_prompt": "a calm harbour at golden hour, soft light"},
    "p000003": None,  # the critic failed on this image
}


@pytest.fixture(scope="module")
def inputs(ray_local, tmp_path_factory) -> str:
    """A generate output (4 images, batch 1) and a hand-written critique output for it."""
    from artaug.prompts import read_prompts
    from artaug.stages.generate import generate

    root = tmp_path_factory.mktemp("enh-in")
    (root / "p.txt").write_text("\n".join(f"a harbour, view {i}" for i in range(4)) + "\n")
    cfg = tiny_config(**{"generate.num_actors": 1, "generate.batch_size": 1})
    generate(cfg, read_prompts(str(root / "p.txt")), str(root / "generate"))
    rows = []
    for row in read_stage(
        str(root / "generate"), columns=["prompt_id", "prompt", "seed", "round"]
    ).to_pylist():
        partial = CRITIQUES[row["prompt_id"]]
        critique = None
        if partial is not None:
            empty = {"assessment": "", "rating": 5, "adjustments": [], "regions": []}
            critique = {**empty, "rewritten_prompt": "", "rejected_regions": [], **partial}
        rows.append({**row, "status": "ok" if critique else "failed",
                     "critique": json.dumps(critique) if critique else None, "backend": "test"})  # fmt: skip
    rows = [{name: r.get(name) for name in CRITIQUE.names} for r in rows]
    (root / "critique").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=CRITIQUE), root / "critique" / "part.parquet")
    storage.mark_complete(str(root / "critique"), {"rows": 4})
    return str(root)


def pairs_by_id(stage_dir):
    return {row["prompt_id"]: row for row in read_stage(stage_dir).to_pylist()}


def test_regional_stage_via_cli(inputs, tmp_path, capsys):
    out = str(tmp_path / "e")
    args = [
        "enhance",
        "--images",
        inputs,
        "--critiques",
        inputs,
        "--out",
        out,
        "--preset",
        "tiny",  # the inputs are the tiny model's (64x64); the commands' default is the world
        "--set",
        "generate.num_actors=1",
    ]
    assert cli(args) == 0
    assert "4 pairs: 1 enhanced, 3 unchanged, 0 errors" in capsys.readouterr().out
    pairs = pairs_by_id(f"{out}/enhance")
    regional = pairs["p000000"]
    assert not regional["unchanged"] and regional["after"] != regional["before"]
    assert regional["prompt"] == regional["enhance_prompt"] == "a harbour, view 0"
    assert json.loads(regional["regions"])[0]["prompt"] == "a tall lighthouse"
    after = Image.open(io.BytesIO(regional["after"]))
    assert after.size == (64, 64) and regional["mode"] == "regional"
    for unchanged in ("p000001", "p000002", "p000003"):  # no regions (or no critique): nothing to do
        assert pairs[unchanged]["unchanged"] and pairs[unchanged]["after"] == pairs[unchanged]["before"]


def test_photometric_and_img2img_stages(inputs, tmp_path):
    cfg = tiny_config(**{"generate.num_actors": 1, "enhance.mode": "photometric"})
    summary = enhance(cfg, inputs, inputs, str(tmp_path / "photo"))
    assert (summary["enhanced"], summary["unchanged"]) == (1, 3)
    brighter = pairs_by_id(str(tmp_path / "photo"))["p000001"]
    before, after = (Image.open(io.BytesIO(brighter[k])) for k in ("before", "after"))
    assert luminance(after).mean() > luminance(before).mean()

    cfg = tiny_config(**{"generate.num_actors": 1, "enhance.mode": "img2img"})
    summary = enhance(cfg, inputs, inputs, str(tmp_path / "i2i"))
    assert (summary["enhanced"], summary["errors"]) == (1, 0)
    moved = pairs_by_id(str(tmp_path / "i2i"))["p000002"]
    assert moved["enhance_prompt"] == "a calm harbour at golden hour, soft light"
    assert moved["prompt"] == "a harbour, view 2" and moved["after"] != moved["before"]


def test_mismatched_inputs_fail_before_ray_work(inputs, tmp_path):
    other = tmp_path / "critique"
    other.mkdir()
    row = {name: None for name in CRITIQUE.names} | {"prompt_id": "zzz", "seed": 9, "round": 1}
    pq.write_table(pa.Table.from_pylist([row], schema=CRITIQUE), other / "part.parquet")
    storage.mark_complete(str(other), {"rows": 1})
    with pytest.raises(EnhanceInputError, match="zzz"):
        enhance(tiny_config(), inputs, str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(StageInputError, match="holds a completed critique stage"):
        enhance(tiny_config(), inputs, str(tmp_path / "nothing"), str(tmp_path / "out"))
