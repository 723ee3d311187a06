"""Reading permutation labellings in tests: the set of an axis, the zoo's models labelled, and nets
built from a forward function."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nfopt.labelling.permutation import ModelLabelling, label_model

from ..zoo import ZOO

TOL = 1e-10
"""The largest relative output change a correct labelling may show (rounding only)."""

GENERATOR = torch.Generator().manual_seed(0)
"""The source of the tests' example inputs, so that every run sees the same ones."""


class Net(nn.Module):
    """Parameters of the given shapes, and a forward given as a function of the net and its input."""

    def __init__(self, forward: Callable[[Net, torch.Tensor], torch.Tensor], **shapes: tuple[int, ...]) -> None:
        super().__init__()
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.randn(*shape, dtype=torch.float64)))
        self.compute = forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compute(self, x)


def randn(*shape: int) -> torch.Tensor:
    """A float64 example input drawn from :data:`GENERATOR`."""
    return torch.randn(*shape, generator=GENERATOR, dtype=torch.float64)


def label_of(lab: ModelLabelling, name: str, axis: int) -> object:
    """The label of a parameter's or buffer's axis."""
    for t in lab.params.tensors + lab.buffers.tensors:
        if t.name == name:
            return t.axes[axis]
    raise KeyError(name)


def inferred(name: str, shaped: bool = True) -> tuple[nn.Module, torch.Tensor, ModelLabelling]:
    """A zoo model, its input, and the labelling inferred for it (with or without example inputs)."""
    model, x = ZOO[name]()
    return model, x, label_model(model, (x,) if shaped else None)


Axis = tuple[str, int]


def assert_couplings(lab: ModelLabelling, groups: list[list[Axis]], alone: list[Axis], what: str) -> None:
    """Each group of axes shares one coupled set, the groups distinct sets; no axis of ``alone``
    is in a coupled set."""
    for group in groups:
        labels = {label_of(lab, n, a) for n, a in group}
        assert len(labels) == 1, f"{what}: {group} should share one set, got {labels}"
        assert labels.pop() in lab.coupled_sets
    for n, a in alone:
        assert label_of(lab, n, a) not in lab.coupled_sets, f"{what}: {n} axis {a} must not be coupled"
    assert len({label_of(lab, *group[0]) for group in groups}) == len(groups), "expected groups must be distinct sets"
