"""The GPU memory plan of FLUX.1-dev (README "GPU memory plan"), from its real shapes, on a CPU.

    python benchmarks/flux_memory_plan.py benchmarks/results/flux-memory-plan.json

Parameter counts are read from modules built at the published configurations on PyTorch's meta
device (no memory): FLUX.1-dev's 19 + 38 block transformer, T5-XXL's 24 layers, CLIP-L, the VAE
(artaug/models/flux_shapes.py), the scorers and the critic. Activation memory is measured on this
CPU with the depth-cut model of `model.source: flux-dev-shapes` (1 double + 1 single block, widths
real) in bfloat16: the peak resident memory above the weights (VmHWM, reset through
/proc/self/clear_refs, with glibc's mmap threshold fixed so freed tensors leave the process) of an
inference forward and of a LoRA training forward + backward with and without gradient checkpointing,
at 256, 1024 and 4096 image tokens with 512 text tokens. Figures for the 57-block model are scaled
from these and marked "estimated"; what was read or measured here is marked "measured here".
A CPU's kernels are not a GPU's (SDPA, the allocator's rounding, cuDNN workspaces):
benchmarks/flux_gpu_memory.py checks the plan on a CUDA machine.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import time

if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # before any allocation: freed tensors leave the RSS
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})

import torch  # noqa: E402

from artaug.config import load_config  # noqa: E402
from artaug.models.flux_shapes import FLUX_DEV_TRANSFORMER, flux_dev_modules  # noqa: E402

GIB = 2**30
BF16 = 2
TEXT_TOKENS = 512
IMAGE_TOKENS = (256, 1024, 4096)  # 256, 512 and 1024 pixels square
FULL_BLOCKS = FLUX_DEV_TRANSFORMER["num_layers"] + FLUX_DEV_TRANSFORMER["num_single_layers"]
WIDTH = FLUX_DEV_TRANSFORMER["num_attention_heads"] * FLUX_DEV_TRANSFORMER["attention_head_dim"]
MEASURED, ESTIMATED = "measured here", "estimated"


def figure(gib: float, mark: str, how: str) -> dict:
    return {"gib": round(gib, 2), "mark": mark, "how": how}


# ------------------------------------------------------------------ parameter counts (meta device)


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_params(transformer: torch.nn.Module, targets: list[str], rank: int) -> int:
    """LoRA parameters peft adds for these targets (a Linear whose name is or ends with .target)."""
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    )


def scorer_modules() -> dict:
    """The flux-dev preset's scorers at their published configurations."""
    from transformers import CLIPConfig, CLIPModel, SiglipVisionConfig, SiglipVisionModel

    def clip(text: tuple, vision: tuple, projection: int) -> CLIPModel:
        (th, ti, tl, tn), (vh, vi, vl, vn) = text, vision
        return CLIPModel(CLIPConfig(
            text_config=dict(hidden_size=th, intermediate_size=ti, num_hidden_layers=tl,
                             num_attention_heads=tn),
            vision_config=dict(hidden_size=vh, intermediate_size=vi, num_hidden_layers=vl,
                               num_attention_heads=vn, image_size=224, patch_size=14),
            projection_dim=projection))  # fmt: skip

    return {
        "clip-vit-large-patch14 (clip_score, LAION aesthetic, safety)": clip(
            (768, 3072, 12, 12), (1024, 4096, 24, 16), 768
        ),
        "siglip-so400m-patch14-384 (vision)": SiglipVisionModel(
            SiglipVisionConfig(
                hidden_size=1152,
                intermediate_size=4304,
                num_hidden_layers=27,
                num_attention_heads=16,
                image_size=384,
                patch_size=14,
            )
        ),  # fmt: skip
        "PickScore_v1 (CLIP-H/14)": clip((1024, 4096, 24, 16), (1280, 5120, 32, 16), 1024),
    }


def critic_params() -> int | None:
    """Qwen2.5-VL-72B-Instruct's parameters from its published configuration (None if not buildable)."""
    try:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        text = dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                    num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False)  # fmt: skip
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3456, num_heads=16, out_hidden_size=8192)
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **text)
        return numel(Qwen2_5_VLForConditionalGeneration(config))
    except Exception as err:  # noqa: BLE001 - reported, not fatal
        print(f"critic not counted: {err!r}"[:300], flush=True)
        return None


