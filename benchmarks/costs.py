"""What the learned optimizer costs: NF-layer throughput, step time, training-step time, state bytes.

Every time is a ratio against a baseline measured in the same run, in alternating blocks, so a
busy machine slows both alike:

    python -m benchmarks.costs            # full: writes benchmarks/results/costs.{json,md}
    python -m benchmarks.costs --quick    # fewer repetitions

- NF-layer: forward + backward of the shared layer per million weight-space elements, against
  the per-element floor (the same layer without its pooled, neighbour and global terms).
- Optimizer step: NFNOptimizer (bare parameters, and with the model handed over) against
  ``torch.optim.Adam(foreach=True)`` on an MLP of about 1M parameters and on a small CNN.
- Training step: forward + backward + step on the CNN, same comparison.
- State: bytes of optimizer state per parameter.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from nfopt import NFNOptimizer
from nfopt.labelling import label_model
from nfopt.nn.layer import NFLayer

RESULTS = Path(__file__).parent / "results"


def _sync(device: torch.device) -> None:
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
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(per_block):
                f()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / per_block * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def mlp_1m() -> nn.Module:
    """784-1000-200-10: 987,210 parameters."""
    return nn.Sequential(nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 200), nn.ReLU(), nn.Linear(200, 10))


def small_cnn() -> nn.Module:
    """Three 3x3 convs (32, 64, 64 channels) with BatchNorm on 28x28 inputs, global pooling, a head."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def nf_layer_cost(channels: int, device: torch.device, blocks: int, per_block: int) -> dict[str, float]:
    """Forward + backward ms per million elements: pooled layer vs the per-element floor."""
    model = mlp_1m()
    spec = label_model(model).params
    n = sum(t.numel for t in spec.tensors)
    xs = [torch.randn(channels, *t.shape, device=device, requires_grad=True) for t in spec.tensors]
    layers = {
        "pooled": NFLayer(channels, channels).to(device),
        "per_element": NFLayer(channels, channels, pooled=False).to(device),
    }

    def run(layer: NFLayer) -> Callable[[], None]:
        def f() -> None:
            ys = layer(spec, xs)
            torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])

        return f

    ms = compare({k: run(v) for k, v in layers.items()}, device, blocks, per_block)
    per_m = {k: v * 1e6 / n for k, v in ms.items()}
    return {
        "channels": channels,
        "elements": n,
        "pooled_ms_per_M": per_m["pooled"],
        "per_element_ms_per_M": per_m["per_element"],
        "ratio": per_m["pooled"] / per_m["per_element"],
    }


def _optimizers(model: nn.Module) -> dict[str, torch.optim.Optimizer]:
    return {
        "adam": torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True),
        "nfn_bare": NFNOptimizer(model.parameters()),
        "nfn_model": NFNOptimizer.for_model(model),
    }


def state_bytes_per_param(opt: torch.optim.Optimizer) -> float:
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    size = sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
    )
    return size / n


def optimizer_cost(
    name: str, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device, blocks: int,
    per_block: int,
) -> dict[str, object]:
    """Step time and whole training-step time of each optimizer on one model."""
    model = model.to(device)
    x, y = (t.to(device) for t in batch)
    opts = _optimizers(model)
    nn.functional.cross_entropy(model(x), y).backward()  # gradients for the step-only timing
    step_ms = compare({k: o.step for k, o in opts.items()}, device, blocks, per_block)

    def train_step(opt: torch.optim.Optimizer) -> Callable[[], None]:
        def f() -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        return f

    train_ms = compare({k: train_step(o) for k, o in opts.items()}, device, blocks, max(1, per_block // 2))
    fwd_bwd = compare({"fwd_bwd": lambda: nn.functional.cross_entropy(model(x), y).backward()}, device, blocks, per_block)
    out: dict[str, object] = {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "forward_backward_ms": fwd_bwd["fwd_bwd"],
    }
    for k, o in opts.items():
        out[k] = {
            "step_ms": step_ms[k],
            "train_step_ms": train_ms[k],
            "state_bytes_per_param": state_bytes_per_param(o),
            "step_ratio_vs_adam": step_ms[k] / step_ms["adam"],
            "train_step_ratio_vs_adam": train_ms[k] / train_ms["adam"],
        }
    return out


def markdown(results: dict[str, object]) -> str:
    lines = [
        "# Costs",
        "",
        f"Measured by `python -m benchmarks.costs{' --quick' if results['quick'] else ''}` on "
        f"{results['device']} ({results['machine']}, {results['threads']} threads, torch {results['torch']}). "
        "Ratios are against Adam (foreach) measured in the same run.",
        "",
        "## NF-layer forward + backward, per million weight-space elements",
        "",
        "| channels | pooled (ms/M) | per-element floor (ms/M) | ratio |",
        "|---|---|---|---|",
    ]
    for r in results["nf_layer"]:
        lines.append(
            f"| {r['channels']} | {r['pooled_ms_per_M']:.1f} | {r['per_element_ms_per_M']:.1f} | {r['ratio']:.2f} |"
        )
    lines += [
        "",
        "## Optimizers",
        "",
        "| model | params | optimizer | step (ms) | step / Adam | train step (ms) | train step / Adam | state bytes/param |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["optimizers"]:
        for k in ("adam", "nfn_bare", "nfn_model"):
            o = r[k]
            lines.append(
                f"| {r['model']} | {r['parameters']:,} | {k} | {o['step_ms']:.2f} | {o['step_ratio_vs_adam']:.2f} | "
                f"{o['train_step_ms']:.2f} | {o['train_step_ratio_vs_adam']:.2f} | {o['state_bytes_per_param']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for costs.json and costs.md")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    blocks, per_block = (3, 3) if args.quick else (7, 10)
    torch.manual_seed(0)
    results: dict[str, object] = {
        "quick": args.quick,
        "device": str(device),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "nf_layer": [nf_layer_cost(c, device, blocks, per_block) for c in (16, 32)],
        "optimizers": [
            optimizer_cost("mlp_1m", mlp_1m(), (torch.randn(128, 784), torch.randint(0, 10, (128,))), device,
                           blocks, per_block),
            optimizer_cost("small_cnn", small_cnn(), (torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))),
                           device, blocks, per_block),
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "costs.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out / "costs.md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
