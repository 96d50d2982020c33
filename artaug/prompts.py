"""Read prompt files into rows: .txt (one per line), .jsonl, .csv or .parquet; local or URI.

Structured files need a `prompt` column and may carry `prompt_id`, `seed`, `width`, `height`,
`steps` and `guidance` per row (per-row settings are checked when the row is generated). Blank
prompts are skipped and counted; a file that is not UTF-8 is refused, naming the line.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from artaug.errors import ArtaugError
from artaug.storage import read_bytes

PER_ROW_SETTINGS = ("seed", "width", "height", "steps", "guidance")
FORMATS = (".txt", ".jsonl", ".csv", ".parquet")


class PromptFileError(ArtaugError, ValueError):
    """The prompt file cannot be read; the message names the file and, where known, the line."""


@dataclass
class PromptSet:
    rows: list[dict]
    """One dict per prompt: prompt_id, prompt, and any per-row settings the file gave."""
    skipped_blank: int = 0
    """Blank prompts that were skipped."""
    source: str = ""
    """Where the prompts came from."""
    notes: list[str] = field(default_factory=list)
    """Human-readable remarks about the read (skips, defaults applied)."""

    def first(self, count: int) -> PromptSet:
        """The first `count` prompts."""
        return dataclasses.replace(self, rows=self.rows[:count])


def read_prompts(path: str) -> PromptSet:
    suffix = next((s for s in FORMATS if path.lower().endswith(s)), None)
    if suffix is None:
        raise PromptFileError(f"{path}: unsupported prompt file type (use {', '.join(FORMATS)})")
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise PromptFileError(f"{path}: prompt file not found") from None
    if suffix == ".parquet":
        records = pq.read_table(io.BytesIO(data)).to_pylist()
        numbered = list(enumerate(records, start=1))
    else:
        lines = _decode_lines(data, path)
        if suffix == ".txt":
            numbered = [(n, {"prompt": line}) for n, line in lines]
        elif suffix == ".jsonl":
            numbered = [(n, _json_record(line, path, n)) for n, line in lines if line.strip()]
        else:
            numbered = _csv_records(lines, path)
    return _to_rows(numbered, path)


def _decode_lines(data: bytes, path: str) -> list[tuple[int, str]]:
    lines = []
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            lines.append((number, raw.decode("utf-8-sig" if number == 1 else "utf-8")))
        except UnicodeDecodeError as err:
            raise PromptFileError(
                f"{path}: line {number} is not valid UTF-8 (byte {err.start}: "
                f"{raw[err.start : err.start + 1]!r}); re-encode the file as UTF-8"
            ) from None
    return lines


def _json_record(line: str, path: str, number: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise PromptFileError(f"{path}: line {number} is not valid JSON: {err.msg}") from None
    if not isinstance(record, dict):
        raise PromptFileError(f"{path}: line {number} must be a JSON object with a 'prompt'")
    return record


def _csv_records(lines: list[tuple[int, str]], path: str) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO("\n".join(line for _, line in lines)))
    if not reader.fieldnames or "prompt" not in reader.fieldnames:
        raise PromptFileError(f"{path}: the CSV header must have a 'prompt' column")
    return [(reader.line_num, dict(record)) for record in reader]


def _to_rows(numbered: list[tuple[int, dict]], path: str) -> PromptSet:
    rows, seen, blank = [], set(), 0
    for index, (number, record) in enumerate(numbered):
        if "prompt" not in record:
            raise PromptFileError(f"{path}: line {number} has no 'prompt'")
        prompt = record["prompt"]
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            blank += 1
            continue
        if not isinstance(prompt, str):
            raise PromptFileError(f"{path}: line {number}: 'prompt' must be text, got {prompt!r}")
        row = {"prompt": prompt.strip(), "line": number, "index": index}
        prompt_id = record.get("prompt_id")
        row["prompt_id"] = str(prompt_id) if prompt_id not in (None, "") else f"p{index:06d}"
        if row["prompt_id"] in seen:
            raise PromptFileError(f"{path}: line {number}: duplicate prompt_id {row['prompt_id']!r}")
        seen.add(row["prompt_id"])
        for key in PER_ROW_SETTINGS:
            if record.get(key) not in (None, ""):
                row[key] = _number(record[key], key, path, number)
        rows.append(row)
    notes = [f"skipped {blank} blank prompt(s)"] if blank else []
    if not rows:
        raise PromptFileError(f"{path}: no prompts (blank lines skipped: {blank})")
    return PromptSet(rows=rows, skipped_blank=blank, source=path, notes=notes)


def _number(value, key: str, path: str, number: int) -> float | int:
    try:
        parsed = float(value)
    except (TypeError, ValueError):
        raise PromptFileError(f"{path}: line {number}: {key} {value!r} is not a number") from None
    return parsed if key == "guidance" else int(parsed)
