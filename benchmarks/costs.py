"""What the learned optimizer costs against Adam: step time, ATen ops, memory, training-step time.

    python -m benchmarks.costs                      # every model: benchmarks/results/costs.{json,md}
    python -m benchmarks.costs --quick              # fewer repetitions, no 50M model
    python -m benchmarks.costs --models mlp_1m resnet18 --device cpu --out /tmp/costs

Every time is the median over alternating blocks (:func:`compare`) of a function and its
baseline in one process, so a slow drift of the machine slows both alike; but a busy machine
still makes the numbers meaningless: measure with nothing else running.

- Optimizer step: ``NFNOptimizer`` (bare parameters, and ``for_model``) against
  ``torch.optim.Adam`` (``foreach`` on CPU, ``fused`` on CUDA) on fixed random gradients, so
  only the step is timed. Also the ATen ops one step dispatches (:func:`count_aten_ops`), the
  optimizer state in bytes per parameter, and the peak memory of a few steps per parameter, each
  optimizer in a fresh process (:func:`peak_memory`).
- Training step: forward + backward + step at batch 32 where the forward does not dwarf the step
  (the 1M MLP, the resnet18-sized CNN), against the same with Adam.
- NF-layer: the shared layer on the 1M MLP's weight space per million elements, forward without
  gradients (what a step runs) and forward + backward (what meta-training runs), against its
  per-element floor (the same layer without its pooled, neighbour and global terms).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from nfopt import NFNOptimizer

from .report import write_measurement
from nfopt.labelling import label_model
from nfopt.nn.layer import NFLayer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
MEMORY_STEPS = 3
"""Steps each peak-memory process takes (the first creates the state, later ones reuse it)."""


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a wall-clock time covers the work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(fns: dict[str, Callable[[], object]], device: torch.device, blocks: int, per_block: int) -> dict[str, float]:
    """Median over alternating blocks of the mean time per call, in ms, for each function."""
    for f in fns.values():  # warm-up: lazy state, caches, allocator
        for _ in range(3):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(blocks):
        for name, f in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(per_block):
                f()
            synchronize(device)
            times[name].append((time.perf_counter() - t0) / per_block * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


@dataclass(frozen=True)
class Timing:
    """How long to measure: ``blocks`` alternating blocks of about ``block_s`` seconds per function."""

    blocks: int
    block_s: float


QUICK, FULL = Timing(blocks=3, block_s=0.05), Timing(blocks=7, block_s=0.3)


def _calls_per_block(f: Callable[[], object], device: torch.device, block_s: float) -> int:
    """How many calls of ``f`` take about ``block_s`` seconds, from the second of two calls."""
    f()
    synchronize(device)
    t0 = time.perf_counter()
    f()
    synchronize(device)
    return max(1, round(block_s / (time.perf_counter() - t0)))


def _repeated(f: Callable[[], object], n: int) -> Callable[[], None]:
    def g() -> None:
        for _ in range(n):
            f()

    return g


def time_ms(fns: dict[str, Callable[[], object]], device: torch.device, timing: Timing) -> dict[str, float]:
    """:func:`compare` with each function repeated so that each of its blocks lasts about
    ``timing.block_s``: a function 30 times slower than its baseline gets as long a block, not a
    30 times longer one (whose median would then see other stretches of the machine's time)."""
    calls = {k: _calls_per_block(f, device, timing.block_s) for k, f in fns.items()}
    ms = compare({k: _repeated(f, calls[k]) for k, f in fns.items()}, device, timing.blocks, 1)
    return {k: ms[k] / calls[k] for k in fns}


class _OpCounter(TorchDispatchMode):
    """Counts the ops dispatched while it is active, and runs them unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(
        self, func: torch._ops.OpOverload, types: tuple[type, ...], args: tuple = (), kwargs: dict | None = None
    ) -> object:
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_aten_ops(fn: Callable[[], object]) -> int:
    """How many ATen ops one call of ``fn`` dispatches (below autograd, after composite ops are
    decomposed: what reaches the kernels). Per-op overhead dominates a step over many small
    tensors, so this count is the step's cost on a fast device."""
    with _OpCounter() as counter:
        fn()
    return counter.count


def state_bytes_per_param(opt: torch.optim.Optimizer) -> float:
    """Bytes of the optimizer's tensor state per parameter element (after a step has created it)."""
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    size = sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
    )
    return size / n


# --- models -------------------------------------------------------------------------------------


