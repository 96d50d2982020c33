"""Read prompt files into rows: .txt (one per line), .jsonl, .csv or .parquet; local or URI.

Structured files need a `prompt` column and may carry `prompt_id`, `seed`, `width`, `height`,
`steps` and `guidance` per row. Blank prompts are skipped and counted.

Streamed and bounded: the file is read a line (Parquet: a page, never a whole row group) at a time,
and reading stops at `limit` prompts, so `loop.max_prompts: 8` reads eight prompts of a file of any
size (benchmarks/scale.py measures it). Every row is checked as it is read, so a bad file is refused
before a stage, a run directory or Ray starts, with the file and the line (Parquet: row) in one line:
text must be UTF-8 without lone surrogates, a line at most MAX_LINE_BYTES, a prompt at most
MAX_PROMPT_CHARS; a prompt_id at most 128 characters without path separators, control characters or
a leading "."; per-row settings finite numbers within the generate section's bounds (seed in
[0, 2**63), sides multiples of 16 up to max_side, steps up to max_steps, guidance up to max_guidance).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from artaug import storage
from artaug.config import GenerateConfig
from artaug.errors import ArtaugError

PER_ROW_SETTINGS = ("seed", "width", "height", "steps", "guidance")
FORMATS = (".txt", ".jsonl", ".csv", ".parquet")
MAX_LINE_BYTES = 1 << 20
MAX_PROMPT_CHARS = 100_000
MAX_ID_CHARS = 128
PARQUET_BATCH = 256
PARQUET_BUFFER = 1 << 20


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


def read_prompts(path: str, limit: int = 0, settings: GenerateConfig | None = None) -> PromptSet:
    """The first `limit` prompts of `path` (0: all), per-row settings checked against `settings`
    (default: the generate section's defaults)."""
    suffix = next((s for s in FORMATS if path.lower().endswith(s)), None)
    if suffix is None:
        raise PromptFileError(f"{path}: unsupported prompt file type (use {', '.join(FORMATS)})")
    fs, inner = storage.resolve(path)
    if fs.get_file_info(inner).type != pafs.FileType.File:
        raise PromptFileError(f"{path}: prompt file not found")
    rows = _Rows(path, limit, settings or GenerateConfig())
    if suffix == ".parquet":
        with fs.open_input_file(inner) as f:
            rows.take(_parquet_records(f, path))
    else:
        with fs.open_input_stream(inner, compression=None) as raw:
            lines = _lines(io.BufferedReader(raw), path)
            if suffix == ".txt":
                rows.take(((n, {"prompt": line}) for n, line in lines))
            elif suffix == ".jsonl":
                rows.take(((n, _json_record(line, path, n)) for n, line in lines if line.strip()))
            else:
                rows.take(_csv_records(lines, path))
    return rows.result()


def _lines(stream: io.BufferedReader, path: str) -> Iterator[tuple[int, str]]:
    """(line number, text without its line end), decoded and bounded one line at a time."""
    for number in itertools.count(1):
        raw = stream.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if len(raw) > MAX_LINE_BYTES:
            raise PromptFileError(f"{path}: line {number} is longer than {MAX_LINE_BYTES} bytes")
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise PromptFileError(
                f"{path}: line {number} is not valid UTF-8 (byte {err.start}: "
                f"{raw[err.start : err.start + 1]!r}); re-encode the file as UTF-8"
            ) from None
        yield number, text.rstrip("\r\n")


def _json_record(line: str, path: str, number: int) -> dict:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as err:  # also numbers of over 4300 digits, deep nesting
        why = err.msg if isinstance(err, json.JSONDecodeError) else str(err).split(";")[0][:120]
        raise PromptFileError(f"{path}: line {number} is not valid JSON: {why}") from None
    if not isinstance(record, dict):
        raise PromptFileError(f"{path}: line {number} must be a JSON object with a 'prompt'")
    return record


def _csv_records(lines: Iterator[tuple[int, str]], path: str) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(line + "\n" for _, line in lines)
    try:
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise PromptFileError(f"{path}: the CSV header must have a 'prompt' column")
        for record in reader:
            yield reader.line_num, record
    except csv.Error as err:
        raise PromptFileError(f"{path}: line {reader.line_num + 1} is not valid CSV: {err}") from None


def _parquet_records(f, path: str) -> Iterator[tuple[int, dict]]:
    try:
        # pyarrow's default pre-buffers each row group whole (pyarrow's writers put 1 Mi rows in one:
        # ~100 MB of prompts read for the first 4); without it, pages are read through a 1 MiB buffer.
        parquet = pq.ParquetFile(f, pre_buffer=False, buffer_size=PARQUET_BUFFER)
        names = parquet.schema_arrow.names
        if "prompt" not in names:
            raise PromptFileError(
                f"{path}: the Parquet file needs a 'prompt' column (it has {', '.join(names)})"
            )
        columns = [c for c in ("prompt", "prompt_id", *PER_ROW_SETTINGS) if c in names]
        number = 0
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH, columns=columns):
            for record in batch.to_pylist():
                number += 1
                yield number, record
    except (pa.ArrowException, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PromptFileError(f"{path}: not a readable Parquet file ({first[:200]})") from None


class _Rows:
    """Checks records as they stream in and keeps the first `limit` prompts."""

    def __init__(self, path: str, limit: int, settings: GenerateConfig):
        self.path, self.limit, self.settings = path, limit, settings
        self.rows: list[dict] = []
        self.seen: set[str] = set()
        self.blank = 0

    def take(self, numbered: Iterator[tuple[int, dict]]) -> None:
        for index, (number, record) in enumerate(numbered):
            self._add(index, number, record)
            if self.limit and len(self.rows) >= self.limit:
                return  # the rest of the file is never read

    def _add(self, index: int, number: int, record: dict) -> None:
        where = f"{self.path}: {'row' if self.path.lower().endswith('.parquet') else 'line'} {number}"
        if "prompt" not in record:
            raise PromptFileError(f"{where} has no 'prompt'")
        prompt = record["prompt"]
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            self.blank += 1
            return
        if not isinstance(prompt, str):
            raise PromptFileError(f"{where}: 'prompt' must be text, got {_shown(prompt)}")
        _check_text(prompt, "prompt", where)
        if len(prompt) > MAX_PROMPT_CHARS:
            raise PromptFileError(f"{where}: the prompt is longer than {MAX_PROMPT_CHARS} characters")
        row = {"prompt": prompt.strip(), "line": number, "index": index}
        row["prompt_id"] = _prompt_id(record.get("prompt_id"), index, where)
        if row["prompt_id"] in self.seen:
            raise PromptFileError(f"{where}: duplicate prompt_id {row['prompt_id']!r}")
        self.seen.add(row["prompt_id"])
        for key in PER_ROW_SETTINGS:
            if record.get(key) not in (None, ""):
                row[key] = _setting(record[key], key, where, self.settings)
        self.rows.append(row)

    def result(self) -> PromptSet:
        if not self.rows:
            raise PromptFileError(f"{self.path}: no prompts (blank lines skipped: {self.blank})")
        notes = [f"skipped {self.blank} blank prompt(s)"] if self.blank else []
        return PromptSet(rows=self.rows, skipped_blank=self.blank, source=self.path, notes=notes)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_text(text: str, what: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate, e.g. from a JSON "\ud800" escape
        raise PromptFileError(
            f"{where}: {what} holds a lone surrogate {text[err.start]!r} at character {err.start}"
        ) from None


def _prompt_id(value, index: int, where: str) -> str:
    """The row's id: the file's, checked (ids name rows in logs and reports), or p<index>."""
    if value in (None, ""):
        return f"p{index:06d}"
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise PromptFileError(f"{where}: prompt_id must be text, got {_shown(value)}")
    text = str(value)
    _check_text(text, "prompt_id", where)
    unsafe = next((c for c in text if c in "/\\" or unicodedata.category(c)[0] == "C"), None)
    if len(text) > MAX_ID_CHARS or text.startswith(".") or text != text.strip() or unsafe is not None:
        raise PromptFileError(
            f"{where}: prompt_id {_shown(text)} is not allowed: use at most {MAX_ID_CHARS} characters"
            " without '/', '\\', control characters, surrounding spaces or a leading '.'"
        )
    return text


def _setting(value, key: str, where: str, settings: GenerateConfig) -> int | float:
    """A per-row setting as an int (float for guidance), refused unless finite and within bounds."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise PromptFileError(f"{where}: {key} {_shown(value)} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PromptFileError(f"{where}: {key} {_shown(value)} is not a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise PromptFileError(f"{where}: {key} {value} is not a finite number")
    if key != "guidance":
        if isinstance(value, float) and not value.is_integer():
            raise PromptFileError(f"{where}: {key} {value} is not a whole number")
        value = int(value)
    low, high, why = _bounds(key, settings)
    if not low <= value <= high:  # compared before any float(): an int of 400 digits stays an int
        raise PromptFileError(f"{where}: {key} {_shown(value)} is out of range [{low}, {high}] ({why})")
    if key in ("width", "height") and value % 16:
        raise PromptFileError(f"{where}: {key} {value} is not a multiple of 16")
    return float(value) if key == "guidance" else value


def _bounds(key: str, settings: GenerateConfig) -> tuple[float, float, str]:
    return {
        "seed": (0, 2**63 - 1, "a 63-bit seed"),
        "width": (16, settings.max_side, "generate.max_side"),
        "height": (16, settings.max_side, "generate.max_side"),
        "steps": (1, settings.max_steps, "generate.max_steps"),
        "guidance": (0, settings.max_guidance, "generate.max_guidance"),
    }[key]
