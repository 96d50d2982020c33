"""The structure docs/architecture.md describes, checked: import contracts, module size, stage files
that share no code, and a command line that starts without the heavy libraries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "artaug"
STAGES = ("generate", "critique", "enhance", "filter", "train", "evaluate/run")


def test_import_contracts_are_kept():
    """.importlinter: layers (an arrow only points down), independent stages, serving apart from training."""
    result = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_no_module_is_longer_than_about_350_lines():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    long = {name: n for name, n in lengths.items() if n > 360}
    assert not long, f"split these by concept: {long}"


def _windows(path: Path, size: int = 6) -> set[tuple[str, ...]]:
    """Every run of `size` meaningful lines (no blanks, comments, imports or lone brackets)."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    skipped = ("#", "import ", "from ", '"""')
    kept = [
        line for line in lines if line and not line.startswith(skipped) and line not in (")", "]", "}", "),")
    ]
    return {tuple(kept[i : i + size]) for i in range(len(kept) - size + 1)}


def test_stage_files_share_no_block_of_code():
    files = {name: PACKAGE / "stages" / f"{name}.py" for name in STAGES}
    windows = {name: _windows(path) for name, path in files.items()}
    shared = [
        (a, b, next(iter(windows[a] & windows[b])))
        for i, a in enumerate(STAGES) for b in STAGES[i + 1 :] if windows[a] & windows[b]
    ]  # fmt: skip
    assert not shared, f"move what these stages share into stages/contract.py (or a shared module): {shared}"


def test_the_command_line_starts_without_torch_or_ray():
    """`artaug --help` stays instant: building the parser imports no heavy library."""
    probe = (
        "import sys; from artaug.cli import build_parser; build_parser().format_help();"
        " print(sorted(m for m in ('torch', 'ray', 'diffusers', 'transformers', 'vllm') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_the_module_map_names_every_module():
    """docs/architecture.md's module map has a row for every module (or its package row names it)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = {}
    for line in text[text.index("## Module map") :].splitlines():
        if line.startswith("| `"):
            rows[line.split("|")[1].strip().strip("`")] = line
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if path.name in ("__init__.py", "__main__.py") or "presets" in relative.parts:
            continue
        if len(relative.parts) == 2:
            assert str(relative) in rows, f"docs/architecture.md does not map {relative}"
            continue
        package = f"artaug/{relative.parts[1]}/"
        assert package in rows and f"`{path.name}`" in rows[package], (
            f"docs/architecture.md does not map {relative}"
        )
