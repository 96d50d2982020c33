"""Every command of the command line, once, in its own fresh process, as a user runs it.

Import order differs in a fresh process: a cycle hidden by tests that import modules first shows up
only here. Commands that start Ray are run up to their input checks (which follow every import, except
`run`'s settings and prompt checks, which come first: the loop tests' runs import the rest); the
others run for real on tiny inputs. `generate` and `train` are refused in a fresh process in
test_generate.py and test_train.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.test_lora_algebra import DOUBLE, random_lora

COMMANDS = [
    "run", "generate", "critique", "enhance", "filter", "train", "fuse", "lora combine", "lora export",
    "evaluate", "report", "serve", "critic serve", "models build-tiny", "models build-tiny-vlm",
    "models prefetch", "models convert", "config show", "config fields",
]  # fmt: skip


def artaug(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "artaug.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def refused(result: subprocess.CompletedProcess, message: str) -> None:
    """Exit code 2, one line naming the problem, no traceback, no Ray started."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "Started a local Ray instance" not in result.stdout + result.stderr


def test_the_top_level_help_lists_every_command():
    result = artaug("--help")
    assert result.returncode == 0
    for command in {c.split()[0] for c in COMMANDS}:
        assert f"    {command} " in result.stdout, command


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = artaug(*command.split(), "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: artaug " + command)


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--set", "loop.roundz=3"], "loop.roundz: unknown field"),
        (["critique", "--images", "{tmp}/none", "--out", "{tmp}/o", "--set", "critique.backend=heuristic"],
         "holds a completed generate stage"),
        (["enhance", "--images", "{tmp}/none", "--critiques", "{tmp}/none", "--out", "{tmp}/o"],
         "holds a completed generate stage"),
        (["filter", "--pairs", "{tmp}/none", "--out", "{tmp}/o"], "holds enhance rows"),
        (["evaluate", "--base", "tiny", "--out", "{tmp}/o"], "nothing to compare"),
        (["report", "{tmp}/none"], "not a run directory"),
        (["serve", "--lora", "{tmp}/none.safetensors"], "does not exist"),
        (["critic", "serve", "--set", "critique.model=./no-model"], "is not a model folder"),
        (["models", "prefetch", "--set", "hub.offline=true"], "offline mode is on"),
    ],
)  # fmt: skip
def test_commands_that_start_ray_refuse_bad_input_first(args, message, tmp_path):
    refused(artaug(*(a.format(tmp=tmp_path) for a in args)), message)


def test_stage_commands_check_their_input_before_importing_torch_or_ray(tmp_path):
    """A wrong input path is refused by checks that need no model code (`artaug.stages.inputs`,
    `artaug.train.pairs`, `artaug.serve.sources`, `artaug.models.lineage`): the process never imports
    torch, Ray or diffusers."""
    none, out = str(tmp_path / "none"), str(tmp_path / "o")
    commands = [
        ["critique", "--images", none, "--out", out],
        ["enhance", "--images", none, "--critiques", none, "--out", out],
        ["filter", "--pairs", none, "--out", out],
        ["train", "--pairs", none, "--out", out],
        ["serve", "--lora", f"{none}.safetensors"],
        ["evaluate", "--base", "tiny", "--out", out],  # no --lora: nothing to compare
    ]
    code = (
        "import sys\nfrom artaug.cli import main\n"
        f"codes = [main(args) for args in {commands!r}]\n"
        "print(codes, sorted(m for m in ('torch', 'ray', 'diffusers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last == "[2, 2, 2, 2, 2, 2] []", result.stdout + result.stderr[-3000:]


def test_lora_commands_run_in_a_fresh_process(tiny_dir, tmp_path):
    first = random_lora(tmp_path / "a.safetensors", seed=1, rank=2, alpha=4.0, targets=DOUBLE)
    second = random_lora(tmp_path / "b.safetensors", seed=2, rank=3, alpha=3.0, targets=DOUBLE[:4])
    combined, kohya, fused = (
        tmp_path / "ab.safetensors",
        tmp_path / "ab-kohya.safetensors",
        tmp_path / "fused",
    )

    result = artaug("lora", "combine", first, second, "--out", str(combined))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "combined 2 LoRA(s)" in result.stdout and combined.exists()
    result = artaug("lora", "export", str(combined), "--format", "kohya", "--out", str(kohya))
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(key.startswith("lora_unet_") for key in load_file(kohya))
    result = artaug("fuse", "--base", tiny_dir, "--lora", first, "--lora", second, "--out", str(fused))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (fused / "model_index.json").exists() and "fused 2 LoRA(s)" in result.stdout


def test_model_and_config_commands_run_in_a_fresh_process(tmp_path):
    result = artaug("models", "build-tiny", str(tmp_path / "flux"))
    assert result.returncode == 0 and (tmp_path / "flux" / "model_index.json").exists(), result.stderr[-3000:]
    result = artaug("models", "build-tiny-vlm", str(tmp_path / "vlm"))
    assert result.returncode == 0 and (tmp_path / "vlm" / "config.json").exists(), result.stderr[-3000:]
    torch.save({"w": torch.ones(2)}, tmp_path / "head.pth")
    result = artaug("models", "convert", str(tmp_path / "head.pth"), str(tmp_path / "head.safetensors"))
    assert result.returncode == 0 and "1 tensors written" in result.stdout, result.stderr[-3000:]
    refused(
        artaug("models", "convert", str(tmp_path / "head.pth"), str(tmp_path / "head.bin")), ".safetensors"
    )
    result = artaug("config", "show", "--preset", "flux-dev", "--set", "generate.steps=9")
    assert result.returncode == 0 and "steps: 9" in result.stdout
    result = artaug("config", "fields")
    assert result.returncode == 0 and "serve.port" in result.stdout
