"""What the suite concludes from run records: summaries, tuned learning rates, speed-ups, win rates.

Pure functions of the records :func:`benchmarks.runs.train` returns (or of their JSON form, where
non-finite numbers are ``None``). A missing or non-finite loss counts as ``inf``: a diverged run
loses every comparison and is never selected as the tuned one.

Definitions (the report states them too):

- **final loss**: the full training-split loss in eval mode after ``horizon`` steps;
- **tuned learning rate**: the grid point with the lowest final loss averaged over seeds (ties go to
  the smaller rate);
- **speed-up** of a learned optimizer: ``steps_needed / horizon``, where ``steps_needed`` is the
  first step at which tuned Adam's smoothed minibatch loss (seed mean) is at or below the learned
  optimizer's smoothed minibatch loss at the horizon (seed mean). Above 1 the learned optimizer is
  faster. If Adam never gets there within its run (5x the horizon), the speed-up is a lower bound;
- **diverged** (long runs): a non-finite loss, or a smoothed loss above ``DIVERGENCE_RATIO`` times
  the first minibatch loss;
- **win**: a lower mean final loss by more than a relative ``TIE_RTOL``; closer is a tie;
- **no worse** (test loss): a win or a tie by the same rule, on the mean test loss;
- **loss growth** (long runs): the mean final loss at the end of the long run over the one at the
  horizon; above ``LOSS_GROWTH_LIMIT`` it counts against the optimizer, unless the loss at the end
  is below ``LOSS_GROWTH_FLOOR`` (a converged run: 2e-9 to 1e-8 is rounding, not growth);
- **parameter norm**: the L2 norm of all parameters together, seed mean; a learned optimizer's
  norm at the end of the long run above ``NORM_RATIO_LIMIT`` times tuned Adam's counts against it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DIVERGENCE_RATIO = 10.0
TIE_RTOL = 1e-3
LOSS_GROWTH_LIMIT = 1.2
LOSS_GROWTH_FLOOR = 1e-6
NORM_RATIO_LIMIT = 2.0

Record = Mapping[str, Any]


def finite_or_inf(x: float | None) -> float:
    """``x``, or ``inf`` when it is missing or not finite."""
    return x if x is not None and math.isfinite(x) else math.inf


def mean_loss(values: Sequence[float | None]) -> float:
    """Mean over seeds (of a loss or a norm); ``inf`` if any seed's value is missing or non-finite."""
    return statistics.fmean(finite_or_inf(v) for v in values)


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if len(finite) == len(values) and finite else None


def summarise(runs: Sequence[Record]) -> dict[str, Any]:
    """Final loss (mean, std, per seed), smoothed loss and test metrics at the horizon over a run's seeds."""
    final = [finite_or_inf(r["at_horizon"]["train_loss"]) for r in runs]
    return {
        "final_loss_mean": mean_loss(final),
        "final_loss_std": statistics.pstdev(final) if all(map(math.isfinite, final)) else math.inf,
        "final_loss_per_seed": final,
        "smoothed_loss_mean": mean_loss([r["smoothed_loss_at_horizon"] for r in runs]),
        "test_loss_mean": _mean_or_none([r["at_horizon"]["test_loss"] for r in runs]),
        "test_accuracy_mean": _mean_or_none([r["at_horizon"]["test_accuracy"] for r in runs]),
        "param_norm_mean": mean_loss([r["at_horizon"]["param_norm"] for r in runs]),
        "nonfinite_seeds": sum(1 for v in final if not math.isfinite(v)),
    }


def select_lr(final_losses: Mapping[float, Sequence[float | None]]) -> float:
    """The learning rate whose final losses have the lowest mean over seeds; ties go to the smaller rate."""
    return min(final_losses, key=lambda lr: (mean_loss(final_losses[lr]), lr))


def mean_curve(curves: Sequence[Sequence[float | None]]) -> list[float]:
    """Pointwise mean over seeds of equally long curves; ``inf`` wherever a seed is not finite."""
    return [mean_loss(points) for points in zip(*curves, strict=True)]


@dataclass(frozen=True)
class Speedup:
    """``value = steps_needed / horizon`` (None when the learned optimizer's own loss is not finite).

    ``lower_bound`` is True when the reference never reached the target: ``value`` is then the
    reference run's length over the horizon, and the true speed-up is larger.
    """

    value: float | None
    lower_bound: bool
    steps_needed: int | None


