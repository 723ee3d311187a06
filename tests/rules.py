"""Learned update rules for tests: the Adam-equivalent fresh rule and one whose NFN is switched on."""

from __future__ import annotations

import torch

from nfopt.optim.rule import LearnedUpdate, UpdateConfig


def fresh_rule(**cfg) -> LearnedUpdate:
    torch.manual_seed(0)
    return LearnedUpdate(UpdateConfig(**cfg))


def open_rule(seed: int = 0, std: float = 0.3, **cfg) -> LearnedUpdate:
    """A rule whose closed last layer is opened, so the NFN's terms change every update (and the
    per-tensor step factor, where there is one)."""
    rule = fresh_rule(**cfg)
    g = torch.Generator().manual_seed(seed)
    last = [*rule.nfn.layers[-1].parameters(), *(rule.tensor_head[-1].parameters() if cfg.get("tensor_log_scale") else ())]
    with torch.no_grad():
        for p in last:
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return rule
