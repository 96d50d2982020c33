"""Latent cache: pairs -> VAE latents of both images and text embeddings of the original prompt.

Training workers then hold only the transformer: the VAE and both text encoders run once per pair,
here, on the run's warm synthesis hosts (the pipeline they already hold for generate and enhance: no
model is loaded for the cache). Each call encodes a batch's distinct prompts once (CLIP pooled + T5
hidden states) and both images of every usable pair. Pairs that cannot be trained on stay as rows
with `skipped` set and are counted in the summary:

- excluded by earlier stages: error rows, `unchanged` rows, and rows with `accepted` false when the
  filter stage's column exists;
- bad input: a missing or unreadable image, or images whose sizes differ from each other or from the
  row's width and height (or are not multiples of 16).

Each shard is sorted by (prompt_id, seed, round) and `read_cache` orders all rows by them, so the
training order depends only on ids, never on how Ray split the work.

    cache_latents(cfg, "run/round-1/filter", "run/round-1/train/latents", encode)
    # encode: maps a work class over rows on the synthesis hosts (the train stage passes one over
    # `artaug.stages.hosts.map_on_hosts`)
"""

from __future__ import annotations

import io
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from itertools import groupby

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from PIL import Image

from artaug import storage
from artaug.cluster import init_ray
from artaug.config import RunConfig
from artaug.models.synthesis import ModelCache, check_source, host_pipeline
from artaug.rows import LATENT
from artaug.train.pairs import eligible_pairs, exclusion, read_pairs

log = logging.getLogger(__name__)

ID_COLUMNS = ["prompt_id", "seed", "round"]


# (the Ray dataset in, the work class, its keyword arguments, rows per call) -> the mapped dataset
Encode = Callable[[ray.data.Dataset, type, dict, int], ray.data.Dataset]


class LatentEncoder:
    """Work class for a synthesis host: its VAE + text encoders turn pair rows into latent-cache rows.
    The text encoders are those of the model the round trains from (`cfg.model`, LoRAs set in place)."""

    def __init__(self, cfg: RunConfig, host: ModelCache | None = None):
        self.cfg = cfg
        self.pipe = host_pipeline(host, cfg.model)
        self.device = self.pipe.vae.device
        self.dtype = self.pipe.vae.dtype

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self._settle(row) for row in batch.to_pylist()]
        ready = [row for row in rows if not row["skipped"]]
        if ready:
            self._encode_prompts(ready)
            for _, group in groupby(sorted(ready, key=_size), key=_size):
                self._encode_images(list(group))
        table = pa.Table.from_pylist(
            [{name: row.get(name) for name in LATENT.names} for row in rows], schema=LATENT
        )
        return table.sort_by([(c, "ascending") for c in ID_COLUMNS])

    def _settle(self, row: dict) -> dict:
        out = {name: row.get(name) for name in ("prompt_id", "seed", "round", "prompt", "width", "height")}
        out["skipped"] = exclusion(row)
        if out["skipped"] is None:
            out["skipped"], out["images"] = _decode_pair(row)
            if out["skipped"]:
                log.warning("pair %s skipped: %s", row["prompt_id"], out["skipped"])
        return out

    @torch.inference_mode()
    def _encode_prompts(self, rows: list[dict]) -> None:
        prompts = sorted({row["prompt"] for row in rows})
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=self.cfg.model.max_sequence_length
        )
        index = {prompt: i for i, prompt in enumerate(prompts)}
        for row in rows:
            i = index[row["prompt"]]
            row["text_shape"] = list(embeds.shape[1:])
            row["prompt_embeds"] = to_bytes(embeds[i])
            row["pooled_embeds"] = to_bytes(pooled[i])

    @torch.inference_mode()
    def _encode_images(self, rows: list[dict]) -> None:
        pixels = torch.stack([image for row in rows for image in row["images"]])
        vae = self.pipe.vae
        posterior = vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        # The posterior mean, scaled as FLUX expects: deterministic, so the cache is a function of the pairs.
        latents = (posterior.mode() - vae.config.shift_factor) * vae.config.scaling_factor
        for i, row in enumerate(rows):
            row["dtype"] = str(latents.dtype).removeprefix("torch.")
            row["latent_shape"] = list(latents.shape[1:])
            row["before_latent"] = to_bytes(latents[2 * i])
            row["after_latent"] = to_bytes(latents[2 * i + 1])


def _size(row: dict) -> tuple[int, int]:
    return row["width"], row["height"]


