"""The method check: does a LoRA trained on (before, after) pairs move the model's own images toward the
enhancement, on prompts and seeds it never saw, and how much else does it change?

    python benchmarks/method_check.py                      # defaults below, ~6 min on 2 busy cores
    python benchmarks/method_check.py --seeds 0 --steps 60 # a quick look

Set-up (all tiny, all on CPU, nothing downloaded):
- Base model: the tiny FLUX with the colour-preserving patch autoencoder (models/patch_vae.py), its
  transformer pretrained on drawn shapes ("a red circle on blue"), built once and cached. Measured in
  pixels: through this autoencoder a per-channel gain on the pixels is a per-channel gain on the
  latents, so a shift learnt in latent space shows in pixels (a random AutoencoderKL shows ~0).
- Pairs: the base model's own samples for 16 training prompts x 2 seeds are the before images; the
  after image is a known photometric enhancement of each (brighter and warmer: artaug.photometric,
  exposure and colour temperature +0.16), encoded with the same autoencoder.
- Modes: differential (LoRA-1 on before, fused; LoRA-2 on after from the merged model, kept), direct
  (LoRA on after only), pairwise-average (differential on K disjoint subsets, LoRA-2 deltas averaged
  with artaug.lora.algebra.combine). Trained in this process with the training loop's objective
  (artaug.models.flow_matching) and peft, not through Ray Train + DeepSpeed: many short runs, and the
  method, not the distribution, is what is measured here. LoRA-1 is fused with the production
  fuse_into_transformer from its saved file.
- Held-out: 8 other prompts x 4 other seeds, sampled by the base model and by base + LoRA-2 with the
  same noise. Transfer = shift of the statistic (mean brightness; warmth = mean R - mean B) as a
  fraction of the shift the enhancement itself applies to the base images (1 = the full enhancement).
  Content change = RMS pixel error (0..255) between base + LoRA and base images after removing each
  image's global colour shift (a per-channel gain and offset fitted by least squares).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from artaug.config import ModelConfig  # noqa: E402
from artaug.lora.algebra import combine  # noqa: E402
from artaug.lora.files import save_lora  # noqa: E402
from artaug.lora.fuse import fuse_into_transformer  # noqa: E402
from artaug.models.flow_matching import flow_matching_loss  # noqa: E402
from artaug.models.synthesis import load_pipeline  # noqa: E402
from artaug.models.tiny import cached_tiny_flux  # noqa: E402
from artaug.models.tiny_pretrain import all_captions, caption, encode_captions, encode_images  # noqa: E402
from artaug.photometric import apply_adjustments  # noqa: E402
from artaug.train.data import mix_seed  # noqa: E402

ENHANCEMENT = [
    {"aspect": "exposure", "direction": "increase", "strength": 2},
    {"aspect": "color_temperature", "direction": "increase", "strength": 2},
]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/artaug"), help="tiny model cache folder")
    p.add_argument("--pretrain-steps", type=int, default=600, help="base transformer pretraining steps")
    p.add_argument("--train-prompts", type=int, default=16)
    p.add_argument("--heldout-prompts", type=int, default=8)
    p.add_argument("--train-seeds", type=int, default=2, help="samples per training prompt")
    p.add_argument("--heldout-seeds", type=int, default=4, help="samples per held-out prompt")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per phase (LoRA-1, LoRA-2)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--subsets", type=int, default=2, help="K of pairwise-average")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--sample-steps", type=int, default=8)
    p.add_argument("--guidance", type=float, default=3.5, help="for sampling and training")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the results as JSON here")
    return p.parse_args()


@torch.no_grad()
def sample(pipe, transformer, text, prompts, seeds, args) -> np.ndarray:
    """uint8 images (N, 64, 64, 3) of `transformer` in `pipe`, one per (prompt, seed)."""
    pipe.transformer = transformer
    images = []
    for prompt, seed in zip(prompts, seeds, strict=True):
        embeds, pooled = text[prompt]
        out = pipe(
            prompt_embeds=embeds[None],
            pooled_prompt_embeds=pooled[None],
            width=64,
            height=64,
            num_inference_steps=args.sample_steps,
            guidance_scale=args.guidance,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images[0]
        images.append(np.round(out * 255).astype(np.uint8))
    return np.stack(images)


def enhance(images: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(apply_adjustments(Image.fromarray(im), ENHANCEMENT)[0]) for im in images])


def train_phase(transformer, latents, embeds, pooled, rows, steps, seed, phase, args, name):
    """One LoRA phase on `rows` of the pairs: AdamW, the training loop's flow-matching objective."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS)
    torch.manual_seed(mix_seed(seed, phase, 0xADA))
    transformer.add_adapter(config, adapter_name=name)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    order = np.random.default_rng(mix_seed(seed, phase))
    generator = torch.Generator().manual_seed(mix_seed(seed, phase, 1))
    for _ in range(steps):
        pick = torch.as_tensor(order.choice(rows, size=min(args.batch, len(rows)), replace=False))
        loss = flow_matching_loss(
            transformer, latents[pick], embeds[pick], pooled[pick], generator, args.guidance
        )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    weights = get_peft_model_state_dict(transformer, adapter_name=name)
    transformer.unload_lora()  # drop the layers unmerged: phases fuse from the saved file
    return weights, config


