"""LoRA against full fine-tuning (`ditforge bench --section lora`): the worker's own step
(`train_step`: DeepSpeed ZeRO-2, EMA) with every weight training and with `train.lora`'s default
adapters (rank `LORA_RANK`: every block's qkv, proj and MLP linears) on the frozen model, in the
same processes: trainable parameters, step time, and the state each rank holds (weights,
gradients, optimizer; on a GPU also the step's peak memory). bench/train.py's `lora_vs_full`
measures; this module only says which configurations.

CPU: DiT-S/2 (`--quick`: T/2) on 4x32x32 latents, 2 ranks (gloo). GPU: DiT-XL/2 at 256x256
(4x32x32 latents), one GPU, bf16, compiled blocks, a fixed batch of 32.
"""

from __future__ import annotations

import torch

from .train import LORA_RANK, rows_of, run_config


def plan(quick: bool, focus: bool = False) -> list[dict]:
    configs = []
    if torch.cuda.is_available():
        gpu = dict(size="XL", ckpt=False, compile="blocks", zero=2, warmup=2, steps=3, rounds=2 if quick else 3)
        configs.append(
            dict(
                device="cuda",
                world=1,
                threads=8,
                variants=[],
                batch=32,
                lora=dict(gpu, lora=LORA_RANK, name=f"lora-vs-full-gpu-dit-xl2-256-r{LORA_RANK}"),
            )
        )
        if focus:
            return configs
    size = "T" if quick else "S"
    cpu = dict(
        size=size, ckpt=False, compile="off", zero=2, warmup=1, steps=2 if quick else 3, rounds=2 if quick else 3
    )
    configs.append(
        dict(
            device="cpu",
            world=2,
            threads=1,
            variants=[],
            batch=2 if quick else 8,
            lora=dict(cpu, lora=LORA_RANK, name=f"lora-vs-full-cpu-dit-{size.lower()}2-r{LORA_RANK}"),
        )
    )
    return configs


def run(quick: bool = False, focus: bool = False) -> list[dict]:
    out: list[dict] = []
    for cfg in plan(quick, focus):
        out += rows_of(cfg, run_config(cfg))
    return out