def _decode_pair(row: dict) -> tuple[str | None, list[torch.Tensor] | None]:
    """(reason to skip, None) or (None, [before, after] as (3, H, W) tensors in [-1, 1])."""
    images = []
    for side in ("before", "after"):
        data = row.get(side)
        if not data:
            return f"missing {side} image", None
        try:
            images.append(Image.open(io.BytesIO(data)).convert("RGB"))
        except Exception as err:  # noqa: BLE001 - any decoder failure is a bad image
            return f"unreadable {side} image ({type(err).__name__})", None
    sizes = {side: image.size for side, image in zip(("before", "after"), images, strict=True)}
    expected = (row.get("width"), row.get("height"))
    if len(set(sizes.values())) > 1 or sizes["before"] != expected:
        shown = ", ".join(f"{side} {w}x{h}" for side, (w, h) in sizes.items())
        return f"size mismatch ({shown}, row {expected[0]}x{expected[1]})", None
    if expected[0] % 16 or expected[1] % 16:
        return f"size {expected[0]}x{expected[1]} is not a multiple of 16", None
    tensors = [torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1 for image in images]
    return None, tensors


def to_bytes(tensor: torch.Tensor) -> bytes:
    """Raw bytes of a tensor in its own dtype (bf16 included), read back by `from_bytes`."""
    return tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()


def from_bytes(data: bytes, dtype: str, shape: list[int]) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return raw.view(getattr(torch, dtype)).reshape(shape)


def skip_reason_kind(reason: str) -> str:
    """The counting key of a skip reason: its words before any detail in parentheses."""
    return reason.split(" (")[0]


def cache_latents(cfg: RunConfig, pairs_dir: str, cache_dir: str, encode: Encode,
                  arriving: Iterable[list[str]] | None = None) -> dict:  # fmt: skip
    """Encode the pairs in `pairs_dir` into `cache_dir` (Parquet + `_SUCCESS`) with `encode`, which
    maps `LatentEncoder` over the rows on the synthesis hosts; returns the summary. `arriving`: the
    files of `pairs_dir` in batches as a stage still writing it finishes them (the loop's overlap
    with the filter, `artaug.stages.parts.follow`); None: the folder as it is.

    Raises PairsError, before any host is asked for, when no row of a finished pair set is eligible
    for training.
    """
    check_source(cfg.model)
    if arriving is None:
        eligible_pairs(pairs_dir)
    storage.remove_tree(cache_dir)
    init_ray(cfg.ray, output=cache_dir)
    start = time.perf_counter()
    fs, path = storage.resolve(pairs_dir)
    out_fs, out_path = storage.resolve(cache_dir)
    for files in [None] if arriving is None else arriving:
        source = path if files is None else [storage.resolve(f)[1] for f in files]
        rows = pq.ParquetDataset(source, filesystem=fs).read(["prompt_id"]).num_rows
        blocks = max(1, min(rows, 4 * cfg.generate.num_actors))  # a few per synthesis host
        pairs = ray.data.read_parquet(
            source, filesystem=fs, override_num_blocks=blocks, file_extensions=["parquet"]
        )
        # No global sort (a shuffle costs more than the encoding at small scale): each shard is sorted
        # by ids and readers order all rows by ids.
        encode(pairs, LatentEncoder, {"cfg": cfg}, cfg.train.encode_batch_size).write_parquet(
            out_path, filesystem=out_fs
        )
    total = read_pairs(pairs_dir, columns=["prompt_id"]).num_rows
    written = pq.read_table(out_path, filesystem=out_fs, columns=["skipped", "round"])
    skipped = Counter(skip_reason_kind(r) for r in written.column("skipped").to_pylist() if r)
    summary = {
        "stage": "cache_latents",
        "pairs": total,
        "usable": total - sum(skipped.values()),
        "skipped": dict(sorted(skipped.items())),
        "rounds": sorted(set(written.column("round").to_pylist())),
        "seconds": round(time.perf_counter() - start, 3),
        "pairs_source": pairs_dir,
        "encoded_while_written": arriving is not None,
    }
    storage.mark_complete(cache_dir, summary)
    return summary


def read_cache(cache_dir: str) -> pa.Table:
    """The usable rows of a latent cache, sorted by ids."""
    fs, path = storage.resolve(cache_dir)
    table = pq.read_table(path, filesystem=fs, schema=LATENT)
    table = table.filter(pa.compute.is_null(table.column("skipped")))
    return table.sort_by([(c, "ascending") for c in ID_COLUMNS])
