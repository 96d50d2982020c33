"""What `artaug serve` is pointed at, checked with nothing heavier than the storage layer: a wrong
RUN_DIR or --lora is refused in about a second, before Ray, torch or diffusers import
(`artaug.serve.launch.resolve_config` then resolves the model from them and checks each LoRA's values).
"""

from __future__ import annotations

from artaug import storage
from artaug.errors import ArtaugError
from artaug.layout import RunLayout


class ServeSetupError(ArtaugError, ValueError):
    """`artaug serve` was pointed at something it will not load (no run.yaml, a non-safetensors LoRA)."""


def check_sources(run_dir: str | None, lora: str | None, config_path: str | None) -> RunLayout | None:
    """Refuse RUN_DIR with --config or --lora, a RUN_DIR without run.yaml, a missing or pickled --lora;
    returns RUN_DIR's layout (None without one)."""
    if run_dir and config_path:
        raise ServeSetupError("give either RUN_DIR (its run.yaml is the config) or --config, not both")
    if run_dir and lora:
        raise ServeSetupError("give either RUN_DIR (its combined LoRA is served) or --lora, not both")
    layout = RunLayout(run_dir) if run_dir else None
    if layout is not None and not storage.exists(layout.run_yaml):
        raise ServeSetupError(f"{run_dir} is not a run directory: {layout.run_yaml} does not exist")
    if lora:
        if not storage.exists(lora):
            raise ServeSetupError(f"--lora: file {lora!r} does not exist")
        check_safetensors(lora)
    return layout


def check_safetensors(path: str) -> None:
    """Only safetensors are loaded: other LoRA formats are pickles, which can run code when loaded."""
    if not path.endswith(".safetensors"):
        raise ServeSetupError(f"LoRA {path!r} is not a .safetensors file; only safetensors are loaded")
