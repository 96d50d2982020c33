"""FLUX.1-dev's real shapes through the real stages on a CPU (preset flux-dev-shapes).

Every component is built at FLUX.1-dev's published widths with the depth cut (models/flux_shapes.py):
generate at 256 px, enhance with one region, train one step per phase with gradient checkpointing,
fuse, and serve one request, all in bfloat16, run beside the other tests on a Ray of their own
(tests/real_shapes_run.py, a background piece); the tests here read what it left. The model is built
once into model.cache_dir (the first run writes ~2 GB there). Images are noise: only shapes and paths
are real.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
import requests
import torch
from PIL import Image
from safetensors import safe_open

from artaug.config import load_config
from artaug.layout import TrainOutput
from artaug.lora.files import check_finite, check_fits, read_metadata
from artaug.models.flux_shapes import flux_dev_modules
from artaug.models.sampling import Job, sample
from artaug.models.synthesis import load_pipeline
from artaug.stages.contract import read_stage
from tests.conftest import free_port
from tests.real_shapes_run import PROMPT, RANK, REGION, SIDE

pytestmark = pytest.mark.heavy

PACKED_TOKENS = (SIDE // 16) ** 2  # one token per 2x2 patch of the 1/8 latent


def shapes_config(**overrides):
    return load_config("flux-dev-shapes", overrides=[f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture
def two_threads():
    """This test runs with the session's last ones: it may take both cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_what_reaches_the_transformer_has_flux_devs_shapes(real_shapes, two_threads):
    pipe = load_pipeline(shapes_config().model)  # the folder the background run built
    transformer = pipe.transformer
    assert transformer.dtype == torch.bfloat16 and transformer.inner_dim == 3072
    assert (len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)) == (1, 1)
    assert pipe.text_encoder_2.config.d_model == 4096 and pipe.text_encoder.config.hidden_size == 768
    assert pipe.vae.config.latent_channels == 16 and list(pipe.vae.config.block_out_channels)[-1] == 512
    assert pipe.text_encoder_2.get_input_embeddings().num_embeddings == 32128
    seen = []
    hook = transformer.register_forward_pre_hook(lambda _, a, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        (image,) = sample(pipe, [Job(PROMPT, 0)], SIDE, SIDE, steps=1, guidance=3.5)
    finally:
        hook.remove()
    assert image.size == (SIDE, SIDE)
    (inputs,) = seen
    assert inputs["hidden_states"].shape == (1, PACKED_TOKENS, 64)  # 16 latent channels x 2x2, packed
    assert inputs["encoder_hidden_states"].shape == (1, 512, 4096)  # T5's 512 tokens, padded
    assert inputs["pooled_projections"].shape == (1, 768)
    assert inputs["guidance"].tolist() == [3.5]
    # The guidance embedding is used: another guidance, another prediction.
    with torch.inference_mode():
        outputs = [
            transformer(**{**inputs, "guidance": torch.full_like(inputs["guidance"], g)})[0]
            for g in (1.0, 3.5)
        ]
    assert outputs[0].shape == (1, PACKED_TOKENS, 64)
    assert not torch.equal(*outputs) and torch.isfinite(outputs[1].float()).all()
    with torch.inference_mode():
        latent = pipe.vae.encode(torch.zeros(1, 3, SIDE, SIDE, dtype=torch.bfloat16)).latent_dist.mode()
    assert latent.shape == (1, 16, SIDE // 8, SIDE // 8)


def test_generate_and_enhance_at_256_pixels(real_shapes):
    root = real_shapes["root"]
    (image,) = read_stage(f"{root}/generate").to_pylist()
    assert Image.open(io.BytesIO(image["image"])).size == (SIDE, SIDE)
    (pair,) = read_stage(f"{root}/enhance").to_pylist()
    assert pair["mode"] == "regional" and not pair["unchanged"] and not pair["error"]
    assert json.loads(pair["regions"]) == [REGION]
    before, after = (np.asarray(Image.open(io.BytesIO(pair[k]))) for k in ("before", "after"))
    assert before.shape == after.shape == (SIDE, SIDE, 3) and not np.array_equal(before, after)


def test_training_caches_real_shapes_and_its_lora_loads_back(real_shapes):
    train = TrainOutput(real_shapes["train"])
    (row,) = read_stage(train.latents).to_pylist()
    assert row["dtype"] == "bfloat16" and row["skipped"] is None
    assert row["latent_shape"] == [16, SIDE // 8, SIDE // 8] and row["text_shape"] == [512, 4096]
    metadata = read_metadata(train.lora)
    assert metadata["steps"] == 2 and metadata["base_model"] == "flux-dev-shapes"  # one step per phase
    assert metadata["rank"] == RANK
    weights = check_finite(train.lora)
    assert {t.shape for k, t in weights.items() if "lora_A" in k} >= {(RANK, 3072)}
    with torch.device("meta"):  # shapes only: every key names a layer of the right shape
        modules = flux_dev_modules(full=False)
    check_fits(train.lora, {"transformer": modules["transformer"]})


def test_the_fused_model_changed_where_flux_dev_trains_and_was_served(real_shapes):
    name = "transformer/diffusion_pytorch_model.safetensors"
    fused, base = f"{real_shapes['fused']}/{name}", f"{real_shapes['model']}/{name}"
    with safe_open(fused, "pt") as new, safe_open(base, "pt") as old:
        changed = [k for k in old.keys() if not torch.equal(old.get_tensor(k), new.get_tensor(k))]
    assert any("norm1.linear" in k for k in changed)  # a modulation layer, as flux-dev targets
    assert any("single_transformer_blocks" in k for k in changed)
    assert real_shapes["served"]["status"] == 200, real_shapes["served"]["text"]
    assert Image.open(f"{real_shapes['root']}/served.png").size == (SIDE, SIDE)


def test_qwen25_vl_critic_reads_a_1024_pixel_image_as_the_real_processor_does(tmp_path):
    """Qwen2.5-VL's released processor and vision width (critique.model tiny-qwen2.5-vl) served by vLLM:
    a 1024x768 image reaches the model as the processor's 1,036x756 resize (999 image tokens), the
    prompt vLLM counts is the processor's, and the pixel boxes are read at that resized size."""
    from transformers import AutoProcessor

    from artaug.critic.answers import read_answer, request_for
    from artaug.critic.backends import critic_model, critique_task
    from artaug.critic.openai_backend import Endpoint, OpenAICritic, request_body
    from artaug.critic.server import start_server, stop_server, wait_ready
    from artaug.critic.tiny_vlm import processor_inputs
    from tests.conftest import tiny_config

    cfg = tiny_config(**{
        "critique.model": "tiny-qwen2.5-vl", "critique.box_format": "pixels",
        "critique.image_max_side": 1024, "critique.max_model_len": 4096,
    }).critique  # fmt: skip
    model = critic_model(cfg)
    processor = AutoProcessor.from_pretrained(model)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    size = processor.image_processor.size  # min/max pixels, as transformers now names them
    assert (size["shortest_edge"], size["longest_edge"]) == (3136, 12845056)
    pixels = np.random.default_rng(0).integers(0, 255, (768, 1024, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    ids = {"prompt_id": "p0", "seed": 0, "round": 1, "prompt": PROMPT}
    request = {**request_for(ids, image, cfg), **ids}
    assert (request["box_scale_w"], request["box_scale_h"]) == (1036, 756)

    messages, schema = critique_task("pixels").request(request)
    encoded = processor_inputs(processor, messages, image)
    assert encoded["image_grid_thw"].tolist() == [[1, 756 // 14, 1036 // 14]]  # patch 14, 1,036 x 756
    image_tokens = int((encoded["input_ids"] == processor.image_token_id).sum())
    assert image_tokens == (756 // 28) * (1036 // 28) == 999  # 2x2 merge

    log = str(tmp_path / "server.log")
    process, url = start_server(model, cfg, port=free_port(), log_path=log, api_key="shapes")
    try:
        wait_ready(process, url, timeout_s=600, log_path=log)
        headers = {"Authorization": "Bearer shapes"}
        served = requests.get(f"{url}/models", headers=headers, timeout=30).json()["data"][0]["id"]
        body = request_body(cfg, served, messages, schema, "critique")
        reply = requests.post(f"{url}/chat/completions", json=body, headers=headers, timeout=600)
        assert reply.json()["usage"]["prompt_tokens"] == encoded["input_ids"].shape[1]

        critic = OpenAICritic(cfg, critique_task("pixels"), Endpoint(url, key="shapes"))
        (answer,) = critic(pa.Table.from_pylist([request])).to_pylist()
    finally:
        stop_server(process)
    assert answer["error"] is None and answer["raw"], answer["error"]
    boxes = [region["box"] for region in json.loads(answer["raw"])["regions"]]
    assert all(0 <= v <= 1036 for box in boxes for v in box), boxes  # the decoder's bound: resized pixels
    read = read_answer(answer, "pixels")  # an untrained model's text may break the schema's other rules
    assert read["status"] in ("ok", "invalid"), read["error"]
    if read["status"] == "ok":
        for region in json.loads(read["critique"])["regions"]:  # pixel boxes mapped to 0-1 of the image
            assert all(0.0 <= v <= 1.0 for v in region["box"]), region