def counts(targets: list[str], rank: int) -> dict:
    with torch.device("meta"):
        flux = flux_dev_modules(full=True)
        scorers = {name: numel(m) for name, m in scorer_modules().items()}
        critic = critic_params()
        return {
            "flux": {name: numel(m) for name, m in flux.items()},
            "lora": lora_params(flux["transformer"], targets, rank),
            "scorers": scorers,
            "critic": critic,
        }


# ------------------------------------------------------------------ activation peaks (this CPU)


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_above_now(fn) -> float:
    """GiB of resident memory `fn` added at its peak (VmHWM reset to the current RSS first)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _kib("VmRSS")
    fn()
    gc.collect()
    return (_kib("VmHWM") - before) / 2**20


def transformer_inputs(image_tokens: int) -> dict:
    from diffusers import FluxPipeline

    side = int(image_tokens**0.5)
    return dict(
        hidden_states=torch.randn(1, image_tokens, 64, dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(1, TEXT_TOKENS, 4096, dtype=torch.bfloat16),
        pooled_projections=torch.randn(1, 768, dtype=torch.bfloat16),
        timestep=torch.full((1,), 0.5, dtype=torch.bfloat16),
        guidance=torch.full((1,), 3.5),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, side, side, "cpu", torch.bfloat16),
        txt_ids=torch.zeros(TEXT_TOKENS, 3, dtype=torch.bfloat16),
        return_dict=False,
    )


def measure_transformer(transformer, targets: list[str], rank: int) -> dict:
    from peft import LoraConfig

    results = {}

    def infer(n):
        with torch.inference_mode():
            transformer(**transformer_inputs(n))

    def train(n):
        loss = transformer(**transformer_inputs(n))[0].float().pow(2).mean()
        loss.backward()
        transformer.zero_grad(set_to_none=True)

    for n in IMAGE_TOKENS:
        start = time.perf_counter()
        results.setdefault("inference", {})[n] = peak_above_now(lambda n=n: infer(n))
        print(f"inference {n} image tokens: {results['inference'][n]:.3f} GiB", flush=True)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    transformer.train()
    for mode in ("training", "training_checkpointed"):
        if mode == "training_checkpointed":
            transformer.enable_gradient_checkpointing()
        for n in IMAGE_TOKENS:
            start = time.perf_counter()
            results.setdefault(mode, {})[n] = peak_above_now(lambda n=n: train(n))
            seconds = time.perf_counter() - start
            print(f"{mode} {n} image tokens: {results[mode][n]:.3f} GiB ({seconds:.0f} s)", flush=True)
    return results


def measure_others(pipe) -> dict:
    vae, t5 = pipe.vae, pipe.text_encoder_2
    out = {}
    with torch.inference_mode():
        ids = torch.randint(0, 90, (1, TEXT_TOKENS))
        out["t5_512_tokens"] = peak_above_now(lambda: t5(ids))
        for side in (512, 1024):
            latent = torch.randn(1, 16, side // 8, side // 8, dtype=torch.bfloat16)
            out[f"vae_decode_{side}px"] = peak_above_now(lambda latent=latent: vae.decode(latent))
            print(f"vae decode {side} px: {out[f'vae_decode_{side}px']:.3f} GiB", flush=True)
    return out


# ------------------------------------------------------------------ the plan


def plan(c: dict, measured: dict, tensor_parallel: int) -> dict:
    """Per actor kind, bf16 unless said: each figure with its mark and how it was obtained."""
    n = IMAGE_TOKENS[-1]
    tokens = n + TEXT_TOKENS
    tr = measured["transformer"]
    weights = {name: count * BF16 / GIB for name, count in c["flux"].items()}
    pipeline = sum(weights.values())
    counted = "parameters read from the module built on the meta device, x 2 bytes"
    act_infer = tr["inference"][n]
    vae = measured["others"]["vae_decode_1024px"]
    gen = {
        "weights": figure(pipeline, MEASURED, counted + " (transformer, T5-XXL, CLIP-L, VAE)"),
        "transformer_activations_1024px": figure(act_infer, ESTIMATED, "measured here on the 1+1-block model"
                                                 f" at {n}+{TEXT_TOKENS} tokens; an inference peak is one"
                                                 " block's working set, so depth is assumed not to add"),
        "vae_decode_1024px": figure(vae, MEASURED, "the depth-cut VAE (1 resnet per level, widths real)"),
    }  # fmt: skip
    gen["total"] = figure(pipeline + max(act_infer, vae), ESTIMATED, "weights + the larger activation peak")
    lora = c["lora"]
    block_inputs = (FULL_BLOCKS - 2) * tokens * WIDTH * BF16 / GIB
    train = {
        "transformer_weights": figure(weights["transformer"], MEASURED, counted),
        "lora_state": figure(lora * 20 / GIB, ESTIMATED, f"{lora / 1e6:.1f} M LoRA parameters (counted) x"
                             " 20 bytes: bf16 weight and gradient, fp32 master, gradient, 2 Adam moments"),
        "activations_checkpointed_1024px": figure(
            tr["training_checkpointed"][n] + block_inputs, ESTIMATED,
            f"measured here on 1+1 blocks at {n}+{TEXT_TOKENS} tokens"
            f" ({tr['training_checkpointed'][n]:.2f} GiB)"
            f" + the inputs kept for the other {FULL_BLOCKS - 2} blocks ({block_inputs:.2f} GiB, computed)"),
        "activations_not_checkpointed_1024px": figure(
            tr["training"][n] * FULL_BLOCKS / 2, ESTIMATED,
            f"measured here on 1+1 blocks ({tr['training'][n]:.2f} GiB) x {FULL_BLOCKS}/2 blocks"),
    }  # fmt: skip
    parts = ("transformer_weights", "lora_state", "activations_checkpointed_1024px")
    train["total_checkpointed"] = figure(
        sum(train[k]["gib"] for k in parts),
        ESTIMATED,
        "weights + LoRA state + checkpointed activations (the latent cache: no VAE, no T5)",
    )
    scorers = sum(c["scorers"].values())
    scorer = {"weights": figure(scorers * 4 / GIB, ESTIMATED, f"{scorers / 1e9:.2f} B parameters (counted)"
                                " x 4 bytes: loaded without a dtype, as stored (assumed fp32)")}  # fmt: skip
    critic = {}
    if c["critic"]:
        critic["weights_per_gpu"] = figure(c["critic"] * BF16 / GIB / tensor_parallel, MEASURED,
                                           f"{c['critic'] / 1e9:.1f} B parameters (counted) x 2 bytes"
                                           f" / {tensor_parallel} tensor-parallel ranks")  # fmt: skip
    return {"generation actor": gen, "training worker": train, "scorer": scorer, "critic": critic}


def main(path: str) -> None:
    from artaug.models.synthesis import load_pipeline

    cfg = load_config("flux-dev")
    targets, rank = list(cfg.train.target_modules), cfg.train.rank
    started = time.perf_counter()
    torch.set_num_threads(int(os.environ.get("PLAN_THREADS", "2")))
    c = counts(targets, rank)
    print(json.dumps(c, indent=1), flush=True)
    shapes = load_config("flux-dev-shapes").model
    pipe = load_pipeline(shapes)
    measured = {"others": measure_others(pipe)}
    transformer = pipe.transformer
    del pipe  # the transformer alone from here
    gc.collect()
    measured["transformer"] = measure_transformer(transformer, targets, rank)
    inf = measured["transformer"]["inference"]
    slope = (inf[1024] - inf[256]) / 768
    measured["inference_gib_per_token"] = slope
    measured["inference_4096_from_slope"] = inf[1024] + slope * 3072  # vs the measured value: linear?
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "dtype": "bfloat16"},
        "image_tokens": IMAGE_TOKENS, "text_tokens": TEXT_TOKENS, "counts": c, "measured_gib": measured,
        "plan": plan(c, measured, cfg.critique.tensor_parallel_size),
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    for kind, figures in result["plan"].items():
        for name, f in figures.items():
            print(f"{kind:18s} {name:38s} {f['gib']:8.2f} GiB  {f['mark']:14s} {f['how']}")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "flux-memory-plan.json")
