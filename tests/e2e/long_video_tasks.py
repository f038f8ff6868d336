"""The long per-task quality run (a documented command, not part of `make test`):

    nice python -m pytest tests/e2e/long_video_tasks.py -s

trains jobs/video-vdt-moving-shapes.yaml's model, objective, task mixture, optimiser settings and
global batch in one process (no Ray: the same objective, masks and EMA as the worker, one rank with
both workers' batch), scoring every task against its baseline along the way (evaluate/task_quality.py,
with the 3D direction classifier), and asserts at the end that every task beats its baseline.
Set DITFORGE_VDT_STEPS to train fewer steps than the job, DITFORGE_VDT_EVAL_EVERY to score more
or less often (default 250)."""

from __future__ import annotations

import json
import os
import time

import torch

from ditforge.models import tasks
from ditforge.models.dit import DiT, dit_config
from ditforge.models.vae import build_vae
from ditforge.objectives import build_objective
from ditforge.spec import load_job
from ditforge.evaluate import quality, task_quality
from ditforge.train.ema import EMA

from ..conftest import REPO


def test_every_task_beats_its_baseline(tmp_path):
    spec = load_job(REPO / "jobs" / "video-vdt-moving-shapes.yaml")
    steps = int(os.environ.get("DITFORGE_VDT_STEPS", spec.train.steps))
    every = int(os.environ.get("DITFORGE_VDT_EVAL_EVERY", 250))
    res, frames, vt = spec.data.resolution, spec.data.frames, spec.train.video_tasks
    t0 = time.time()
    vae = build_vae(spec.vae)
    pixels, labels = quality.real_pixels("moving-shapes", range(2048), res, frames, seed=0)  # the demo's set
    latents = vae.encode(pixels)  # (2048, 12, 8, 8, 8)
    classifier = quality.train_classifier("moving-shapes", res, frames)
    torch.manual_seed(spec.train.seed)
    model = DiT(dit_config(spec.model, latents.shape[1], given_tokens=True))
    ema = EMA(model, spec.train.ema_decay)
    obj = build_objective(spec.objective)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.train.lr, weight_decay=spec.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(spec.train.warmup, 1)))
    batch = spec.data.batch_size * spec.resources.workers
    grid = tasks.token_grid(tuple(latents.shape[1:]), spec.model.patch, spec.model.patch_t)
    g = torch.Generator().manual_seed(0)
    sample_spec = spec.sample.model_copy(update={"steps": spec.eval.steps})
    table = {}
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        given, _ = tasks.draw(vt.weights(), vt.k, batch, grid, g)
        loss = obj.loss(model, latents[idx], {"y": labels[idx]}, g, given=given)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.train.grad_clip)
        opt.step()
        sched.step()
        ema.update(model)
        if step % 50 == 0:
            print(f"[vdt] step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        if step % every == 0 or step == steps:
            with ema.swapped_in(model):
                table, _ = task_quality.score_tasks(
                    model,
                    obj,
                    vae,
                    vt.trained(),
                    tuple(latents.shape[1:]),
                    res,
                    frames,
                    sample_spec,
                    vt.k[1],
                    spec.eval.task_clips,
                    torch.device("cpu"),
                    classifier,
                )
            print(
                f"\n[vdt] step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s "
                + json.dumps({k.removeprefix("validation/tasks/"): round(v, 3) for k, v in table.items()}),
                flush=True,
            )
    for task in task_quality.EVAL_TASKS:
        assert table[f"validation/tasks/{task}/psnr"] > table[f"validation/tasks/{task}/baseline_psnr"], (task, table)
