"""What a meta-training run shows while it runs: a progress bar and TensorBoard scalars (rank 0 only)."""

from __future__ import annotations

import math
import time
from types import TracebackType

from tqdm import tqdm

SUMMED = ("inner_steps", "tasks_drawn", "dropped_tasks", "skipped")
"""Statistics written as totals over the logging interval; the others are means."""


class Monitor:
    """A tqdm bar over meta-steps and, with a ``log_dir``, TensorBoard scalars every ``log_every`` steps.

    Scalars (every statistic of the step, so the held-out meta-loss term ``log_val_loss`` too
    when there is one) are the means over the steps since the last write (of the finite values: a step
    with no finite task has no meta-loss), the totals of :data:`SUMMED`, and inner steps per
    second (all ranks together) over that stretch of wall time. ``enabled=False`` (ranks other
    than 0) makes every method a no-op.
    """

    def __init__(self, total: int, initial: int, log_dir: str, log_every: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.log_every = log_every
        self.bar = tqdm(total=total, initial=initial, unit="meta-step", dynamic_ncols=True, disable=not enabled)
        self.writer = None
        if enabled and log_dir:
            from torch.utils.tensorboard import SummaryWriter  # loads tensorboard only when logging

            self.writer = SummaryWriter(log_dir)
        self._sums: dict[str, tuple[float, int]] = {}
        self._count = 0
        self._since = time.perf_counter()

    def update(self, step: int, stats: dict[str, float]) -> None:
        """Record meta-step ``step``'s statistics (from :meth:`MetaTrainer.meta_step`)."""
        if not self.enabled:
            return
        for key, value in stats.items():
            if math.isfinite(value):
                total, count = self._sums.get(key, (0.0, 0))
                self._sums[key] = (total + value, count + 1)
        self._count += 1
        self.bar.update(1)
        if self._count < self.log_every:
            return
        now = time.perf_counter()
        scalars = {key: total / count for key, (total, count) in self._sums.items()}
        for key in SUMMED:
            scalars[key] = self._sums.get(key, (0.0, 0))[0]
        scalars["inner_steps_per_s"] = scalars.pop("inner_steps") / (now - self._since)
        held_out = {}  # the meta-loss's two terms, when it has a held-out one
        if "log_val_loss" in scalars:
            held_out = {"log_train": f"{scalars.get('log_train_loss', math.nan):.3f}",
                        "log_val": f"{scalars['log_val_loss']:.3f}"}
        self.bar.set_postfix(
            meta_loss=f"{scalars.get('meta_loss', math.nan):.3f}",
            **held_out,
            inner_loss=f"{scalars.get('inner_loss', math.nan):.3g}",
            steps_per_s=f"{scalars['inner_steps_per_s']:.0f}",
        )
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(f"meta/{key}", value, step)
            self.writer.flush()
        self._sums, self._count, self._since = {}, 0, now

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *_exc_info: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()
