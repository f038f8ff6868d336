"""`task: vae` jobs: train the own KL autoencoder (models/vae.py) on pixel shards, then measure
its latent scale and shift and save both with the weights at `vae.path`, where `data encode` and
sampling read them. Ray Train runs `train_vae_loop` once per worker, like `worker.train_loop`,
with the same start-up, resume, checkpoints, stop marker, NaN guard and teardown (train/session.py).
"""

from __future__ import annotations

import io
import random
import time
from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from ..data import shards
from ..models.vae import KLAutoencoder, save_own_vae, vae_loss
from ..runs.folder import join_step
from .engine import build_engine
from .nonfinite import NonFiniteGuard, NonFiniteLoss
from .session import Session, worker_session
from .step import step_generator


def _decode(sample: dict[str, Any]) -> np.ndarray:
    """A pixel-shard sample → (3, H, W) or (3, T, H, W) float32 in [-1, 1]."""
    if "frames.npy" in sample:
        arr = (
            shards.npy_load(sample["frames.npy"]).astype(np.float32).transpose(3, 0, 1, 2)
        )  # (T, H, W, 3) → (3, T, H, W)
    else:
        arr = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
    return arr / 127.5 - 1.0


class PixelBatches:
    """Endless per-rank batches of pixels (B, 3, [T,] H, W): shard i goes to rank i mod world, in an
    order reshuffled every epoch, one shard in memory at a time (batches never span shards).
    `position` ({epoch, batch}: batches consumed in this epoch) resumes exactly; skipping to it
    reads no shard before the one it lies in."""

    def __init__(self, uri: str, batch_size: int, rank: int, world: int, seed: int) -> None:
        manifest = shards.read_manifest(uri)
        if manifest.get("kind") != "pixels":
            raise shards.DataError(f"{uri}: a vae job trains on pixel shards, this set holds {manifest.get('kind')!r}")
        self.uri, self.batch_size, self.rank, self.seed = uri, batch_size, rank, seed
        self.mine = manifest["shards"][rank::world] or manifest["shards"]
        if not any(e["samples"] >= batch_size for e in self.mine):
            raise shards.DataError(
                f"{uri}: no shard of rank {rank} holds a full batch of {batch_size}: "
                "lower data.batch_size or write bigger shards"
            )
        self.position = {"epoch": 0, "batch": 0}

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch, skip = self.position["epoch"], self.position["batch"]
        while True:
            b = 0
            for entry in random.Random(self.seed * 7919 + epoch * 31 + self.rank).sample(self.mine, len(self.mine)):
                n = entry["samples"] // self.batch_size
                if b + n <= skip:  # consumed before the checkpoint: not even read
                    b += n
                    continue
                samples = shards.read_shard(self.uri, entry)
                random.Random(f"{self.seed}/{epoch}/{entry['name']}").shuffle(samples)
                for i in range(n):
                    b += 1
                    if b <= skip:
                        continue
                    self.position = {"epoch": epoch, "batch": b}
                    yield torch.from_numpy(
                        np.stack([_decode(s) for s in samples[i * self.batch_size : (i + 1) * self.batch_size]])
                    )
            epoch, skip = epoch + 1, 0


def train_vae_loop(config: dict[str, Any]) -> None:
    with worker_session(config) as run:  # tears down on every way out (train/session.py)
        _train_vae(run)


def _train_vae(run: Session) -> None:
    spec, rank, world, device, tracker, v = run.spec, run.rank, run.world, run.device, run.tracker, run.spec.vae
    loader = PixelBatches(spec.data.train, spec.data.fixed_batch(), rank, world, spec.train.seed)
    torch.manual_seed(spec.train.seed)
    net = KLAutoencoder(
        v.latent_channels, v.base_channels, v.downsample, v.temporal_downsample, video=spec.data.frames > 1
    )
    engine = build_engine(net, spec)
    guard = NonFiniteGuard(engine.client_optimizer, device, spec.train.max_nonfinite_steps, spec.train.debug_nan_steps)
    start, state, folder = run.resume(engine)
    if state:
        loader.position = state["data"]  # this rank's own position
    run.done_resuming(folder)
    dist.barrier()  # rank 0's discard_after (in resume) before any rank's first save
    tracker.params({"vae.params": sum(p.numel() for p in net.parameters()), "world_size": world})

    def save(step: int, final: bool = False) -> None:
        tensors = {f"rng_rank{rank}.safetensors": {"torch": torch.get_rng_state()}}
        run.ckpt.save(
            engine,
            step,
            {"step": step, "data": loader.position},
            tensors=tensors,
            rank_state={"data": loader.position},
            final=final,
        )

    batches = iter(loader)
    t_last, n = time.perf_counter(), 0
    mse_sum = torch.zeros((), device=device)  # on the device: NCCL all-reduces only GPU tensors
    stopping = False
    for step in range(start + 1, spec.train.steps + 1):
        x = next(batches).to(device)
        loss, mse = vae_loss(engine, x, v.kl_weight, step_generator(spec.train.seed, step, rank))
        loss, good = guard(loss, step)  # a NaN/Inf step is skipped by the optimizer (train/nonfinite.py)
        engine.backward(loss)
        engine.step()
        mse_sum += torch.where(good > 0, mse, 0.0)
        n += 1
        if step % spec.tracking.log_every == 0 or step == spec.train.steps:
            dist.all_reduce(mse_sum)
            good_steps = n - guard.read()
            elapsed = time.perf_counter() - t_last
            m = {
                "vae/recon_mse": mse_sum.item() / (good_steps * world) if good_steps else float("nan"),
                "train/step": step,
                "train/skipped_nonfinite": guard.total,
                "train/samples_per_s": n * spec.data.fixed_batch() * world / elapsed,
            }
            tracker.log({k: val for k, val in m.items() if val == val}, step)
            if rank == 0:
                print(f"step {step}/{spec.train.steps} recon mse {m['vae/recon_mse']:.4f}", flush=True)
            mse_sum.zero_()
            t_last, n = time.perf_counter(), 0
            stopping = run.stop_requested()

        if step == spec.train.steps:
            run.final_save(save, step)
        elif step % spec.checkpoint.every_steps == 0 or (stopping and spec.checkpoint.on_stop) or guard.exceeded():
            save(step)
        if guard.exceeded():
            run.fail_together(NonFiniteLoss(guard.message(step, join_step(run.run_uri, step))))
        if stopping:
            if rank == 0:
                print(f"stop requested: leaving at step {step}", flush=True)
            run.ckpt.wait()
            return  # vae.path is written only by a run that finished

    # Latent statistics over a few batches: latents are normalised to zero mean, unit variance.
    model = cast(KLAutoencoder, engine.module.eval())  # the net build_engine wrapped
    with torch.no_grad():
        zs = torch.cat([model.encode(next(batches).to(device))[0].float().cpu() for _ in range(4)])
    if rank == 0:
        assert v.path is not None  # the spec requires vae.path for vae.kind own, which a vae job trains
        shift, std = zs.mean().item(), zs.std().item()
        digest = save_own_vae(model, v.path, scale=1.0 / std, shift=shift, extra={"job": spec.name})
        tracker.params({"vae.scale": 1.0 / std, "vae.shift": shift, "vae.path": v.path, "vae.sha256_12": digest})
        print(f"vae saved to {v.path} (scale {1 / std:.4f}, shift {shift:.4f})", flush=True)
