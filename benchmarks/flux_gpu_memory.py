"""Peak GPU memory of FLUX.1-dev-sized components with random bf16 weights (no download): the numbers
behind the GPU memory plan (README "Run on a cluster"), to be confirmed on a CUDA machine.

    python benchmarks/flux_gpu_memory.py out.json     # needs torch with CUDA, diffusers, transformers, peft

Inference: T5-XXL + CLIP-L text encoders, the 12B transformer for 2 steps at 1024x1024, VAE decode.
Training: the transformer alone with LoRA rank 16 (attention projections), gradient checkpointing,
AdamW on the LoRA weights, one step at 1024x1024 with a 512-token prompt.
"""

import json
import sys
import time

import torch

GB = 2**30
dev = torch.device("cuda")
dt = torch.bfloat16
out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}


def mem():
    return round(torch.cuda.memory_allocated() / GB, 2), round(torch.cuda.max_memory_allocated() / GB, 2)


def build(fn):
    torch.set_default_dtype(dt)
    with torch.device(dev):
        module = fn()
    torch.set_default_dtype(torch.float32)
    return module.eval().requires_grad_(False)


def transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    )  # fmt: skip


def inference(batch: int):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t5_config = T5Config(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=32128,
                         feed_forward_proj="gated-gelu")  # fmt: skip
    clip_config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, projection_dim=768)  # fmt: skip
    t5 = build(lambda: T5EncoderModel(t5_config))
    clip = build(lambda: CLIPTextModel(clip_config))
    vae = build(lambda: AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                                      down_block_types=["DownEncoderBlock2D"] * 4,
                                      up_block_types=["UpDecoderBlock2D"] * 4,
                                      block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                      use_quant_conv=False, use_post_quant_conv=False))  # fmt: skip
    tr = build(transformer)
    weights, _ = mem()
    with torch.inference_mode():
        ids = torch.randint(0, 32000, (batch, 512), device=dev)
        text = t5(ids).last_hidden_state
        pooled = clip(torch.randint(0, 49000, (batch, 77), device=dev)).pooler_output
        latents = torch.randn(batch, 4096, 64, device=dev, dtype=dt)
        img_ids = torch.zeros(4096, 3, device=dev)
        txt_ids = torch.zeros(512, 3, device=dev)
        steps = []
        for _ in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            tr(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
               timestep=torch.full((batch,), 0.5, device=dev, dtype=dt),
               guidance=torch.full((batch,), 3.5, device=dev, dtype=torch.float32),
               img_ids=img_ids, txt_ids=txt_ids, return_dict=False)  # fmt: skip
            torch.cuda.synchronize()
            steps.append(time.perf_counter() - start)
        vae.decode(torch.randn(batch, 16, 128, 128, device=dev, dtype=dt))
    _, peak = mem()
    result = {"batch": batch, "weights_gb": weights, "peak_gb": peak, "step_s": round(min(steps), 3)}
    del t5, clip, vae, tr
    torch.cuda.empty_cache()
    return result


def training():
    from peft import LoraConfig

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    tr = build(transformer)
    tr.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                              target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                              "add_v_proj", "to_add_out"]))  # fmt: skip
    tr.train()
    tr.enable_gradient_checkpointing()
    params = [p for p in tr.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # LoRA weights in fp32 (as mixed-precision training keeps them)
    opt = torch.optim.AdamW(params, lr=1e-4)
    weights, _ = mem()
    times = []
    for _ in range(2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=dt):
            pred = tr(hidden_states=torch.randn(1, 4096, 64, device=dev, dtype=dt),
                      encoder_hidden_states=torch.randn(1, 512, 4096, device=dev, dtype=dt),
                      pooled_projections=torch.randn(1, 768, device=dev, dtype=dt),
                      timestep=torch.full((1,), 0.5, device=dev, dtype=dt),
                      guidance=torch.full((1,), 1.0, device=dev, dtype=torch.float32),
                      img_ids=torch.zeros(4096, 3, device=dev), txt_ids=torch.zeros(512, 3, device=dev),
                      return_dict=False)[0]  # fmt: skip
            loss = pred.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    _, peak = mem()
    return {"lora_params_m": round(sum(p.numel() for p in params) / 1e6, 1), "weights_gb": weights,
            "peak_gb": peak, "step_s": round(min(times), 3)}  # fmt: skip


if __name__ == "__main__":
    for name, fn in (("inference_b1", lambda: inference(1)), ("inference_b2", lambda: inference(2)),
                     ("training_lora16_gc", training)):  # fmt: skip
        try:
            out[name] = fn()
        except Exception as err:  # noqa: BLE001
            out[name] = {"error": repr(err)[:500]}
        print(name, out[name], flush=True)
    json.dump(out, open(sys.argv[1], "w"), indent=1)
