"""NaN/Inf losses: skip the step, count it, stop after too many in a row — without a host sync.

A non-finite loss makes every gradient non-finite (DeepSpeed averages them across ranks), so the
whole step must go: weights, optimizer moments and EMA stay as they were. Two mechanisms do
that, neither of which reads the flag on the host:

* torch's fused AdamW honours `optimizer.found_inf` (a device tensor, the way GradScaler uses it):
  when it is nonzero the kernel leaves params, moments and the step count untouched. DeepSpeed
  calls the client optimizer's `step()` inside every ZeRO wrapper, so this covers stage 0 and bf16
  (where DeepSpeed does not check gradients itself).
* ZeRO stages 1-3 in fp32 also see the non-finite gradient norm themselves and skip the step
  (they sync for it anyway to clip).

The flag is reduced with MAX across ranks (one scalar all-reduce, enqueued like any collective)
so every rank skips the same steps, and the counters stay on the device until a logging step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class NonFiniteLoss(RuntimeError):
    """Too many consecutive non-finite losses: the run stops (the Ray job fails with this message)."""


class NonFiniteGuard:
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        max_consecutive: int,
        debug_nan_steps: list[int] | None = None,
    ) -> None:
        self.optimizer, self.max_consecutive = optimizer, max_consecutive
        self.debug_nan_steps = set(debug_nan_steps or ())
        # [skipped since the last read, skipped in this attempt, consecutive bad steps]
        self.counts = torch.zeros(3, device=device)
        self.total = 0
        self.consecutive = 0

    def __call__(self, loss: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, good): `good` is a 0-d float tensor, 1 when every rank's loss is finite. Arms the
        optimizer to skip this step's update when it is 0."""
        if step in self.debug_nan_steps:  # testing aid (train.debug_nan_steps): the loss goes NaN
            loss = loss * float("nan")
        bad = (~torch.isfinite(loss.detach())).float()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        setattr(self.optimizer, "found_inf", bad)  # read by the fused AdamW kernel in step() (not in torch's stubs)
        self.counts[:2] += bad
        self.counts[2] = (self.counts[2] + 1) * bad  # resets to 0 on a good step
        return loss, 1.0 - bad

    def read(self) -> int:
        """Host read (logging steps only): steps skipped since the last read."""
        since, total, run = (int(v) for v in self.counts.tolist())
        self.counts[0] = 0
        self.total, self.consecutive = total, run
        return since

    def exceeded(self) -> bool:
        """After `read`: the last `max_consecutive` (or more) steps were all skipped."""
        return self.consecutive >= self.max_consecutive

    def message(self, step: int, checkpoint_uri: str) -> str:
        return (
            f"train: the loss was NaN/Inf for {self.consecutive} consecutive steps up to step {step} "
            f"(train.max_nonfinite_steps: {self.max_consecutive}); those steps were skipped, and the run "
            f"stopped with a checkpoint of the last good weights at {checkpoint_uri}"
        )
