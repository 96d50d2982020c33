"""The generate stage: in process (the actor class alone) and on a local Ray (actor pools, CLI)."""

import io
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from artaug import storage
from artaug.cli import main as cli
from artaug.prompts import read_prompts
from artaug.stages.contract import read_stage
from artaug.stages.generate import generate
from artaug.stages.generator import FluxGenerator
from tests.conftest import tiny_config

BATCH_TOLERANCE = 2  # max |difference| in 8-bit pixel values between batch sizes (float rounding)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def prompt_rows(n: int, **extra) -> pa.Table:
    rows = [{"prompt_id": f"p{i}", "prompt": f"a small boat number {i}", "index": i} for i in range(n)]
    return pa.Table.from_pylist([{**row, **extra} for row in rows])


# ------------------------------------------------------------------ in process


def test_batched_rows_match_single_rows_within_tolerance():
    generator = FluxGenerator(tiny_config())
    together = generator(prompt_rows(4)).to_pylist()
    alone = [generator(prompt_rows(4).slice(i, 1)).to_pylist()[0] for i in range(4)]
    for a, b in zip(together, alone, strict=True):
        assert a["prompt_id"] == b["prompt_id"] and a["seed"] == b["seed"]
        assert np.abs(pixels(a["image"]) - pixels(b["image"])).max() <= BATCH_TOLERANCE
    # Each row has its own seed, so images differ from row to row.
    assert not np.array_equal(pixels(together[0]["image"]), pixels(together[1]["image"]))


def test_long_prompt_is_truncated_with_a_recorded_warning():
    generator = FluxGenerator(tiny_config(**{"model.max_sequence_length": 32}))
    batch = pa.Table.from_pylist(
        [
            {"prompt_id": "long", "prompt": "a very long prompt " * 10, "index": 0},
            {"prompt_id": "short", "prompt": "a cat", "index": 1},
        ]
    )
    long, short = generator(batch).to_pylist()
    assert long["image"] and "prompt truncated" in long["warning"] and "T5 191 tokens > 32" in long["warning"]
    assert "CLIP" in long["warning"]
    assert short["warning"] is None and short["image"]


def test_a_failing_row_becomes_an_error_row_and_the_others_finish():
    generator = FluxGenerator(tiny_config(**{"generate.batch_size": 4}))
    batch = pa.Table.from_pylist(
        [
            {"prompt_id": "ok1", "prompt": "a cat", "index": 0, "width": None, "seed": None},
            {"prompt_id": "bad-width", "prompt": "a dog", "index": 1, "width": 100, "seed": None},
            {"prompt_id": "bad-seed", "prompt": "a cow", "index": 2, "width": None, "seed": -5},
            {"prompt_id": "ok2", "prompt": "a hen", "index": 3, "width": 32, "seed": 9},
        ]
    )
    rows = {row["prompt_id"]: row for row in generator(batch).to_pylist()}
    assert "width 100 is not a positive multiple of 16" in rows["bad-width"]["error"]
    assert "seed -5" in rows["bad-seed"]["error"]
    assert rows["bad-width"]["image"] is None
    assert rows["ok1"]["error"] is None and pixels(rows["ok1"]["image"]).shape == (64, 64, 3)
    assert rows["ok2"]["error"] is None and pixels(rows["ok2"]["image"]).shape == (64, 32, 3)
    assert rows["ok2"]["seed"] == 9 and rows["ok1"]["seed"] == 0


# ------------------------------------------------------------------ on Ray


