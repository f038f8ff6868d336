"""`task: vae` jobs: train the own KL autoencoder (models/vae.py) on pixel shards, then measure
its latent scale and shift and save both with the weights at `vae.path`, where `data encode` and
sampling read them. Ray Train runs `train_vae_loop` once per worker, like `worker.train_loop`.
"""

from __future__ import annotations

import io
import random
import time
from typing import Iterator

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from PIL import Image

from ..data import shards
from ..models.vae import KLAutoencoder, save_own_vae, vae_loss
from ..spec import JobSpec
from .engine import build_engine
from .tracking import NullTracker, Tracker
from .step import step_generator


def _decode(sample: dict) -> np.ndarray:
    """A pixel-shard sample → (3, H, W) or (3, T, H, W) float32 in [-1, 1]."""
    if "frames.npy" in sample:
        arr = shards.npy_load(sample["frames.npy"]).astype(np.float32).transpose(3, 0, 1, 2)  # (T, H, W, 3) → (3, T, H, W)
    else:
        arr = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
    return arr / 127.5 - 1.0


def pixel_batches(uri: str, batch_size: int, rank: int, world: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless per-rank batches of pixels: shard i goes to rank i mod world, reshuffled every epoch."""
    manifest = shards.read_manifest(uri)
    if manifest.get("kind") != "pixels":
        raise shards.DataError(f"{uri}: a vae job trains on pixel shards, this set holds {manifest.get('kind')!r}")
    mine = manifest["shards"][rank::world] or manifest["shards"]
    epoch = 0
    while True:
        rng = random.Random(seed * 7919 + epoch * 31 + rank)
        samples = [s for e in rng.sample(mine, len(mine)) for s in shards.read_shard(uri, e)]
        rng.shuffle(samples)
        for b in range(len(samples) // batch_size):
            yield torch.from_numpy(np.stack([_decode(s) for s in samples[b * batch_size:(b + 1) * batch_size]]))
        epoch += 1


def train_vae_loop(config: dict) -> None:
    spec = JobSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(spec.resources.cpus_per_worker)
    device = torch.device("cuda", ctx.get_local_rank()) if spec.resources.use_gpu else torch.device("cpu")
    batches = pixel_batches(spec.data.train, spec.data.fixed_batch(), rank, world, spec.train.seed)
    torch.manual_seed(spec.train.seed)
    v = spec.vae
    net = KLAutoencoder(v.latent_channels, v.base_channels, v.downsample, v.temporal_downsample,
                        video=spec.data.frames > 1)
    engine = build_engine(net, spec)
    tracker = Tracker(config["tracking_uri"], config["mlflow_run_id"]) if rank == 0 else NullTracker()
    tracker.params({"vae.params": sum(p.numel() for p in net.parameters()), "world_size": world})
    t_last, mse_sum, n = time.perf_counter(), torch.zeros(()), 0
    for step in range(1, spec.train.steps + 1):
        x = next(batches).to(device)
        loss, mse = vae_loss(engine, x, v.kl_weight, step_generator(spec.train.seed, step, rank))
        engine.backward(loss)
        engine.step()
        mse_sum += mse.cpu()
        n += 1
        if step % spec.tracking.log_every == 0 or step == spec.train.steps:
            dist.all_reduce(mse_sum)
            elapsed = time.perf_counter() - t_last
            m = {"vae/recon_mse": mse_sum.item() / (n * world), "train/step": step,
                 "train/samples_per_s": n * spec.data.fixed_batch() * world / elapsed}
            tracker.log(m, step)
            if rank == 0:
                print(f"step {step}/{spec.train.steps} recon mse {m['vae/recon_mse']:.4f}", flush=True)
            mse_sum.zero_()
            t_last, n = time.perf_counter(), 0

    # Latent statistics over a few batches: latents are normalised to zero mean, unit variance.
    model = engine.module.eval()
    with torch.no_grad():
        zs = torch.cat([model.encode(next(batches).to(device))[0].float().cpu() for _ in range(4)])
    if rank == 0:
        shift, std = zs.mean().item(), zs.std().item()
        digest = save_own_vae(model, v.path, scale=1.0 / std, shift=shift, extra={"job": spec.name})
        tracker.params({"vae.scale": 1.0 / std, "vae.shift": shift, "vae.path": v.path, "vae.sha256_12": digest})
        print(f"vae saved to {v.path} (scale {1 / std:.4f}, shift {shift:.4f})", flush=True)
    tracker.close()
    dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
