"""Models in and out of the ecosystem: diffusers export (DiTPipeline folder), import from a
diffusers DiTTransformer2DModel folder or a facebookresearch/DiT state dict (models/convert.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from ditforge.models.convert import PretrainedError, diffusers_config, load_into, read_pretrained, to_diffusers
from ditforge.models.dit import DiT, dit_config
from ditforge.spec import ModelSpec, ObjectiveSpec, SampleSpec, VAESpec

from ..conftest import REPO, run_cli

# ditforge and diffusers compute the same float32 ops in a different order (a fused vs split
# QKV matmul, separate vs shared embedders): they agree to rounding, not bit for bit.
ATOL = 1e-5
CLASSES = ["circle", "square", "triangle", "star", "cross", "ring", "hbar", "vbar", "diamond", "heart"]


def _dit(seed: int = 0, init_from: str | None = None) -> DiT:
    """A small class-conditional DiT with every weight non-zero (adaLN-Zero starts blocks at zero,
    which would hide a wrong mapping)."""
    torch.manual_seed(seed)
    cfg = dit_config(ModelSpec(size="T", patch=2, num_classes=10, attention="math", init_from=init_from), 4)
    m = DiT(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _inputs(B: int = 4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 4, 8, 8, generator=g)
    idx = torch.tensor([0, 17, 500, 999])[:B]  # DDPM steps: diffusers takes them as integers
    y = torch.tensor([0, 3, 10, 9])[:B]  # 10 = ditforge's null class
    return x, idx, y


def _diffusers_labels(y: torch.Tensor) -> torch.Tensor:
    return torch.where(y == 10, torch.tensor(1000), y)  # DiTPipeline's null class is 1000


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A tiny AutoencoderKL saved with save_pretrained (random weights, made here: nothing downloaded)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.5,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(str(path), safe_serialization=True)
    return path


def _export_folder(tmp_path, model: DiT, objective: ObjectiveSpec, vae: VAESpec):
    """What `ditforge export` writes (model.json + EMA weights), for a model made in the test."""
    folder = tmp_path / "ditforge-export"
    folder.mkdir()
    save_file(model.state_dict(), str(folder / "ema.safetensors"))
    (folder / "model.json").write_text(
        json.dumps(
            {
                "dit": dataclasses.asdict(model.cfg),
                "latent_shape": [4, 8, 8],
                "vae": vae.model_dump(mode="json"),
                "sample": SampleSpec().model_dump(mode="json"),
                "objective": objective.model_dump(mode="json"),
                "classes": CLASSES,
                "job": "convert-test",
                "step": 1,
                "checkpoint": "file://none",
            }
        )
    )
    return folder


def test_ddpm_dit_matches_diffusers_transformer_and_differs_without_the_shift():
    from diffusers import DiTTransformer2DModel

    model = _dit()
    assert model.cfg.t_freq_shift == 1 and model.cfg.pos_layout == "dit"  # new models use diffusers' convention
    d = DiTTransformer2DModel(**diffusers_config(model.cfg, 8)).eval()
    d.load_state_dict(to_diffusers(model.state_dict(), model.cfg), strict=True)
    x, idx, y = _inputs()
    with torch.no_grad():
        ours = model(x, idx.float() / 1000, y)  # DDPM: the network sees step / 1000
        theirs = d(x, timestep=idx, class_labels=_diffusers_labels(y)).sample
        assert ours.abs().max() > 0.1  # a real output, not adaLN-Zero's zeros
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
        # DiT's original embedding (shift 0) computes something else: the convention is what matters
        model.t_embed.freq_shift = 0
        assert (model(x, idx.float() / 1000, y) - theirs).abs().max() > 100 * ATOL


def test_export_diffusers_folder_loads_in_dit_pipeline_offline(tmp_path, tiny_vae, monkeypatch):
    from diffusers import DDIMScheduler, DiTPipeline

    from ditforge.inference.export import write_diffusers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = _dit()
    folder = _export_folder(tmp_path, model, ObjectiveSpec(kind="ddpm"), VAESpec(kind="diffusers", path=str(tiny_vae)))
    out = tmp_path / "pipe"
    info = write_diffusers(folder, f"file://{out}")
    assert info == {"scheduler": "DDIMScheduler", "vae_exported": True, "weights": "ema"}
    assert {p.name for p in out.iterdir()} >= {"model_index.json", "transformer", "vae", "scheduler"}
    pipe = DiTPipeline.from_pretrained(str(out), local_files_only=True)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.labels["star"] == 3  # class names travel in model_index.json's id2label
    t = pipe.transformer
    # the class table is padded to 1001 rows: DiTPipeline's null class 1000 is ditforge's null class
    table = t.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert table.shape == (1001, 128) and torch.equal(table[1000], model.y_embed.weight[10])
    x, idx, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, idx.float() / 1000, y),
            t(x, timestep=idx, class_labels=_diffusers_labels(y)).sample,
            atol=ATOL,
            rtol=0,
        )
    images = pipe(
        class_labels=[3, 7],
        num_inference_steps=2,
        guidance_scale=2.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (2, 16, 16, 3) and images.min() >= 0 and images.max() <= 1


def test_export_flow_model_gets_a_flow_match_scheduler(tmp_path, monkeypatch):
    from diffusers import DiTPipeline, FlowMatchEulerDiscreteScheduler

    from ditforge.inference.export import write_diffusers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = _dit(seed=2)
    folder = _export_folder(tmp_path, model, ObjectiveSpec(kind="rectified_flow"), VAESpec(kind="identity"))
    out = tmp_path / "pipe"
    assert write_diffusers(folder, f"file://{out}")["vae_exported"] is False  # identity: no AutoencoderKL
    # no vae/: DiTPipeline has no optional components, so the user names the VAE (or None) themselves
    with pytest.raises(ValueError, match="expected"):
        DiTPipeline.from_pretrained(str(out), local_files_only=True)
    pipe = DiTPipeline.from_pretrained(str(out), local_files_only=True, vae=None)
    assert pipe.vae is None and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    x, _, y = _inputs()
    sigma = torch.tensor([0.0, 0.25, 0.5, 1.0])
    with torch.no_grad():  # flow time σ ∈ [0, 1] reaches the transformer as σ·1000, as the scheduler gives it
        torch.testing.assert_close(
            model(x, sigma, y),
            pipe.transformer(x, timestep=sigma * 1000, class_labels=_diffusers_labels(y)).sample,
            atol=ATOL,
            rtol=0,
        )
        # the sampling loop the README gives diffusers users (DiTPipeline's own loop calls
        # scale_model_input, which FlowMatchEulerDiscreteScheduler does not have)
        t, s = pipe.transformer, pipe.scheduler
        yy = torch.tensor([3, 7])
        z = torch.randn(
            2,
            t.config.in_channels,
            t.config.sample_size,
            t.config.sample_size,
            generator=torch.Generator().manual_seed(0),
        )
        s.set_timesteps(3)
        for ts in s.timesteps:
            v = t(
                torch.cat([z, z]), timestep=ts.expand(4), class_labels=torch.cat([yy, torch.full_like(yy, 1000)])
            ).sample
            vc, vu = v.chunk(2)
            z = s.step(vu + 2.0 * (vc - vu), ts, z).prev_sample
        assert z.shape == (2, 4, 8, 8) and torch.isfinite(z).all()


def test_import_round_trip_from_diffusers_folder(tmp_path, tiny_vae):
    from ditforge.inference.export import write_diffusers

    model = _dit(seed=3)
    folder = _export_folder(tmp_path, model, ObjectiveSpec(kind="ddpm"), VAESpec(kind="diffusers", path=str(tiny_vae)))
    write_diffusers(folder, f"file://{tmp_path / 'pipe'}")
    fresh = _dit(seed=4)
    for where in (tmp_path / "pipe", tmp_path / "pipe" / "transformer"):  # the pipeline or its transformer/
        load_into(fresh, str(where))
        own = model.state_dict()
        assert set(fresh.state_dict()) == set(own)
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, own[k]), k  # export → import gives identical weights


def _to_dit_layout(sd: dict, C: int, p: int) -> dict:
    """ditforge weights written under facebookresearch/DiT's names (models.py), with its learned-Σ
    output (2C channels per patch pixel) and its frozen pos_embed, as its checkpoints hold them."""
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            k = k.replace(".mlp.0.", ".mlp.fc1.").replace(".mlp.2.", ".mlp.fc2.").replace(".ada.", ".adaLN_modulation.")
        k = (
            k.replace("t_embed.mlp.", "t_embedder.mlp.")
            .replace("y_embed.", "y_embedder.embedding_table.")
            .replace("final.ada.", "final_layer.adaLN_modulation.")
            .replace("final.linear.", "final_layer.linear.")
        )
        out[k] = v
    w = out.pop("patch_embed.weight")
    out["x_embedder.proj.weight"] = w.reshape(w.shape[0], C, p, p)
    out["x_embedder.proj.bias"] = out.pop("patch_embed.bias")
    D = w.shape[0]
    lin, b = out["final_layer.linear.weight"].view(p * p, C, D), out["final_layer.linear.bias"].view(p * p, C)
    out["final_layer.linear.weight"] = torch.cat([lin, torch.randn_like(lin)], 1).reshape(-1, D)  # [ε, Σ]
    out["final_layer.linear.bias"] = torch.cat([b, torch.randn_like(b)], 1).reshape(-1)
    out["pos_embed"] = torch.zeros(1, 16, D)
    return out


def _diffusers_from_dit_layout(sd: dict, depth: int):
    """diffusers' own recipe (scripts/convert_dit_to_diffusers.py), written out here independently
    of models/convert.py: the model a diffusers user would make from this checkpoint."""
    from diffusers import DiTTransformer2DModel

    out = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"],
        "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": sd["final_layer.linear.weight"],
        "proj_out_2.bias": sd["final_layer.linear.bias"],
    }
    for i in range(depth):
        t = f"transformer_blocks.{i}."
        for w in ("weight", "bias"):
            out[f"{t}norm1.emb.timestep_embedder.linear_1.{w}"] = sd[f"t_embedder.mlp.0.{w}"]
            out[f"{t}norm1.emb.timestep_embedder.linear_2.{w}"] = sd[f"t_embedder.mlp.2.{w}"]
            out[f"{t}norm1.linear.{w}"] = sd[f"blocks.{i}.adaLN_modulation.1.{w}"]
            q, k, v = sd[f"blocks.{i}.attn.qkv.{w}"].chunk(3)
            out[f"{t}attn1.to_q.{w}"], out[f"{t}attn1.to_k.{w}"], out[f"{t}attn1.to_v.{w}"] = q, k, v
            out[f"{t}attn1.to_out.0.{w}"] = sd[f"blocks.{i}.attn.proj.{w}"]
            out[f"{t}ff.net.0.proj.{w}"] = sd[f"blocks.{i}.mlp.fc1.{w}"]
            out[f"{t}ff.net.2.{w}"] = sd[f"blocks.{i}.mlp.fc2.{w}"]
        out[f"{t}norm1.emb.class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
    d = DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=4,
        out_channels=8,
        num_layers=depth,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_eps=1e-6,
    ).eval()
    d.load_state_dict(out, strict=True)
    return d


def test_dit_checkpoint_imports_and_matches_the_diffusers_model_made_from_it(tmp_path):
    src = _dit(seed=5)
    path = tmp_path / "DiT-T-2.pt"
    sd = _to_dit_layout(src.state_dict(), 4, 2)
    torch.save(sd, path)
    model = _dit(seed=6, init_from=str(path))
    assert model.cfg.t_freq_shift == 0  # a DiT checkpoint keeps DiT's own timestep embedding
    load_into(model, str(path))
    d = _diffusers_from_dit_layout(sd, model.cfg.depth)
    x, idx, y = _inputs()
    with torch.no_grad():
        ours = model(x, idx.float() / 1000, y)
        their_shifted = d(x, timestep=idx, class_labels=y).sample[:, :4]  # the ε half of [ε, Σ]
        for blk in d.transformer_blocks:  # diffusers' embedding with DiT's frequencies: the original DiT
            blk.norm1.emb.time_proj.downscale_freq_shift = 0
        theirs = d(x, timestep=idx, class_labels=y).sample[:, :4]
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    # where the two differ, by default: diffusers' frequency shift (it ships DiT-XL/2 with it)
    assert (ours - their_shifted).abs().max() > 100 * ATOL


def test_bad_pretrained_weights_are_one_line(tmp_path):
    torch.save({"ema": _to_dit_layout(_dit().state_dict(), 4, 2)}, tmp_path / "train-ckpt.pt")  # DiT train.py layout
    assert "blocks.0.attn.qkv.weight" in read_pretrained(str(tmp_path / "train-ckpt.pt"), 10)
    big = DiT(dit_config(ModelSpec(size="T", patch=4, num_classes=10, attention="math"), 4))
    with pytest.raises(
        PretrainedError, match=r"patch_embed.weight has shape \(128, 16\), the spec's model expects \(128, 64\)"
    ):
        load_into(big, str(tmp_path / "train-ckpt.pt"))
    (tmp_path / "pickle.pt").write_bytes(b"not a zip")
    with pytest.raises(PretrainedError, match="weights_only=True"):
        read_pretrained(str(tmp_path / "pickle.pt"), 10)
    # through the CLI: exit 2, one line naming the first differing tensor, before anything starts
    r = run_cli(
        "submit",
        str(REPO / "jobs" / "demo-image.yaml"),
        "--set",
        "model.size=S",
        "--set",
        f"model.init_from={tmp_path / 'train-ckpt.pt'}",
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'train-ckpt.pt'}: patch_embed.weight has shape (128, 16), the spec's model expects (384, 48)"
    ]
