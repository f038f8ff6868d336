"""Autoencoders: own KL image / causal video VAEs train, save and load; diffusers loader round trip."""

from __future__ import annotations

import pytest
import torch

from ditforge.models.vae import (
    DiffusersVAE,
    IdentityVAE,
    KLAutoencoder,
    build_vae,
    load_own_vae,
    save_own_vae,
    vae_loss,
)
from ditforge.spec import VAESpec


pytestmark = pytest.mark.usefixtures("one_thread")


def _shapes(n: int, res: int = 16) -> torch.Tensor:
    from ditforge.evaluate.quality import real_pixels

    return real_pixels("shapes", range(n), res, 1, seed=0)[0]


def test_image_vae_reconstruction_error_falls_during_training():
    torch.manual_seed(0)
    x = _shapes(64)
    net = KLAutoencoder(latent_channels=4, base=16, downsample=2)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    mses = []
    for step in range(60):
        batch = x[(step * 16) % 64 : (step * 16) % 64 + 16]
        loss, mse = vae_loss(net, batch, kl_weight=1e-6, gen=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        mses.append(mse.item())
    first, last = sum(mses[:5]) / 5, sum(mses[-5:]) / 5
    assert last < 0.5 * first, (first, last)


def test_causal_video_vae_shapes_and_causality():
    torch.manual_seed(0)
    net = KLAutoencoder(latent_channels=4, base=8, downsample=2, temporal_downsample=2, video=True).eval()
    x = torch.randn(1, 3, 4, 8, 8)
    mean, _ = net.encode(x)
    assert mean.shape == (1, 4, 2, 4, 4)
    assert net.decode(mean).shape == x.shape
    x2 = x.clone()
    x2[:, :, 3] += 1.0  # change the last frame: only the last latent frame may change
    m2, _ = net.encode(x2)
    assert torch.equal(m2[:, :, 0], mean[:, :, 0]) and not torch.equal(m2[:, :, 1], mean[:, :, 1])


def test_own_vae_save_load_round_trip(tmp_path):
    net = KLAutoencoder(latent_channels=4, base=8, downsample=2)
    uri = f"file://{tmp_path}/vae"
    save_own_vae(net, uri, scale=2.0, shift=0.5)
    vae = build_vae(VAESpec(kind="own", path=uri))
    assert vae.latent_shape(3, 16, 16) == (4, 8, 8)
    x = _shapes(2)
    z = vae.encode(x)
    torch.testing.assert_close(z, (net.eval().encode(x)[0] - 0.5) * 2.0)
    assert vae.decode(z).shape == x.shape
    assert load_own_vae(uri).identity == vae.identity


def test_identity_vae_video_round_trip():
    vae = IdentityVAE(2)
    x = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, 12, 4, 4, 4) and vae.latent_shape(3, 8, 8, 4) == (12, 4, 4, 4)
    torch.testing.assert_close(vae.decode(z), x)


def test_diffusers_autoencoderkl_loader_round_trip(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    tiny = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        scaling_factor=0.5,
        shift_factor=0.1,
    )
    tiny.save_pretrained(tmp_path / "vae")
    vae = build_vae(VAESpec(kind="diffusers", path=str(tmp_path / "vae")))
    assert isinstance(vae, DiffusersVAE) and vae.scale == 0.5 and vae.shift == 0.1
    x = _shapes(2)
    z = vae.encode(x)
    assert z.shape == (2, 4, 8, 8) == (2, *vae.latent_shape(3, 16, 16))
    with torch.no_grad():  # the loader applies the saved scale and shift, and decodes like diffusers
        ref = (tiny.eval().encode(x).latent_dist.mode() - 0.1) * 0.5
        torch.testing.assert_close(z, ref)
        torch.testing.assert_close(vae.decode(z), tiny.decode(z / 0.5 + 0.1).sample.clamp(-1, 1))
    clip = torch.rand(1, 3, 2, 16, 16) * 2 - 1  # videos go through frame by frame
    assert vae.encode(clip).shape == (1, 4, 2, 8, 8)
