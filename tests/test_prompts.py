import json
import os

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from artaug import storage
from artaug.prompts import PromptFileError, read_prompts


def test_txt_skips_and_counts_blank_lines(prompt_file):
    prompts = read_prompts(prompt_file)
    assert len(prompts.rows) == 20 and prompts.skipped_blank == 2
    assert [r["prompt_id"] for r in prompts.rows[:2]] == ["p000000", "p000001"]
    assert len({r["prompt_id"] for r in prompts.rows}) == 20
    assert all(r["prompt"].startswith("a watercolour") for r in prompts.rows)


def test_jsonl_keeps_ids_and_per_row_settings(tmp_path):
    path = tmp_path / "p.jsonl"
    records = [{"prompt": "a cat", "prompt_id": "cat", "seed": 7, "width": 128}, {"prompt": "a dog"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    rows = read_prompts(str(path)).rows
    assert rows[0]["prompt_id"] == "cat" and rows[0]["seed"] == 7 and rows[0]["width"] == 128
    assert rows[1]["prompt_id"] == "p000001" and "seed" not in rows[1]


def test_csv_and_parquet(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text('prompt_id,prompt,guidance\na,"a cat, sleeping",2.5\nb,,\nc,a dog,\n')
    prompts = read_prompts(str(csv_path))
    assert [r["prompt_id"] for r in prompts.rows] == ["a", "c"] and prompts.skipped_blank == 1
    assert prompts.rows[0]["prompt"] == "a cat, sleeping" and prompts.rows[0]["guidance"] == 2.5
    pq_path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["x", "y"], "seed": [3, 4]}), pq_path)
    assert [r["seed"] for r in read_prompts(str(pq_path)).rows] == [3, 4]


def test_non_utf8_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("a cat\na dog\nun caf\xe9 noir\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match="line 3 is not valid UTF-8"):
        read_prompts(str(path))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "prompt_id": "p000000"}\n', "duplicate prompt_id"),
        ("p.jsonl", '{"text": "a"}\n', "line 1 has no 'prompt'"),
        ("p.jsonl", "not json\n", "line 1 is not valid JSON"),
        ("p.jsonl", '{"prompt": "a", "seed": "x"}\n', "seed 'x' is not a number"),
        ("p.csv", "text\nhello\n", "'prompt' column"),
        ("p.txt", "\n \n", "no prompts"),
        ("p.docx", "x", "unsupported prompt file type"),
    ],
)
def test_bad_prompt_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PromptFileError, match=message):
        read_prompts(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(PromptFileError, match="not found"):
        read_prompts(str(tmp_path / "nope.txt"))


class _CountingFiles(pafs.FSSpecHandler):
    """Local files whose bytes read are counted (`read_bytes`)."""

    def __init__(self):
        super().__init__(fsspec.filesystem("file"))
        self.read_bytes = 0

    def open_input_file(self, path):
        f = self.fs.open(path, "rb")
        read = f.read

        def counted(*args):
            data = read(*args)
            self.read_bytes += len(data)
            return data

        f.read = counted
        return pa.PythonFile(f, mode="r")


def test_the_first_prompts_of_a_large_parquet_row_group_read_little_of_it(tmp_path, monkeypatch):
    """pyarrow pre-buffers a whole row group by default (1 Mi rows: ~100 MB of prompts): reading the
    first prompts must read pages, not the row group (benchmarks/scale.py measures the memory)."""
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"prompt": [f"{i} {os.urandom(40).hex()}" for i in range(100_000)]}), path)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    files = _CountingFiles()
    monkeypatch.setattr(storage, "resolve", lambda p: (pafs.PyFileSystem(files), str(p)))
    assert len(read_prompts(str(path), limit=4).rows) == 4
    size = path.stat().st_size
    assert files.read_bytes < size / 3, (files.read_bytes, size)
    assert len(read_prompts(str(path)).rows) == 100_000 and files.read_bytes > size  # counted: all read