def train_differential(base, data, rows, seed, args, folder, tag) -> str:
    transformer = copy.deepcopy(base)
    lora1, config = train_phase(
        transformer, data["before"], *data["text"], rows, args.steps, seed, 0, args, "p1"
    )
    path1 = os.path.join(folder, f"{tag}-lora1.safetensors")
    save_lora(path1, lora1, config, {"lora": "LoRA-1"})
    fuse_into_transformer(transformer, path1, name="phase1")
    lora2, config = train_phase(
        transformer, data["after"], *data["text"], rows, args.steps, seed, 1, args, "p2"
    )
    path2 = os.path.join(folder, f"{tag}-lora2.safetensors")
    save_lora(path2, lora2, config, {"lora": "LoRA-2"})
    return path2


def train_mode(mode, base, data, seed, args, folder) -> str:
    rows = list(range(len(data["before"])))
    if mode == "differential":
        return train_differential(base, data, rows, seed, args, folder, f"diff-{seed}")
    if mode == "direct":
        transformer = copy.deepcopy(base)
        lora, config = train_phase(
            transformer, data["after"], *data["text"], rows, args.steps, seed, 1, args, "p"
        )
        path = os.path.join(folder, f"direct-{seed}.safetensors")
        save_lora(path, lora, config, {"lora": "direct"})
        return path
    k = args.subsets
    parts = [
        train_differential(base, data, rows[i::k], seed, args, folder, f"avg{i}-{seed}") for i in range(k)
    ]
    path = os.path.join(folder, f"average-{seed}.safetensors")
    combine(parts, path, scales=[1 / k] * k)
    return path


def stats(images: np.ndarray) -> dict[str, np.ndarray]:
    x = images.astype(np.float64)
    return {"brightness": x.mean(axis=(1, 2, 3)), "warmth": x[..., 0].mean((1, 2)) - x[..., 2].mean((1, 2))}


def content_error(images: np.ndarray, reference: np.ndarray) -> float:
    """Mean over images of the RMS error to `reference` after a per-channel gain + offset fit."""
    errors = []
    for im, ref in zip(images.astype(np.float64), reference.astype(np.float64), strict=True):
        residual = []
        for c in range(3):
            a = np.stack([im[..., c].ravel(), np.ones(im[..., c].size)], axis=1)
            coef, *_ = np.linalg.lstsq(a, ref[..., c].ravel(), rcond=None)
            residual.append(ref[..., c].ravel() - a @ coef)
        errors.append(np.sqrt(np.mean(np.square(residual))))
    return float(np.mean(errors))


