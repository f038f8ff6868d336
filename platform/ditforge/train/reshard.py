"""Resuming a checkpoint at another world size (any ZeRO stage) with DeepSpeed's universal checkpoints.

A ZeRO-1/2/3 checkpoint holds one flat partition of the fp32 weights and AdamW moments per rank,
cut for the world size that wrote it; `engine.load_checkpoint` only reads it back at that size.
DeepSpeed 0.19.8's `ds_to_universal` turns those partitions into one file per parameter and
state (fp32, exp_avg, exp_avg_sq, step), and an engine with `checkpoint.load_universal` cuts its
own partitions from them, for any data-parallel size. It covers ZeRO-1, 2 and 3 with one code
path; DeepSpeed's older `zero_optimization.elastic_checkpoint` covers ZeRO-1/2 only. The
conversion only moves bytes (no arithmetic), so the weights, moments and step after a resume are
the saved ones bit for bit (tests/e2e/test_reshard.py). ZeRO-0 needs nothing: every rank holds the
whole state.

What resharding needs from our manifest: `world_size` (to know a reshard is needed) and
`zero_stage` (the layout the files are in). A checkpoint without them is refused in one line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from .engine import Engine


def to_universal(folder: Path, out_root: Path) -> tuple[Path, float]:
    """DeepSpeed's `ds_to_universal` on one downloaded step folder → (universal root, seconds).

    In this process, serially (`num_*_workers=1`): a Ray Train worker should not fork a pool.
    The folder was checked by `checkpoint.check_pickles` before this reads it."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    t0 = time.perf_counter()
    out = out_root / folder.name
    args = argparse.Namespace(
        input_folder=str(folder),
        output_folder=str(out),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )  # our model has no Megatron-style TP info to add
    # its prints and progress bars would fill the job log
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal(args)
    return out_root, time.perf_counter() - t0


@contextlib.contextmanager
def universal_loading(engine: Engine) -> Iterator[None]:
    """`checkpoint.load_universal` for one `load_checkpoint` call; later saves stay ordinary.

    DeepSpeed reads the flag from its parsed config (`DeepSpeedEngine._config`) at every load and
    offers no public setter: this is the one place ditforge touches a private DeepSpeed attribute,
    so the `Engine` Protocol does not carry it (a fake engine without it fails here, by name)."""
    config = cast(Any, engine)._config
    old = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = old