def speedup(ref_steps: Sequence[int], ref_curve: Sequence[float], target: float, horizon: int) -> Speedup:
    """How many horizons the reference curve needs to first reach ``target`` (see the module docstring)."""
    if not math.isfinite(target):
        return Speedup(None, False, None)
    for step, loss in zip(ref_steps, ref_curve, strict=True):
        if loss <= target:
            return Speedup(step / horizon, False, step)
    return Speedup(ref_steps[-1] / horizon, True, None)


def median_speedup(speedups: Sequence[Speedup]) -> Speedup:
    """The median over tasks; a lower bound when a bounded value could move it (None if none is defined).

    Every true value is at least its bound, so the median of the bounds is at most the true median;
    it is exact when each bounded value already lies above it.
    """
    defined = [s for s in speedups if s.value is not None]
    if not defined:
        return Speedup(None, False, None)
    median = statistics.median(s.value for s in defined)  # type: ignore[misc]
    bounded = any(s.lower_bound and s.value <= median for s in defined)  # type: ignore[operator]
    return Speedup(median, bounded, None)


def long_horizon(runs: Sequence[Record]) -> dict[str, Any]:
    """Behaviour of runs continued past the horizon: loss at the horizon and at the end, blow-ups."""
    at_h = mean_loss([r["at_horizon"]["train_loss"] for r in runs])
    at_end = mean_loss([r["at_end"]["train_loss"] for r in runs])
    max_ratio = max(finite_or_inf(r["max_loss_ratio"]) for r in runs)
    return {
        "steps": runs[0]["steps"],
        "loss_at_horizon_mean": at_h,
        "loss_at_end_mean": at_end,
        "end_over_horizon": ratio(at_end, at_h),
        "max_loss_ratio": max_ratio,
        "diverged_seeds": sum(
            1
            for r in runs
            if r["stopped_nonfinite"]
            or finite_or_inf(r["max_loss_ratio"]) > DIVERGENCE_RATIO
            or not math.isfinite(finite_or_inf(r["at_end"]["train_loss"]))
        ),
        "test_loss_at_end_mean": _mean_or_none([r["at_end"]["test_loss"] for r in runs]),
        "test_accuracy_at_end_mean": _mean_or_none([r["at_end"]["test_accuracy"] for r in runs]),
        "param_norm_at_horizon_mean": mean_loss([r["at_horizon"]["param_norm"] for r in runs]),
        "param_norm_at_end_mean": mean_loss([r["at_end"]["param_norm"] for r in runs]),
    }


def win_record(ours: Sequence[float], theirs: Sequence[float], rtol: float = TIE_RTOL) -> dict[str, Any]:
    """Wins, ties and losses of ``ours`` against ``theirs``, task by task (lower loss wins), and the win rate."""
    wins = ties = 0
    for a, b in zip(ours, theirs, strict=True):
        a, b = finite_or_inf(a), finite_or_inf(b)
        if a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rtol * max(abs(a), abs(b))):
            ties += 1
        elif a < b:
            wins += 1
    n = len(ours)
    return {"wins": wins, "ties": ties, "losses": n - wins - ties, "tasks": n, "win_rate": wins / n if n else None}


def no_worse_record(ours: Sequence[float], theirs: Sequence[float], rtol: float = TIE_RTOL) -> dict[str, Any]:
    """:func:`win_record`, and ``no_worse``: the tasks where ``ours`` wins or ties (is at most ``theirs``
    or within the relative ``rtol`` of it)."""
    record = win_record(ours, theirs, rtol)
    return record | {"no_worse": record["wins"] + record["ties"]}


def count_above(values: Sequence[float | None], limit: float) -> int:
    """How many values exceed ``limit``; a missing or non-finite value counts as exceeding it."""
    return sum(1 for v in values if finite_or_inf(v) > limit)


def grew(long_run: Mapping[str, Any]) -> bool:
    """Whether a long-run record's loss grew past the limit (see the module's definitions)."""
    return (finite_or_inf(long_run["end_over_horizon"]) > LOSS_GROWTH_LIMIT
            and finite_or_inf(long_run.get("loss_at_end_mean")) > LOSS_GROWTH_FLOOR)


def ratio(a: float | None, b: float | None) -> float:
    """``a / b`` for non-negative values (losses, norms): ``inf`` when ``a`` is missing or not finite,
    0 when only ``b`` is; when ``b`` is 0, 1 if ``a`` is 0 too and ``inf`` otherwise."""
    a, b = finite_or_inf(a), finite_or_inf(b)
    if not math.isfinite(a):
        return math.inf
    if not math.isfinite(b):
        return 0.0
    if b <= 0:
        return math.inf if a > 0 else 1.0
    return a / b