def measure(images, base_images, target_images) -> dict:
    got, base, target = stats(images), stats(base_images), stats(target_images)
    out = {f"{k}_transfer": float((got[k] - base[k]).mean() / (target[k] - base[k]).mean()) for k in got}
    out["content_error"] = content_error(images, base_images)
    return out


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):+.3f} ± {sd:.3f}"


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    folder = cached_tiny_flux(args.cache, seed=0, vae="patch", pretrain_steps=args.pretrain_steps)
    build_seconds = time.perf_counter() - started
    pipe = load_pipeline(ModelConfig(source=folder, device="cpu"))
    base = pipe.transformer
    combos = all_captions()
    order = np.random.default_rng(7).permutation(len(combos))
    prompts = [caption(*combos[i]) for i in order[: args.train_prompts + args.heldout_prompts]]
    train_prompts, heldout = prompts[: args.train_prompts], prompts[args.train_prompts :]
    text = encode_captions(pipe, prompts)

    pair_prompts = [p for p in train_prompts for _ in range(args.train_seeds)]
    pair_seeds = [s for _ in train_prompts for s in range(args.train_seeds)]
    before = sample(pipe, base, text, pair_prompts, pair_seeds, args)
    after = enhance(before)
    data = {
        "before": encode_images(pipe, before),
        "after": encode_images(pipe, after),
        "text": (
            torch.stack([text[p][0] for p in pair_prompts]),
            torch.stack([text[p][1] for p in pair_prompts]),
        ),
    }
    eval_prompts = [p for p in heldout for _ in range(args.heldout_seeds)]
    eval_seeds = [1000 + s for _ in heldout for s in range(args.heldout_seeds)]
    base_images = sample(pipe, base, text, eval_prompts, eval_seeds, args)
    target_images = enhance(base_images)
    other_seed = sample(pipe, base, text, eval_prompts, [s + 500 for s in eval_seeds], args)
    reference = {
        "enhancement itself": measure(target_images, base_images, target_images),
        "base, other seeds": measure(other_seed, base_images, target_images),
    }

    results: dict[str, list[dict]] = {m: [] for m in ("differential", "direct", "pairwise-average")}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for mode in results:
                t0 = time.perf_counter()
                path = train_mode(mode, base, data, seed, args, tmp)
                seconds = time.perf_counter() - t0
                transformer = copy.deepcopy(base)
                fuse_into_transformer(transformer, path)
                row = measure(
                    sample(pipe, transformer, text, eval_prompts, eval_seeds, args),
                    base_images,
                    target_images,
                )
                results[mode].append({**row, "seed": seed, "train_seconds": round(seconds, 1)})
                print(
                    f"seed {seed} {mode:17s} " + " ".join(f"{k} {v:+.3f}" for k, v in row.items()), flush=True
                )

    columns = ("brightness transfer", "warmth transfer", "content error", "train s")
    lines = [f"{'':22s} {columns[0]:>20s} {columns[1]:>18s} {columns[2]:>16s} {columns[3]:>8s}"]
    for name, row in reference.items():
        lines.append(f"{name:22s} {row['brightness_transfer']:>+20.3f} {row['warmth_transfer']:>+18.3f}"
                     f" {row['content_error']:>16.2f} {'':>8s}")  # fmt: skip
    for mode, rows in results.items():
        cells = [
            mean_sd([r[k] for r in rows]) for k in ("brightness_transfer", "warmth_transfer", "content_error")
        ]
        seconds = statistics.mean(r["train_seconds"] for r in rows)
        lines.append(f"{mode:22s} {cells[0]:>20s} {cells[1]:>18s} {cells[2]:>16s} {seconds:>8.0f}")
    table = "\n".join(lines)
    load = os.getloadavg()
    print(f"\n{table}\n\n{len(args.seeds)} training seeds {args.seeds}; {len(before)} pairs; "
          f"{len(eval_prompts)} held-out images; {args.steps} steps/phase, rank {args.rank}, lr {args.lr}; "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores; "
          f"base build {build_seconds:.0f} s; total {time.perf_counter() - started:.0f} s")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            record = {"args": vars(args), "reference": reference, "results": results, "table": table,
                      "platform": platform.platform(), "load": load}  # fmt: skip
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