def mlp(widths: Sequence[int]) -> nn.Sequential:
    """Linear layers of these widths (input first) with ReLU between them."""
    layers: list[nn.Module] = [nn.Linear(widths[0], widths[1])]
    for a, b in zip(widths[1:], widths[2:]):
        layers += [nn.ReLU(), nn.Linear(a, b)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (through a 1x1 conv-BN where the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.shortcut(x))


def resnet(stages: Sequence[tuple[int, int]], classes: int = 10) -> nn.Sequential:
    """A CIFAR-style ResNet: a 3x3 stem, no max-pool, then per ``(channels, blocks)`` stage that
    many basic blocks (the first of every stage after the first halves the resolution), global
    average pooling and a linear head."""
    c = stages[0][0]
    layers: list[nn.Module] = [nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
    for i, (channels, blocks) in enumerate(stages):
        for j in range(blocks):
            layers.append(BasicBlock(c, channels, 2 if i and not j else 1))
            c = channels
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))


@dataclass(frozen=True)
class BenchModel:
    """A model measured: how to build it, its input shape (for labelling and the training step),
    and the batch of the training-step measurement (``None``: the step only)."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    train_batch: int | None = None


def _square_mlp(n_params: int, depth: int = 4) -> BenchModel:
    """``depth`` square Linear layers of about ``n_params`` parameters in all (a step-only model)."""
    width = round((n_params / depth) ** 0.5)
    return BenchModel(f"step_{n_params // 1_000_000}m", lambda: mlp([width] * (depth + 1)), (width,))


MODELS: dict[str, BenchModel] = {
    m.name: m
    for m in (
        BenchModel("mlp_1m", lambda: mlp([784, 1024, 256, 10]), (784,), train_batch=32),
        BenchModel("deep_narrow", lambda: mlp([64] * 25 + [10]), (64,)),
        BenchModel("resnet6", lambda: resnet([(64, 6)]), (3, 32, 32)),
        BenchModel("resnet18", lambda: resnet([(64, 2), (128, 2), (256, 2), (512, 2)]), (3, 32, 32), train_batch=32),
        _square_mlp(1_000_000),
        _square_mlp(10_000_000),
        _square_mlp(50_000_000),
    )
}
"""mlp_1m: 784-1024-256-10, 1.07M parameters in 6 tensors. deep_narrow: 24 Linear(64, 64) and a
head, 0.1M in 50. resnet6: six 64-channel basic blocks, 0.45M in 41. resnet18: the [2, 2, 2, 2]
layout with 64-512 channels for 32x32 inputs, 11.2M in 62. step_1m/10m/50m: four square Linear
layers, step only."""

WARM_UP = BenchModel("warm_up", lambda: resnet([(4, 1)]), (3, 8, 8))
"""A tiny model with conv, BatchNorm and Linear tensors, stepped before a memory measurement."""

QUICK_SKIPS = ("step_50m",)
"""Left out of ``--quick`` unless named in ``--models``."""


def _adam(model: nn.Module, example: torch.Tensor) -> torch.optim.Optimizer:
    fast = {"fused": True} if example.device.type == "cuda" else {"foreach": True}
    return torch.optim.Adam(model.parameters(), lr=1e-3, **fast)


OPTIMIZERS: dict[str, Callable[[nn.Module, torch.Tensor], torch.optim.Optimizer]] = {
    "adam": _adam,
    "nfn_bare": lambda model, example: NFNOptimizer(model.parameters()),
    "nfn_model": lambda model, example: NFNOptimizer.for_model(model, example_inputs=(example,)),
}
"""Each optimizer compared, built from the model and an example input; Adam is the baseline."""


def _setup(spec: BenchModel, device: torch.device) -> tuple[nn.Module, torch.Tensor]:
    """The model on ``device`` with fixed random gradients, and an example input batch of two."""
    torch.manual_seed(0)
    model = spec.build().to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model, torch.randn(2, *spec.input_shape, device=device)


# --- measurements -------------------------------------------------------------------------------


def step_cost(spec: BenchModel, device: torch.device, timing: Timing) -> dict[str, object]:
    """Each optimizer's step on fixed gradients: ms, ratio to Adam, ATen ops, state bytes per parameter."""
    model, example = _setup(spec, device)
    opts = {k: build(model, example) for k, build in OPTIMIZERS.items()}
    ms = time_ms({k: o.step for k, o in opts.items()}, device, timing)  # steps them all: state exists
    return {
        "model": spec.name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tensors": len(list(model.parameters())),
        "step": {
            k: {
                "ms": ms[k],
                "ratio_vs_adam": ms[k] / ms["adam"],
                "aten_ops": count_aten_ops(o.step),
                "state_bytes_per_param": state_bytes_per_param(o),
            }
            for k, o in opts.items()
        },
    }


