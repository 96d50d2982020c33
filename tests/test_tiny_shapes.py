"""The colour-preserving patch autoencoder and the tiny builder's pretraining option (in process)."""

import os

import numpy as np
import torch

from artaug.config import ModelConfig
from artaug.models.patch_vae import BASES, PatchAutoencoder
from artaug.models.synthesis import load_pipeline
from artaug.models.tiny import build_tiny_flux, cached_tiny_flux
from artaug.models.tiny_pretrain import draw
from tests.test_models import render


def test_patch_autoencoder_decodes_exactly_and_keeps_colour_shifts():
    vae = PatchAutoencoder()
    z = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    image = vae.decode(z).sample
    assert image.shape == (2, 3, 32, 48)
    torch.testing.assert_close(vae.encode(image).latent_dist.mode(), z, atol=1e-5, rtol=0)
    assert torch.equal(vae.encode(image).latent_dist.sample(), vae.encode(image).latent_dist.mode())
    # A per-channel gain on pixels is the same gain on that channel's latents, and patch means survive.
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    gain = torch.tensor([1.2, 1.1, 0.9])
    latent_gain = torch.tensor([gain[c] for c, _, _ in BASES])[None, :, None, None]
    encoded = vae.encode(pixels * gain[None, :, None, None]).latent_dist.mode()
    torch.testing.assert_close(
        encoded, vae.encode(pixels).latent_dist.mode() * latent_gain, atol=1e-5, rtol=0
    )
    decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    torch.testing.assert_close(decoded.mean((2, 3)), pixels.mean((2, 3)), atol=1e-5, rtol=0)


def test_patch_pipeline_renders_and_keeps_the_default_transformer():
    patch, default = build_tiny_flux(0, vae="patch"), build_tiny_flux(0)
    assert type(patch.vae).__name__ == "PatchAutoencoder"
    a, b = patch.transformer.state_dict(), default.transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # only the autoencoder differs
    assert render(patch).shape == (64, 64, 3)


def test_pretrained_tiny_is_built_once_and_loads(tmp_path):
    cache = str(tmp_path / "cache")
    folder = cached_tiny_flux(cache, vae="patch", pretrain_steps=4)
    stamp = os.path.getmtime(os.path.join(folder, "model_index.json"))
    assert cached_tiny_flux(cache, vae="patch", pretrain_steps=4) == folder  # cached: not rebuilt
    assert os.path.getmtime(os.path.join(folder, "model_index.json")) == stamp
    pipe = load_pipeline(ModelConfig(source=folder, device="cpu"))
    assert type(pipe.vae).__name__ == "PatchAutoencoder"
    trained, random = pipe.transformer.state_dict(), build_tiny_flux(0).transformer.state_dict()
    assert any(not torch.equal(trained[k], random[k]) for k in random)
    assert render(pipe).shape == (64, 64, 3)


def test_drawn_shapes_have_the_captioned_colours():
    image = draw("circle", "red", "blue", np.random.default_rng(0))
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert colours == {(220, 40, 40), (40, 70, 220)}
