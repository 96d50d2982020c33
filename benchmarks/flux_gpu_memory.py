"""FLUX.1-dev at full size with random bf16 weights on one GPU: every figure of the memory plan and
the sampler's speed in one run of at most 8 minutes (GPU time is scarce), no download.

    python benchmarks/flux_gpu_memory.py out.json            # CUDA; torch, transformers, peft, diffusers
    python benchmarks/flux_gpu_memory.py out.json --cpu-check  # the same code, depth cut, 256 px, CPU

1. Build: FLUX.1-dev's four modules from their published configurations (models/flux_shapes.py),
   initialised on the GPU in bfloat16: seconds and resident GiB.
2. Sampling at 1024x1024, 28 steps, guidance 3.5, one image: diffusers' FluxPipeline against our
   sampling loop (models/sampling.py), interleaved, torch.compile off then on (the transformer compiled
   in place, shared by both); the two images' largest pixel difference (byte-identical is the claim
   with compile off); our loop with one region (two transformer calls per step). Peak GiB and seconds.
3. Training: the text encoders and VAE dropped, LoRA as the flux-dev preset sets it (rank, alpha,
   targets read from artaug/presets/flux-dev.yaml), gradient checkpointing, AdamW on fp32 LoRA
   weights, the flow-matching loss at 4,096 image and 512 text tokens: two steps, peak GiB, seconds.

On a GPU machine without diffusers, carry its wheel and those of what it needs there beyond torch
and transformers (the versions here: diffusers 0.42.1, importlib_metadata, huggingface_hub 1.x if the
machine's is older), installed with `pip install --no-deps --target` and put on PYTHONPATH.

Each part is written to the JSON as it finishes, so a run cut short keeps what it measured; a part
that fails records its error and the next one runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import numpy as np
import torch
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from artaug.models.flow_matching import flow_matching_loss  # noqa: E402
from artaug.models.flux_shapes import flux_dev_pipeline  # noqa: E402
from artaug.models.sampling import Job, Region, sample  # noqa: E402

GIB = 2**30
PROMPT = "a lighthouse on a cliff at dusk, waves below, warm light in the windows"
REGION = Region(box=(0.25, 0.1, 0.75, 0.9), prompt="a tall white lighthouse, sharp details", scale=1.0)
PRESET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "artaug", "presets", "flux-dev.yaml")


class Probe:
    """Seconds and peak memory of one part, synchronised on CUDA; memory is None on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def gib(self) -> dict:
        if not self.cuda:
            return {"resident_gib": None, "peak_gib": None}
        return {"resident_gib": round(torch.cuda.memory_allocated() / GIB, 2),
                "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2)}  # fmt: skip

    def timed(self, fn):
        self.sync()
        start = time.perf_counter()
        result = fn()
        self.sync()
        return result, round(time.perf_counter() - start, 3)


def build(device: torch.device, full: bool, probe: Probe):
    probe.reset()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            pipe, seconds = probe.timed(lambda: flux_dev_pipeline(full=full))
    finally:
        torch.set_default_dtype(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    params = {name: sum(p.numel() for p in module.parameters()) for name, module in pipe.components.items()
              if isinstance(module, torch.nn.Module)}  # fmt: skip
    return pipe, {"seconds": seconds, "parameters": params, **probe.gib()}


def sampling(pipe, size: int, steps: int, compiled: bool, probe: Probe) -> dict:
    """diffusers and ours, each warmed (one 2-step call) then timed, interleaved; then one region."""
    if compiled:
        pipe.transformer.compile()
    diffusers_call = lambda n: pipe(  # noqa: E731
        PROMPT, height=size, width=size, num_inference_steps=n, guidance_scale=3.5,
        generator=torch.Generator("cpu").manual_seed(0), max_sequence_length=512,
    ).images[0]  # fmt: skip
    ours_call = lambda n, regions=(): sample(  # noqa: E731
        pipe, [Job(prompt=PROMPT, seed=0, regions=list(regions))], size, size, n, 3.5
    )[0]
    out = {}
    probe.reset()
    for name, call in (("diffusers", diffusers_call), ("ours", ours_call)):
        _, out[f"{name}_warm_s"] = probe.timed(lambda call=call: call(2))  # compiles when on
    images = {}
    for name, call in (("diffusers", diffusers_call), ("ours", ours_call)):
        images[name], out[f"{name}_s"] = probe.timed(lambda call=call: call(steps))
    out.update(probe.gib())
    out["ours_vs_diffusers"] = round(out["ours_s"] / out["diffusers_s"], 3)
    difference = np.abs(np.asarray(images["ours"], np.int16) - np.asarray(images["diffusers"], np.int16))
    out["max_pixel_difference"] = int(difference.max())
    _, out["ours_one_region_s"] = probe.timed(lambda: ours_call(steps, [REGION]))
    out["one_region_vs_none"] = round(out["ours_one_region_s"] / out["ours_s"], 3)
    return out


def training(pipe, size: int, probe: Probe) -> dict:
    from peft import LoraConfig

    train = yaml.safe_load(open(PRESET))["train"]
    for name in ("text_encoder", "text_encoder_2", "vae"):  # the trainer reads the latent cache instead
        setattr(pipe, name, None)
    transformer = pipe.transformer
    if hasattr(transformer, "_orig_mod"):
        transformer = transformer._orig_mod
    probe.reset()
    lora = LoraConfig(r=train["rank"], lora_alpha=train["alpha"], target_modules=train["target_modules"])
    transformer.add_adapter(lora)
    transformer.train()
    transformer.enable_gradient_checkpointing()
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # fp32 master LoRA weights; the frozen base stays bf16
    optimizer = torch.optim.AdamW(params, lr=train["learning_rate"])
    device, dtype = transformer.device, torch.bfloat16
    latents = torch.randn(1, 16, size // 8, size // 8, device=device, dtype=dtype)
    text = torch.randn(1, 512, 4096, device=device, dtype=dtype)
    pooled = torch.randn(1, 768, device=device, dtype=dtype)

    def step(seed: int) -> float:
        generator = torch.Generator("cpu").manual_seed(seed)
        with torch.autocast(device.type, dtype=dtype):
            loss = flow_matching_loss(transformer, latents, text, pooled, generator, guidance=1.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    seconds = [probe.timed(lambda s=s: step(s))[1] for s in range(2)]
    return {"lora_parameters": sum(p.numel() for p in params), "rank": train["rank"],
            "first_step_s": seconds[0], "step_s": seconds[1], **probe.gib()}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="JSON file of the figures")
    p.add_argument("--cpu-check", action="store_true", help="depth cut, 256 px, 2 steps, no compile, CPU")
    args = p.parse_args()
    cpu = args.cpu_check
    device = torch.device("cpu" if cpu else "cuda")
    size, steps = (256, 2) if cpu else (1024, 28)
    probe = Probe(device)
    record = {"device": "cpu" if cpu else torch.cuda.get_device_name(0), "torch": torch.__version__,
              "full_depth": not cpu, "size": size, "steps": steps}  # fmt: skip

    def save(name: str, fn) -> None:
        started = time.perf_counter()
        try:
            record[name] = fn()
        except Exception as err:  # noqa: BLE001 - recorded; the next part still runs
            record[name] = {"error": repr(err)[:800]}
        record[name]["part_s"] = round(time.perf_counter() - started, 1)
        print(name, json.dumps(record[name]), flush=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)

    holder = {}

    def built() -> dict:
        holder["pipe"], figures = build(device, not cpu, probe)
        return figures

    save("build", built)
    if "pipe" not in holder:
        return
    save("sampling_eager", lambda: sampling(holder["pipe"], size, steps, False, probe))
    if not cpu:
        save("sampling_compiled", lambda: sampling(holder["pipe"], size, steps, True, probe))
    save("training_checkpointed", lambda: training(holder["pipe"], size, probe))


if __name__ == "__main__":
    main()