def train_step_cost(spec: BenchModel, device: torch.device, timing: Timing) -> dict[str, object]:
    """Forward + backward + step on one fixed batch with each optimizer, and forward + backward alone."""
    if spec.train_batch is None:
        raise ValueError(f"{spec.name} has no training-step measurement")
    model, example = _setup(spec, device)
    x = torch.randn(spec.train_batch, *spec.input_shape, device=device)
    y = torch.randint(0, 10, (spec.train_batch,), device=device)

    def forward_backward() -> None:
        nn.functional.cross_entropy(model(x), y).backward()

    def train_step(opt: torch.optim.Optimizer) -> Callable[[], None]:
        def f() -> None:
            opt.zero_grad(set_to_none=True)
            forward_backward()
            opt.step()

        return f

    fns: dict[str, Callable[[], object]] = {k: train_step(build(model, example)) for k, build in OPTIMIZERS.items()}
    ms = time_ms({**fns, "forward_backward": forward_backward}, device, timing)
    return {
        "batch": spec.train_batch,
        "forward_backward_ms": ms["forward_backward"],
        **{k: {"ms": ms[k], "ratio_vs_adam": ms[k] / ms["adam"]} for k in OPTIMIZERS},
    }


def _peak_memory_child(model: str, optimizer: str, device: torch.device) -> dict[str, float]:
    """In this (fresh) process: the peak memory of :data:`MEMORY_STEPS` steps above the model and
    its gradients, and the state size, per parameter.

    The optimizer first steps a tiny model with every kind of tensor, so that the code pages its
    kernels load are not counted. On Linux CPU the peak is the resident set's high-water mark,
    reset before the first step (``/proc/self/clear_refs``). ``ru_maxrss`` would not do: a child
    process starts with its parent's high-water mark, and it keeps the peaks of imports.
    """
    tiny, tiny_example = _setup(WARM_UP, device)
    warm = OPTIMIZERS[optimizer](tiny, tiny_example)
    for _ in range(MEMORY_STEPS):
        warm.step()
    net, example = _setup(MODELS[model], device)
    opt = OPTIMIZERS[optimizer](net, example)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _reset_cpu_peak()
    for _ in range(MEMORY_STEPS):
        opt.step()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _cpu_peak()
    n = sum(p.numel() for p in net.parameters())
    return {"peak_bytes_per_param": (peak - before) / n, "state_bytes_per_param": state_bytes_per_param(opt)}


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_cpu_peak() -> int:
    """Reset the peak-RSS mark and return the resident set size, in bytes (Linux; elsewhere the
    peak so far, which over-states the baseline)."""
    if Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status_bytes("VmRSS")
    return _cpu_peak()


def _cpu_peak() -> int:
    """The resident set's peak since the last reset, in bytes."""
    if Path("/proc/self/status").exists():
        return _proc_status_bytes("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS


def peak_memory(model: str, optimizer: str, device: torch.device) -> dict[str, float]:
    """Peak memory and state bytes per parameter of one optimizer on one model (a name of
    :data:`MODELS` and of :data:`OPTIMIZERS`), measured in a fresh process so that neither the
    others' state nor this process's history counts."""
    cmd = [sys.executable, "-m", "benchmarks.costs", "--peak-memory-child", model, optimizer, "--device", str(device)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def nf_layer_cost(
    model: nn.Module, channels: int, backward: bool, device: torch.device, timing: Timing
) -> dict[str, object]:
    """The NF-layer on ``model``'s weight space, ms per million elements: pooled layer vs the
    per-element floor; forward without gradients, or forward + backward."""
    spec = label_model(model).params
    n = sum(t.numel for t in spec.tensors)
    xs = [torch.randn(channels, *t.shape, device=device, requires_grad=backward) for t in spec.tensors]
    layers = {"pooled": NFLayer(channels, channels), "per_element": NFLayer(channels, channels, pooled=False)}

    def run(layer: NFLayer) -> Callable[[], None]:
        layer = layer.to(device)

        def f() -> None:
            with torch.set_grad_enabled(backward):
                ys = layer(spec, xs)
            if backward:
                torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])

        return f

    ms = time_ms({k: run(v) for k, v in layers.items()}, device, timing)
    per_m = {k: v * 1e6 / n for k, v in ms.items()}
    return {
        "channels": channels,
        "pass": "forward+backward" if backward else "forward",
        "elements": n,
        "pooled_ms_per_M": per_m["pooled"],
        "per_element_ms_per_M": per_m["per_element"],
        "ratio": per_m["pooled"] / per_m["per_element"],
    }