@pytest.fixture(scope="module")
def two_actor_run(ray_local, prompt_file, tiny_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gen2"))
    cfg = tiny_config(**{"generate.num_actors": 2, "generate.batch_size": 4, "model.source": tiny_dir})
    summary = generate(cfg, read_prompts(prompt_file), out)
    return out, summary


def test_generate_stage_on_two_actors(two_actor_run, prompt_file):
    out, summary = two_actor_run
    table = read_stage(out)
    expected = read_prompts(prompt_file).rows
    assert table.num_rows == len(expected) == 20
    assert table.column("prompt_id").to_pylist() == sorted(r["prompt_id"] for r in expected)
    by_id = {r["prompt_id"]: r for r in expected}
    for row in table.to_pylist():
        assert row["prompt"] == by_id[row["prompt_id"]]["prompt"]
        assert row["seed"] == by_id[row["prompt_id"]]["index"]  # base seed 0 + line index
        assert row["error"] is None and row["round"] == 1 and row["seconds"] > 0
        assert Image.open(io.BytesIO(row["image"])).format == "PNG"
        assert pixels(row["image"]).shape == (64, 64, 3)
    assert summary["rows"] == 20 and summary["errors"] == 0 and summary["skipped_blank_prompts"] == 2
    assert storage.read_summary(out)["images"] == 20


def test_same_images_on_one_and_two_actors(ray_local, prompt_file, tmp_path):
    prompts = read_prompts(prompt_file)
    prompts.rows = prompts.rows[:8]
    images = []
    for actors in (1, 2):
        cfg = tiny_config(**{"generate.num_actors": actors, "generate.batch_size": 1})
        generate(cfg, prompts, str(tmp_path / f"a{actors}"))
        table = read_stage(str(tmp_path / f"a{actors}"), columns=["prompt_id", "image"])
        images.append({row["prompt_id"]: row["image"] for row in table.to_pylist()})
    assert len(images[0]) == 8
    assert images[0] == images[1]  # byte-identical PNGs


def test_cli_generate_reports_errors_and_refuses_to_overwrite(ray_local, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    records = [{"prompt": f"a cat {i}"} for i in range(3)] + [{"prompt": "a dog", "width": 100}]
    prompts.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = str(tmp_path / "out")
    args = ["generate", "--prompts", str(prompts), "--out", out, "--set", "generate.num_actors=1"]
    # A bad per-row setting is refused while the file is read: before Ray, before any output.
    assert cli(args) == 2
    assert "line 4: width 100 is not a multiple of 16" in capsys.readouterr().err
    assert not storage.exists(out)
    prompts.write_text("\n".join(json.dumps(r) for r in records[:3]) + "\n")
    assert cli(args) == 0
    printed = capsys.readouterr().out
    assert "3 rows, 3 images, 0 errors" in printed and out in printed
    assert storage.exists(f"{out}/run.yaml") and storage.exists(f"{out}/preview.png")
    assert len(read_stage(f"{out}/generate")) == 3
    # A completed output is never silently replaced.
    assert cli(args) == 2
    assert "already holds a completed stage" in capsys.readouterr().err


def test_prompts_from_and_images_to_s3(ray_local, s3_bucket, tmp_path, capsys):
    storage.write_text(f"{s3_bucket}/in/prompts.txt", "a red kite\n\na blue kite\na green kite\n")
    out = f"{s3_bucket}/runs/s3-demo"
    args = ["generate", "--prompts", f"{s3_bucket}/in/prompts.txt", "--out", out, "--preset", "tiny"]
    assert cli([*args, "--set", "generate.num_actors=1"]) == 0
    assert "3 rows, 3 images, 0 errors" in capsys.readouterr().out
    assert storage.is_complete(f"{out}/generate")
    assert storage.read_summary(f"{out}/generate")["skipped_blank_prompts"] == 1
    table = read_stage(f"{out}/generate")
    assert table.column("prompt").to_pylist() == ["a red kite", "a blue kite", "a green kite"]
    assert all(pixels(png).shape == (64, 64, 3) for png in table.column("image").to_pylist())
    assert storage.exists(f"{out}/run.yaml") and storage.exists(f"{out}/preview.png")


# ------------------------------------------------------------------ fail fast, in a fresh process


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "artaug.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_missing_model_folder_fails_before_ray_starts(prompt_file, tmp_path):
    missing = tmp_path / "no-such-model"
    result = run_cli(
        "generate", "--prompts", prompt_file, "--out", str(tmp_path / "o"), "--set", f"model.source={missing}"
    )
    assert result.returncode == 2
    assert f"folder '{missing}' does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Started a local Ray instance" not in result.stdout + result.stderr


def test_cli_refuses_bad_input_with_clear_messages(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe broken\n")
    result = run_cli("generate", "--prompts", str(bad), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "line 2 is not valid UTF-8" in result.stderr
    result = run_cli("config", "show", "--set", "generate.width=1000")
    assert result.returncode == 2 and "generate.width: 1000 is not a positive multiple of 16" in result.stderr
    result = run_cli("--help")
    assert result.returncode == 0
    assert all(c in result.stdout for c in ("run", "generate", "models", "config"))


def test_prompt_blocks_are_capped_so_a_block_holds_few_images():
    from artaug.stages.generator import prompt_blocks

    generate = tiny_config(**{"generate.num_actors": 2}).generate
    assert generate.block_rows == 64 and generate.blocks == 0
    assert [prompt_blocks(n, generate) for n in (3, 8, 256, 512, 513, 4096)] == [3, 8, 8, 8, 9, 64]
    assert prompt_blocks(4096, tiny_config(**{"generate.blocks": 5}).generate) == 5  # as set
