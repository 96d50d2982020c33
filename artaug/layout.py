"""Where everything lives on disk: a run directory of `artaug run`, and a training output folder.

The one owner of these names; the loop, the report, `artaug serve`, the CLI and the tests ask it.

RUN_DIR/
  run.yaml, manifest.json        resolved config; status, counts, seconds and metrics per stage
  .artaug-lock (+ .artaug-lock.owner)   the one writer's lock (artaug.runlock)
  round-K/{generate,critique,enhance,filter}/   Parquet + _SUCCESS
  round-K/train/                 a training output folder (below): round K's LoRA
  round-K/register/_SUCCESS      the LoRAs the next round fuses, checked
  lora/combined.safetensors      the rounds' LoRAs as one adapter (+ lora/_SUCCESS)
  evaluate/, report/index.html, logs/run.log (local run directories)

TRAIN_OUT/  (`artaug train --out`, or round-K/train)
  latents/      the latent cache (Parquet + _SUCCESS)
  checkpoints/  Ray Train's storage
  lora/         pytorch_lora_weights.safetensors, metrics.jsonl, _SUCCESS
  subsets/k/    pairwise-average: one training output folder per subset
  pairs/        per-pair: each finished pair's LoRA-2 (<prompt_id>-s<seed>-r<round>.safetensors)
"""

from __future__ import annotations

from dataclasses import dataclass

from artaug import storage

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default name: load_lora_weights(folder)
METRICS_NAME = "metrics.jsonl"
ROUND_STAGES = ("generate", "critique", "enhance", "filter", "train", "register")
FINAL_STAGES = ("combine", "evaluate", "report")


@dataclass(frozen=True)
class TrainOutput:
    """The folders and files of one training output (`artaug train --out OUT`)."""

    root: str

    @property
    def latents(self) -> str:
        return storage.join(self.root, "latents")

    @property
    def checkpoints(self) -> str:
        return storage.join(self.root, "checkpoints")

    @property
    def lora_dir(self) -> str:
        return storage.join(self.root, "lora")

    @property
    def lora(self) -> str:
        return storage.join(self.lora_dir, WEIGHT_NAME)

    @property
    def metrics(self) -> str:
        return storage.join(self.lora_dir, METRICS_NAME)

    @property
    def pairs(self) -> str:
        return storage.join(self.root, "pairs")

    def subset(self, k: int) -> TrainOutput:
        return TrainOutput(storage.join(self.root, "subsets", str(k)))


@dataclass(frozen=True)
class RoundLayout:
    """Where round k's stages write."""

    root: str

    def stage(self, name: str) -> str:
        if name not in ROUND_STAGES:
            raise ValueError(f"{name!r} is not a round stage ({', '.join(ROUND_STAGES)})")
        return storage.join(self.root, name)

    @property
    def train(self) -> TrainOutput:
        return TrainOutput(self.stage("train"))


@dataclass(frozen=True)
class RunLayout:
    """The run directory `root` (a local path or an s3:// / gs:// URI)."""

    root: str

    @property
    def run_yaml(self) -> str:
        return storage.join(self.root, "run.yaml")

    @property
    def manifest(self) -> str:
        return storage.join(self.root, "manifest.json")

    @property
    def lock(self) -> str:
        """The one-writer lock (`artaug.runlock`): a lock file, a lease file or a lease object."""
        return storage.join(self.root, ".artaug-lock")

    def round(self, k: int) -> RoundLayout:
        return RoundLayout(storage.join(self.root, f"round-{k}"))

    @property
    def combine(self) -> str:
        return storage.join(self.root, "lora")

    @property
    def combined_lora(self) -> str:
        return storage.join(self.combine, "combined.safetensors")

    @property
    def evaluate(self) -> str:
        return storage.join(self.root, "evaluate")

    @property
    def report(self) -> str:
        return storage.join(self.root, "report")

    @property
    def report_page(self) -> str:
        return storage.join(self.report, "index.html")

    @property
    def log_file(self) -> str:
        return storage.join(self.root, "logs", "run.log")

    def final(self, name: str) -> str:
        """The folder of a final stage (combine, evaluate, report)."""
        return {"combine": self.combine, "evaluate": self.evaluate, "report": self.report}[name]