# --- report -------------------------------------------------------------------------------------


def machine(device: torch.device, threads: int | None = None) -> dict[str, object]:
    """What the numbers were measured on: CPU model, cores, torch, device (and GPU), and the
    intra-op threads (``threads``, by default this process's)."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads() if threads is None else threads,
    }


def machine_line(m: dict[str, object]) -> str:
    """One line of :func:`machine`'s answer, for a report."""
    gpu = f", {m['gpu']}" if m["gpu"] else ""
    return (f"{m['device']}{gpu}; CPU {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads; "
            f"torch {m['torch']}")


def markdown(results: dict[str, object]) -> str:
    """The results as tables."""
    lines = [
        "# Costs",
        "",
        f"Measured by `{results['command']}` on {machine_line(results['machine'])}.",
        "",
        "Only meaningful when nothing else runs on the machine. Times are medians over alternating blocks; "
        "ratios are against Adam (foreach on CPU, fused on CUDA) measured in the same run.",
        "",
        "## Optimizer step (fixed random gradients)",
        "",
        "Peak: the most memory a few steps take above the model and its gradients, in a fresh process.",
        "",
        "| model | params | tensors | optimizer | step (ms) | / Adam | ATen ops | state B/param | peak B/param |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        for k, o in r["step"].items():
            lines.append(
                f"| {r['model']} | {r['parameters']:,} | {r['tensors']} | {k} | {o['ms']:.2f} | "
                f"{o['ratio_vs_adam']:.2f} | {o['aten_ops']:,} | {o['state_bytes_per_param']:.2f} | "
                f"{o['peak_bytes_per_param']:.1f} |"
            )
    trained = [r for r in results["models"] if r["train_step"]]
    if trained:
        lines += [
            "",
            "## Training step (forward + backward + step, one fixed batch)",
            "",
            "| model | batch | forward+backward (ms) | optimizer | train step (ms) | / Adam |",
            "|---|---|---|---|---|---|",
        ]
        for r in trained:
            t = r["train_step"]
            for k in OPTIMIZERS:
                lines.append(f"| {r['model']} | {t['batch']} | {t['forward_backward_ms']:.2f} | {k} | "
                             f"{t[k]['ms']:.2f} | {t[k]['ratio_vs_adam']:.2f} |")
    lines += [
        "",
        f"## NF-layer, per million weight-space elements (mlp_1m, {results['nf_layer'][0]['elements']:,})",
        "",
        "| channels | pass | pooled (ms/M) | per-element floor (ms/M) | ratio |",
        "|---|---|---|---|---|",
    ]
    for r in results["nf_layer"]:
        lines.append(f"| {r['channels']} | {r['pass']} | {r['pooled_ms_per_M']:.1f} | "
                     f"{r['per_element_ms_per_M']:.1f} | {r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def model_cost(spec: BenchModel, device: torch.device, timing: Timing) -> dict[str, object]:
    """Every measurement of one model: step, training step (where it has one), peak memory."""
    result = step_cost(spec, device, timing)
    result["train_step"] = train_step_cost(spec, device, timing) if spec.train_batch else None
    for k, o in result["step"].items():
        o["peak_bytes_per_param"] = peak_memory(spec.name, k, device)["peak_bytes_per_param"]
    return result


def default_models(quick: bool) -> list[str]:
    """The models measured when ``--models`` is not given: all, less :data:`QUICK_SKIPS` if quick."""
    return [m for m in MODELS if not (quick and m in QUICK_SKIPS)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.costs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"fewer repetitions; skips {', '.join(QUICK_SKIPS)}")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), metavar="MODEL",
                    help=f"models to measure (default: all): {', '.join(MODELS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for costs.json and costs.md")
    ap.add_argument("--peak-memory-child", nargs=2, metavar=("MODEL", "OPTIMIZER"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, object] | None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.peak_memory_child:
        print(json.dumps(_peak_memory_child(*args.peak_memory_child, device)))
        return None
    timing = QUICK if args.quick else FULL
    names = args.models or default_models(args.quick)
    results: dict[str, object] = {
        "command": shlex.join(["python", "-m", "benchmarks.costs", *argv]),
        "quick": args.quick,
        "machine": machine(device),
        "models": [model_cost(MODELS[m], device, timing) for m in names],
        "nf_layer": [
            nf_layer_cost(MODELS["mlp_1m"].build(), c, backward, device, timing)
            for c in (8, 16) for backward in (False, True)
        ],
    }
    write_measurement(results, markdown(results), args.out, "costs")
    return results


if __name__ == "__main__":
    main()
