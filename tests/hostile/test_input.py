"""Hostile input: prompt files, user strings that become paths, image bytes, non-finite numbers.

Each case asserts the clear one-line error (or the row error / "n/a") and that nothing was read,
written or lost beyond what it should. None of these starts Ray except through a refused CLI run.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from artaug import charts, storage
from artaug.config import ConfigError, RunConfig, load_config
from artaug.images import MAX_PIXELS, BadImageError, decode_image, png_bytes
from artaug.loop.manifest import Manifest
from artaug.loop.prompt_sets import train_prompts
from artaug.loop.report import write_report
from artaug.loop.rundir import start
from artaug.preview import contact_sheet
from artaug.prompts import MAX_LINE_BYTES, PromptFileError, read_prompts
from artaug.rows import GENERATE
from artaug.stages.enhance import Enhancer

HOSTILE_IDS = ["../../etc/x", "/etc/passwd", "a\x00b", "x" * 300, "..", ".hidden", "a\\b", "line\nbreak"]


def files_under(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def peak_heap_alone(call: str, *args: str) -> int:
    """Peak Python heap, in bytes, of a second call of `call` (`module:function`) on `args`, made in a
    fresh interpreter whose first call imported what the function imports lazily.

    tracemalloc counts every thread of its process, and the suite's background pieces share the test
    process (tests/background.py): measured in it, their allocations would count as well."""
    code = (
        "import importlib, sys, tracemalloc\n"
        "module, name = sys.argv[1].split(':')\n"
        "function = getattr(importlib.import_module(module), name)\n"
        "function(*sys.argv[2:])\n"  # imports what the function imports lazily, fills caches
        "tracemalloc.start()\n"
        "function(*sys.argv[2:])\n"
        "print(tracemalloc.get_traced_memory()[1])\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code, call, *args], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split()[-1])


def refused(path, match: str, limit: int = 0, settings=None) -> str:
    """The one-line PromptFileError for `path`, which names the file."""
    with pytest.raises(PromptFileError, match=match) as err:
        read_prompts(str(path), limit, settings)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)), message
    return message


# ---------------------------------------------------------------- prompt files: bounded reading


def test_max_prompts_reads_eight_prompts_of_a_million_line_file(tmp_path):
    path = tmp_path / "big.txt"
    tail = b"\xff\xfe not utf-8\n"
    path.write_bytes(b"a fox\n" * 1_000_000 + tail)
    cfg = load_config("tiny", overrides=[f"prompts={path}", "loop.max_prompts=8"])
    start_time = time.perf_counter()
    prompts = train_prompts(cfg)
    elapsed = time.perf_counter() - start_time
    # The invalid last line proves the tail was never read: a file that is read to it is refused.
    assert len(prompts.rows) == 8 and [r["line"] for r in prompts.rows] == list(range(1, 9))
    assert elapsed < 0.5, elapsed
    path.write_bytes(b"a fox\n" * 8 + tail)
    refused(path, "line 9 is not valid UTF-8")


def test_limit_applies_to_jsonl_csv_and_parquet_while_reading(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c", "seed": NaN}\n')
    assert [r["prompt"] for r in read_prompts(str(jsonl), limit=2).rows] == ["a", "b"]
    refused(jsonl, "line 3: seed nan is not a finite number")
    table = pa.table({"prompt": [f"p{i}" for i in range(1000)], "seed": [1] * 999 + [-5]})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=100)
    assert len(read_prompts(str(tmp_path / "p.parquet"), limit=3).rows) == 3
    refused(tmp_path / "p.parquet", r"row 1000: seed -5 is out of range \[0, ")


def test_limit_and_checks_on_object_storage(s3_bucket):
    uri = f"{s3_bucket}/hostile/p.jsonl"
    storage.write_bytes(uri, b'{"prompt": "a fox"}\n' * 100_000 + b'{"prompt": "x", "steps": 1e999}\n')
    assert len(read_prompts(uri, limit=8).rows) == 8
    storage.write_bytes(uri, b'{"prompt": "a fox"}\n{"prompt": "x", "steps": 1e999}\n')
    refused(uri, "line 2: steps inf is not a finite number")
    refused(f"{s3_bucket}/hostile/none.txt", "prompt file not found")


# ---------------------------------------------------------------- prompt files: hostile rows


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", "seed": NaN}', "seed nan is not a finite number"),
        ('{"prompt": "a", "seed": 1e999}', "seed inf is not a finite number"),
        ('{"prompt": "a", "seed": -Infinity}', "seed -inf is not a finite number"),
        ('{"prompt": "a", "seed": 100000000000000000000000000000}', "seed 1000.* is out of range"),
        ('{"prompt": "a", "seed": ' + "9" * 5000 + "}", "is not valid JSON"),
        ('{"prompt": "a", "seed": true}', "seed True is not a number"),
        ('{"prompt": "a", "seed": 1.5}', "seed 1.5 is not a whole number"),
        (
            '{"prompt": "a", "steps": 100000}',
            r"steps 100000 is out of range \[1, 200\] \(generate.max_steps\)",
        ),
        ('{"prompt": "a", "steps": 0}', r"steps 0 is out of range"),
        ('{"prompt": "a", "guidance": 1e6}', r"out of range \[0, 100.0\] \(generate.max_guidance\)"),
        ('{"prompt": "a", "guidance": -1}', "guidance -1 is out of range"),
        ('{"prompt": "a", "width": 4096}', r"width 4096 is out of range \[16, 256\] \(generate.max_side\)"),
        ('{"prompt": "a", "height": 100}', "height 100 is not a multiple of 16"),
        ('{"prompt": "a", "steps": [4]}', r"steps \[4\] is not a number"),
        ('{"prompt": "a\\ud800b"}', r"prompt holds a lone surrogate '\\ud800' at character 1"),
        ('{"prompt": "a", "prompt_id": "\\udfff"}', "prompt_id holds a lone surrogate"),
        ('{"prompt": 12}', "'prompt' must be text, got 12"),
        ('{"prompt": "a", "prompt_id": {"x": 1}}', "prompt_id must be text"),
        ("[" * 100_000 + "]" * 100_000, "is not valid JSON"),
    ],
)
def test_hostile_jsonl_rows_are_refused_naming_the_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n\n' + line + "\n", encoding="utf-8", errors="surrogatepass")
    refused(path, "line 3[: ].*" + message)


@pytest.mark.parametrize("prompt_id", HOSTILE_IDS)
def test_prompt_ids_that_could_name_paths_are_refused(tmp_path, prompt_id):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a cat", "prompt_id": prompt_id}) + "\n")
    refused(path, "line 1: prompt_id .* is not allowed")


def test_per_row_bounds_follow_the_configured_generate_section(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,width,steps\na cat,512,300\n")
    refused(path, r"line 2: width 512 is out of range \[16, 256\]")
    cfg = load_config("tiny", overrides=["generate.max_steps=400", "generate.max_side=512"])
    rows = read_prompts(str(path), settings=cfg.generate).rows
    assert rows[0]["steps"] == 300 and rows[0]["width"] == 512


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("p.txt", b"fine\n\xc3\x28 broken\n", "line 2 is not valid UTF-8"),
        ("p.txt", b"fine\n\xed\xa0\x80 an encoded surrogate\n", "line 2 is not valid UTF-8"),
        (
            "p.txt",
            b"fine\n" + b"x" * (MAX_LINE_BYTES + 10) + b"\n",
            f"line 2 is longer than {MAX_LINE_BYTES} bytes",
        ),
        ("p.csv", b"prompt,seed\nfine,1\n" + b"x" * 200_000 + b",2\n", "line 3 is not valid CSV"),
        ("p.csv", b"prompt,steps\nfine,abc\n", "line 2: steps 'abc' is not a number"),
        ("p.csv", b"prompt,guidance\nfine,inf\n", "line 2: guidance inf is not a finite number"),
        ("p.parquet", b"PAR1 this is not parquet at all PAR1", "not a readable Parquet file"),
    ],
)
def test_hostile_text_csv_and_parquet_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    refused(path, message)


def test_cut_and_mistyped_parquet_files(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a cat"] * 5000, "seed": list(range(5000))}), path)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    refused(path, "not a readable Parquet file")
    pq.write_table(pa.table({"prompt": ["a", "b"], "guidance": [1.0, float("nan")]}), path)
    refused(path, "row 2: guidance nan is not a finite number")
    pq.write_table(pa.table({"prompt": [1, 2]}), path)
    refused(path, "row 1: 'prompt' must be text")
    pq.write_table(pa.table({"text": ["a"]}), path)
    refused(path, "needs a 'prompt' column")


def test_the_cli_refuses_a_bad_prompt_file_before_ray_or_any_output(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "seed": NaN}\n')
    before = files_under(tmp_path)
    args = ["run", "--set", f"prompts={bad}", "--out", str(tmp_path / "run")]
    result = subprocess.run(
        [sys.executable, "-m", "artaug.cli", *args], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 2, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if str(bad) in line]
    assert len(error) == 1 and "line 2: seed nan is not a finite number" in error[0], result.stderr
    assert "Traceback" not in result.stderr
    assert "Ray" not in result.stdout + result.stderr
    assert files_under(tmp_path) == before  # no run directory, no run.yaml, no manifest


# ---------------------------------------------------------------- user strings that become paths


@pytest.mark.parametrize("name", ["../../etc/x", "/abs", "a/b", "a\x00b", "..", "x" * 101, ""])
def test_a_run_name_that_is_not_a_folder_name_is_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="name: .*must be 1-100 letters"):
        RunConfig(name=name)


def _noise_png(side: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return png_bytes(Image.fromarray(pixels))


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (  # noqa: E731
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    )
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _run_with_filter_rows(tmp_path, rows: list[dict], **overrides) -> str:
    run_dir = str(tmp_path / "run")
    cfg = load_config("tiny", overrides=[f"{k}={v}" for k, v in overrides.items()])
    start(cfg, run_dir)
    filt = os.path.join(run_dir, "round-1", "filter")
    os.makedirs(filt)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(filt, "part-0.parquet"), row_group_size=4)
    summary = {
        "rows": len(rows),
        "accepted": 1,
        "rejected": len(rows) - 1,
        "reject_reasons": {"aesthetic": 1},
    }
    storage.mark_complete(filt, summary)
    manifest = Manifest.load(run_dir)
    manifest.stage_done(1, "filter", {**summary, "mean_aesthetic_gain": float("nan")})
    return run_dir


def _pair(prompt_id: str, before: bytes | None, after: bytes | None, score: float, delta: float) -> dict:
    return {
        "prompt_id": prompt_id, "prompt": "a cat", "before": before, "after": after, "accepted": delta > 0,
        "reject_reasons": [] if delta > 0 else ["aesthetic"], "aesthetic_delta": delta,
        "regions": json.dumps([{"box": [0.1, 0.1, 0.5, float("nan")], "prompt": "x"}, {"box": [0, 0, 1, 1]}]),
        "laion_aesthetic_before": score, "laion_aesthetic_after": score,
    }  # fmt: skip


def test_report_survives_hostile_ids_bad_images_and_non_finite_scores(tmp_path):
    good = _noise_png(32)
    rows = [
        _pair("../../../escaped", good, good, float("nan"), float("inf")),
        _pair("/tmp/absolute", b"not an image", _bomb_png(100_000, 100_000), 1.0, float("nan")),
        _pair("a\x00b" + "y" * 500, _bomb_png(5000, 5000), None, float("-inf"), 0.5),
    ]
    run_dir = _run_with_filter_rows(tmp_path, rows)
    outside = files_under(tmp_path)
    summary = write_report(run_dir)
    written = files_under(tmp_path) - outside
    assert written and all(path.startswith(os.path.join("run", "report") + os.sep) for path in written)
    images = sorted(p for p in written if "/img/" in p)
    assert images == ["run/report/img/r1-0000-after.png", "run/report/img/r1-0000-before.png"]
    assert summary["images"] == 2
    html = (tmp_path / "run" / "report" / "index.html").read_text()
    assert (
        "n/a" in html
        and "nan" not in html.lower().replace("n/a", "")
        and "inf" not in html.replace("info", "")
    )
    assert html.count("(no image)") == 4
    assert "../../../escaped" in html  # shown, escaped, as text only


def test_report_never_holds_every_image_of_a_stage(tmp_path):
    big = _noise_png(320)  # ~300 KB each, 48 rows: ~15 MB of images in the stage
    rows = [_pair(f"p{i:03d}", big, big, 1.0, 0.1) for i in range(48)]
    run_dir = _run_with_filter_rows(tmp_path, rows, **{"loop.report_pairs": 2})
    stage_bytes = 2 * len(big) * len(rows)
    peak = peak_heap_alone("artaug.loop.report:write_report", run_dir)
    assert peak < stage_bytes / 4, (peak, stage_bytes)
    assert len(os.listdir(os.path.join(run_dir, "report", "img"))) == 4  # two pairs shown


def sixteen_tile_sheet(stage: str, out: str) -> None:
    contact_sheet(stage, cell=32, max_tiles=16).save(out)


def test_contact_sheet_streams_and_greys_out_bad_images(tmp_path):
    big = _noise_png(320)
    stage = tmp_path / "generate"
    stage.mkdir()
    base = {"prompt": "a", "seed": 0, "round": 1, "width": 320, "height": 320, "steps": 4, "guidance": 3.5,
            "error": None, "warning": None, "seconds": 0.0}  # fmt: skip
    rows = [{**base, "prompt_id": f"p{i:03d}", "image": big} for i in range(100)]
    rows[0]["image"], rows[1]["image"] = b"garbage", _bomb_png(100_000, 100_000)
    pq.write_table(pa.Table.from_pylist(rows, schema=GENERATE), stage / "part-0.parquet", row_group_size=8)
    (stage / ".half-written.parquet").write_bytes(b"PAR1 cut")  # hidden, as Parquet readers skip it
    sheet_path = tmp_path / "sheet.png"
    peak = peak_heap_alone(f"{__name__}:sixteen_tile_sheet", str(stage), str(sheet_path))
    sheet = Image.open(sheet_path)
    assert peak < len(big) * len(rows) / 4, peak
    assert sheet.size == (8 * 32, 2 * 32)  # only the first 16 rows are drawn
    assert sheet.getpixel((16, 16)) == sheet.getpixel((48, 16)) == (128, 128, 128)  # bad images: grey
    assert sheet.getpixel((80, 16)) != (128, 128, 128)


# ---------------------------------------------------------------- images


@pytest.mark.parametrize(
    "data, message",
    [
        (_bomb_png(100_000, 100_000), "larger than"),  # beyond PIL's own bomb limit
        (_bomb_png(4097, 4096), "larger than"),  # just over ours
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "corrupt image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "corrupt image"),  # no Ghostscript
        (b"", "empty image"),
    ],
)
def test_decode_image_refuses_bombs_corrupt_and_foreign_bytes(data, message):
    with pytest.raises(BadImageError, match=message):
        decode_image(data)


def test_a_truncated_image_is_refused_and_a_good_one_decodes():
    good = _noise_png(64)
    assert decode_image(good).size == (64, 64) and 64 * 64 <= MAX_PIXELS
    with pytest.raises(BadImageError, match="corrupt image"):
        decode_image(good[: len(good) // 2])


def test_enhance_turns_a_corrupt_image_into_that_rows_error():
    cfg = load_config("tiny", overrides=["enhance.mode=photometric"])
    critique = json.dumps({"adjustments": [{"aspect": "exposure", "direction": "increase", "strength": 2,
                                            "note": ""}], "regions": [], "rewritten_prompt": ""})  # fmt: skip
    base = {"prompt": "a", "seed": 0, "round": 1, "width": 64, "height": 64, "steps": 4, "guidance": 3.5,
            "error": None, "warning": None, "seconds": 0.0}  # fmt: skip
    rows = [{**base, "prompt_id": "bad", "image": _bomb_png(100_000, 100_000), "critique": critique},
            {**base, "prompt_id": "good", "image": _noise_png(64), "critique": critique}]  # fmt: skip
    schema = GENERATE.append(pa.field("critique", pa.string()))
    out = Enhancer(cfg)(pa.Table.from_pylist(rows, schema=schema)).to_pylist()
    assert out[0]["error"].startswith("bad image:") and out[0]["after"] is None
    assert out[1]["error"] is None and out[1]["after"]


# ---------------------------------------------------------------- non-finite numbers in charts


def test_charts_leave_out_non_finite_values():
    nan, inf = float("nan"), float("inf")
    svg = charts.histogram("h", {"before": [1.0, nan, inf, 2.0], "after": [-inf]})
    assert "before (2 n/a)" in svg and "after (1 n/a)" in svg and "nan" not in svg
    svg = charts.lines("loss", {"after images": [(0, 1.0), (1, nan), (2, 0.5)]})
    assert "after images (1 n/a)" in svg and "nan" not in svg
    assert "nan" not in charts.bars("b", {"x": nan, "y": 2})
    svg = charts.intervals("i", "n", [("a", "lora", nan, [nan, 1.0]), ("b", "base", 1.0, [0.5, inf])])
    assert "no data" in svg and "nan" not in svg and "inf" not in svg
    assert "nan" not in charts.win_rates("w", {"win_rate": nan, "tie_rate": 0.5, "loss_rate": None}, "n")
