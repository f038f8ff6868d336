"""Checkpoint save throughput and the training-loop stall, to the local S3 server and file://.

For the demo model under a DeepSpeed engine (world of one): the stall is what `Checkpointer.save`
blocks the loop for (local snapshot); the upload runs in the background. Its throughput is
compared with a plain `s3fs.put_file` of the same bytes, measured in the same run.

Resharding (resuming at another world size, train/reshard.py) for the demo model (DiT-T/2 on
12x16x16 latents) and DiT-S/2, ZeRO-2: DeepSpeed's `ds_to_universal` of a local step folder plus
the universal `load_checkpoint`, side by side with a plain same-size `load_checkpoint` of the same
folder. One process: what each rank of a resized job spends (every rank converts its own copy).
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path

import torch

from .. import services, storage
from ..models.dit import DiT, DiTConfig
from ..objectives.flow import RectifiedFlow
from ..spec import JobSpec
from ..train import reshard
from ..train.checkpoint import Checkpointer
from ..train.engine import build_engine
from .common import device_name, single_process_group


def _spec(size: str) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "bench",
            "data": {"train": "file:///unused", "batch_size": 32},
            "model": {"size": size},
            "deepspeed": {"zero_stage": 2},
            "resources": {"workers": 1},
            "train": {"warmup": 0},
        }
    )


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def reshard_costs(sizes: tuple[str, ...], repeat: int) -> list[dict]:
    """Seconds to resume a local ZeRO-2 step folder plainly vs resharded, per model size (inside
    the caller's process group: DeepSpeed keeps its first one for the process)."""
    import shutil

    results = []
    for size in sizes:
        torch.manual_seed(0)
        engine = build_engine(DiT(DiTConfig(in_channels=12, size=size, patch=2, num_classes=10)), _spec(size))
        flow = RectifiedFlow(null_class=10)
        loss = flow.loss(
            engine, torch.randn(8, 12, 16, 16), {"y": torch.randint(0, 10, (8,))}, torch.Generator().manual_seed(0)
        )
        engine.backward(loss)
        engine.step()  # moments exist: the checkpoint is the size a real one is
        root = Path(tempfile.mkdtemp(prefix="ditforge-bench-reshard-"))
        engine.save_checkpoint(str(root), tag="step_1", save_latest=False)
        plain: list[float] = []
        convert: list[float] = []
        load: list[float] = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            engine.load_checkpoint(str(root), tag="step_1")
            plain.append(time.perf_counter() - t0)
            uni = root / f"u{len(convert)}"
            _, seconds = reshard.to_universal(root / "step_1", uni)
            convert.append(seconds)
            t0 = time.perf_counter()
            with reshard.universal_loading(engine):
                engine.load_checkpoint(str(uni), tag="step_1")
            load.append(time.perf_counter() - t0)
            shutil.rmtree(uni)
        gb = _folder_bytes(root / "step_1") / 1e9
        shutil.rmtree(root, ignore_errors=True)
        reshard_s = _median(convert) + _median(load)
        results.append(
            {
                "name": "checkpoint-reshard",
                "device": device_name(),
                "model": f"DiT-{size}/2",
                "zero_stage": 2,
                "checkpoint_MB": round(gb * 1e3, 2),
                "plain_resume_s": round(_median(plain), 3),
                "convert_s": round(_median(convert), 3),
                "universal_load_s": round(_median(load), 3),
                "reshard_s": round(reshard_s, 3),
                "reshard_s_per_GB": round(reshard_s / gb, 1),
                "reshard_over_plain": round(reshard_s / _median(plain), 2),
            }
        )
    return results


def run(quick: bool = False) -> list[dict]:
    services.up(ray=False)  # the S3 server (and MLflow) only
    size = "T" if quick else "S"
    spec = _spec(size)
    results = []
    torch.set_num_threads(1)  # as a worker with cpus_per_worker: 1; the upload thread gets the other core
    with single_process_group():
        torch.manual_seed(0)
        model = DiT(DiTConfig(in_channels=12, size=size, patch=2, num_classes=10))
        engine = build_engine(model, spec)
        flow = RectifiedFlow(null_class=10)
        x, y = torch.randn(32, 12, 16, 16), torch.randint(0, 10, (32,))

        def step() -> None:
            loss = flow.loss(engine, x, {"y": y}, torch.Generator().manual_seed(0))
            engine.backward(loss)
            engine.step()

        step()
        t0 = time.perf_counter()
        n = 3 if quick else 5
        for _ in range(n):
            step()
        step_s = (time.perf_counter() - t0) / n

        for target in ("s3", "file"):
            root = (
                f"s3://ditforge/bench/{uuid.uuid4().hex[:8]}"
                if target == "s3"
                else f"file://{tempfile.mkdtemp(prefix='ditforge-bench-')}"
            )
            ck = Checkpointer(root, 0, 1, keep_last=10)
            stalls, uploads, sizes = [], [], []
            for i in range(2 if quick else 3):
                stalls.append(ck.save(engine, i + 1, {"step": i + 1}))
                while ck._thread is not None and ck._thread.is_alive():
                    step()  # training goes on while the upload runs
                ck.wait()
                st = ck.history[-1]
                assert st.ok and st.complete, st.error
                uploads.append(st.upload_s)
                sizes.append(st.bytes)
            mb = sizes[-1] / 1e6
            plain_s = None
            if target == "s3":  # the same bytes with a plain s3fs put, one file after another
                with tempfile.TemporaryDirectory() as d:
                    engine.save_checkpoint(d, tag="plain", save_latest=False)
                    fs, base = storage.filesystem(f"{root}/plain")
                    t0 = time.perf_counter()
                    for f in sorted(Path(d, "plain").rglob("*")):
                        if f.is_file():
                            fs.put_file(str(f), f"{base}/{f.name}")
                    plain_s = time.perf_counter() - t0
            upload_s = sorted(uploads)[len(uploads) // 2]
            stall_s = sorted(stalls)[len(stalls) // 2]
            results.append(
                {
                    "name": f"checkpoint-save-{target}",
                    "device": device_name(),
                    "model": f"DiT-{size}/2",
                    "checkpoint_MB": round(mb, 2),
                    "upload_s": round(upload_s, 3),
                    "MBps": round(mb / upload_s, 1),
                    "stall_s": round(stall_s, 4),
                    "step_s": round(step_s, 4),
                    "stall_in_steps": round(stall_s / step_s, 3),
                    "plain_s3fs_put_s": round(plain_s, 3) if plain_s else None,
                    "plain_s3fs_MBps": round(mb / plain_s, 1) if plain_s else None,
                    "ratio_to_plain_put": round(plain_s / upload_s, 3) if plain_s else None,
                    "targets": {"stall_in_steps": "< 1", "ratio_to_plain_put": ">= 0.5"},
                }
            )
            if target == "s3":
                storage.remove(root)
        results += reshard_costs(("T",) if quick else ("T", "S"), 1 if quick else 3)
    return results
