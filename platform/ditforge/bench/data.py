"""Data-plane throughput, next to what training consumes.

- ingest: small JPEGs (64x64 → 32x32 PNG shards) through one ingest unit in this process, i.e.
  per core; in full mode also through Ray tasks on every core (wall clock, Ray start excluded);
- streaming: one worker's `LatentLoader` (demo shapes: (12, 16, 16) fp32 latents, batch 32) over a
  whole epoch, from local files and from the embedded S3 server;
- consumption: one worker's DiT-T training step on the demo's latents with plain torch (AdamW,
  rectified flow, 1 thread like the demo's `cpus_per_worker: 1`); the demo itself logs ~160
  samples/s for 2 workers under DeepSpeed ZeRO-2.

`run(quick)` returns one dict per figure: {"bench", "metric", "value", "unit", ...context}.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid

import numpy as np
import torch
from PIL import Image

from .. import storage
from ..data import ingest, shards
from ..data.loader import LatentLoader
from .common import device_name

LATENT_SHAPE = (12, 16, 16)  # the demo: 32x32 RGB through the identity VAE (2x2 space-to-depth)
BATCH = 32


def _row(bench: str, metric: str, value: float, unit: str, **ctx: object) -> dict:
    return {
        "name": f"{bench}-{metric}",
        "device": device_name(),
        "bench": bench,
        "metric": metric,
        "value": round(float(value), 2),
        "unit": unit,
        **ctx,
    }


def _jpeg_folder(root: str, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = os.path.join(root, f"c{i % 4}")
        os.makedirs(d, exist_ok=True)
        a = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(a).save(os.path.join(d, f"{i:06d}.jpg"), quality=90)


def bench_ingest(quick: bool, tmp: str) -> list[dict]:
    n = 300 if quick else 2000
    src = os.path.join(tmp, "jpegs")
    _jpeg_folder(src, n)
    s = ingest.Settings(src, resolution=32, shard_size=n)
    units, _, _, _ = ingest.plan(s)
    out = f"file://{tmp}/ingested"
    t0, c0 = time.perf_counter(), time.process_time()
    rec = ingest.ingest_unit(out, 0, units[0], s, "bench")
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert sum(e["samples"] for e in rec["shards"]) == n
    # Per CPU-second as well as per wall-second: on a shared machine the wall clock also counts
    # other people's work; the CPU time is what this work costs one core.
    rows = [
        _row(
            "data.ingest",
            "images_per_s_per_core",
            n / dt,
            "images/s/core",
            images=n,
            per_cpu_s=round(n / cpu, 1),
            input="64x64 JPEG",
            output="32x32 PNG in tar shards",
            where="one process, no Ray",
        )
    ]
    if not quick:
        from ..data.parallel import cpus, ray_session

        with ray_session():
            cores = cpus()
            t0 = time.perf_counter()
            ingest.ingest(
                src, f"file://{tmp}/ingested-ray", resolution=32, shard_size=max(64, n // (4 * cores)), progress=False
            )
            dt = time.perf_counter() - t0
        rows.append(
            _row(
                "data.ingest",
                "images_per_s_ray",
                n / dt,
                "images/s",
                images=n,
                ray_cpus=cores,
                per_core=round(n / dt / cores, 1),
                where="Ray tasks, wall clock without Ray start",
            )
        )
    return rows


def _latent_set(uri: str, n: int, shard_size: int = 256) -> int:
    """A demo-shaped latent set; → its size in bytes."""
    rng = np.random.default_rng(0)
    entries = []
    for a in range(0, n, shard_size):
        samples = (
            {
                "__key__": f"{i:08d}",
                "latent.npy": shards.npy_bytes(rng.standard_normal(LATENT_SHAPE, np.float32)),
                "cls": str(i % 10),
                "txt": f"sample {i}",
            }
            for i in range(a, min(n, a + shard_size))
        )
        entries.append(
            shards.write_shard(
                uri, shards.shard_name(a // shard_size), samples, bucket="img-32x32", shape=list(LATENT_SHAPE)
            )
        )
    shards.write_manifest(uri, {"kind": "latents", "latent_shape": list(LATENT_SHAPE), "shards": entries})
    return sum(e["bytes"] for e in entries)


def _stream(uri: str, where: str) -> list[dict]:
    loader = LatentLoader(uri, BATCH, rank=0, world=1, seed=0)
    n_batches = loader.batches_per_epoch(0)
    nbytes = sum(e["bytes"] for e in loader.manifest["shards"])
    it = iter(loader)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n_batches):
        x, y, _, _ = next(it)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    samples = n_batches * BATCH
    return [
        _row(
            "data.stream",
            f"samples_per_s_{where}",
            samples / dt,
            "samples/s/worker",
            samples=samples,
            per_cpu_s=round(samples / cpu, 1),
            batch=BATCH,
            latent_shape=list(LATENT_SHAPE),
        ),
        _row("data.stream", f"mb_per_s_{where}", nbytes / dt / 1e6, "MB/s/worker"),
    ]


def bench_tar_readers(folder: str) -> list[dict]:
    """The training loader's own tar reader (`shards.iter_tar`) against webdataset's
    (`webdataset.WebDataset`) on the same local latent shards, with the same per-sample work
    (decode the latent): alternating, best of 3 each, in this one process."""
    import glob

    import webdataset as wds

    paths = sorted(glob.glob(f"{folder}/*.tar"))

    def own() -> int:
        n = 0
        for p in paths:
            with open(p, "rb") as f:
                data = f.read()
            for smp in shards.iter_tar(data, p):
                shards.npy_load(smp["latent.npy"])
                n += 1
        return n

    def webdataset() -> int:
        n = 0
        for smp in wds.WebDataset(paths, shardshuffle=False, empty_check=False):
            shards.npy_load(smp["latent.npy"])
            n += 1
        return n

    best = {"own": float("inf"), "webdataset": float("inf")}
    counts = {}
    for _ in range(3):
        for name, fn in (("own", own), ("webdataset", webdataset)):
            t0 = time.perf_counter()
            counts[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    assert counts["own"] == counts["webdataset"], counts
    n = counts["own"]
    return [
        _row(
            "data.tar_read",
            f"samples_per_s_{name}",
            n / best[name],
            "samples/s",
            samples=n,
            x_vs_webdataset=round(best["webdataset"] / best[name], 2),
        )
        for name in ("own", "webdataset")
    ]


def bench_stream(quick: bool, tmp: str) -> list[dict]:
    n = 2048 if quick else 8192
    rows = []
    local = f"file://{tmp}/latents"
    _latent_set(local, n)
    rows += bench_tar_readers(f"{tmp}/latents")
    rows += _stream(local, "local")
    s3 = f"s3://ditforge/bench/{uuid.uuid4().hex[:10]}"
    try:
        _latent_set(s3, n)
        rows += _stream(s3, "s3")
    except Exception as e:  # S3 server not up: say so rather than fail the other figures
        rows.append(
            _row(
                "data.stream",
                "samples_per_s_s3",
                float("nan"),
                "samples/s/worker",
                error=f"{type(e).__name__}: {str(e)[:120]} (start it: ditforge services up)",
            )
        )
    finally:
        try:
            storage.remove(s3)
        except Exception:
            pass
    return rows


def bench_consumption(quick: bool) -> list[dict]:
    from ..models.dit import DiT, DiTConfig
    from ..objectives.flow import RectifiedFlow

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the demo's cpus_per_worker: 1
    try:
        torch.manual_seed(0)
        model = DiT(DiTConfig(in_channels=LATENT_SHAPE[0], size="T", patch=2, num_classes=10))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        flow = RectifiedFlow("logit_normal", 0.1, model.null_class)
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(BATCH, *LATENT_SHAPE), torch.randint(0, 10, (BATCH,))

        def step() -> None:
            loss = flow.loss(model, x, {"y": y}, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(2):
            step()  # warm-up: allocator, first-call overheads
        steps = 5 if quick else 20
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        torch.set_num_threads(threads)
    return [
        _row(
            "train.consume",
            "samples_per_s",
            steps * BATCH / dt,
            "samples/s/worker",
            model="DiT-T/2",
            per_cpu_s=round(steps * BATCH / cpu, 1),
            batch=BATCH,
            threads=1,
            note="plain torch; the demo logs ~160 samples/s for 2 DeepSpeed workers",
        )
    ]


def run(quick: bool) -> list[dict]:
    tmp = tempfile.mkdtemp(prefix="ditforge-bench-data-")
    try:
        rows = bench_ingest(quick, tmp) + bench_stream(quick, tmp) + bench_consumption(quick)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    consume = next(r for r in rows if r["bench"] == "train.consume")
    for r in rows:
        if r["bench"] == "data.stream" and r["metric"].startswith("samples_per_s") and r["value"] == r["value"]:
            r["x_training_consumption"] = round(r["value"] / consume["value"], 1)  # target: ≥ 20
            r["x_training_consumption_per_cpu_s"] = round(r["per_cpu_s"] / consume["per_cpu_s"], 1)
    return rows


if __name__ == "__main__":
    import json
    import sys

    for row in run(quick="--quick" in sys.argv):
        print(json.dumps(row))
