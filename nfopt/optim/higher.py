"""NFNOptimizer as a differentiable inner optimizer of the ``higher`` library.

Needs ``higher`` (``pip install "nfopt[higher]"``); ``import nfopt`` does not import this module.
Importing it registers :class:`DifferentiableNFNOptimizer` for :class:`NFNOptimizer`, so

    import higher
    import nfopt.optim.higher  # noqa: F401  (the registration)
    from nfopt import NFNOptimizer

    with higher.innerloop_ctx(model, NFNOptimizer.for_model(model)) as (fmodel, diffopt):
        for x, y in batches:
            diffopt.step(loss_fn(fmodel(x), y))

unrolls the learned optimizer with a gradient tape: the meta-gradient reaches the model's initial
weights (``copy_initial_weights=False``), tensor hyper-parameters passed through ``override``
(``lr``, ``weight_decay``), and the rule's own weights once they require grad
(``opt.rule.requires_grad_(True)``; NFNOptimizer freezes them). ``lr`` is a learning rate, so the
rule's learned α (which only sets the default ``lr``) gets no meta-gradient. The update is the rule's functional
forward, the one NFNOptimizer applies under ``no_grad``, so both follow the same trajectory.
"""

from __future__ import annotations

from typing import Any

try:
    import higher
except ModuleNotFoundError as e:
    if e.name != "higher":
        raise
    raise ModuleNotFoundError(
        'nfopt.optim.higher needs the higher package: pip install "nfopt[higher]"', name="higher"
    ) from e
import torch
from torch.func import functional_call

from .features import init_state
from .optimizer import NFNOptimizer


class DifferentiableNFNOptimizer(higher.optim.DifferentiableOptimizer):
    """The differentiable twin of an :class:`NFNOptimizer`: same rule, labelling, groups and state.

    Computes in float32 (float64 when every stepped parameter is float64), like NFNOptimizer; the
    rule's weights are cast for it inside the graph, so their gradients reach ``other.rule``.
    """

    def __init__(self, other: NFNOptimizer, reference_params: Any, **kwargs: Any) -> None:
        super().__init__(other, reference_params, **kwargs)
        self.optimizer = other
        self._originals = [list(group["params"]) for group in other.param_groups]

    def _update(self, grouped_grads: list[list[torch.Tensor | None]], **kwargs: Any) -> None:
        opt = self.optimizer
        slots, params, grads, states, lrs, wds, originals = [], [], [], [], [], [], []
        for gi, (group, group_grads) in enumerate(zip(self.param_groups, grouped_grads)):
            for pi, (p, g) in enumerate(zip(group["params"], group_grads)):
                if g is None:
                    continue
                state = self.state[gi][pi]
                if not state:
                    state.update(init_state(p, opt.rule.config.features))
                    state["nonfinite_skips"] = torch.zeros((), dtype=torch.int64, device=p.device)
                slots.append((gi, pi))
                params.append(p)
                grads.append(g)
                states.append(state)
                lrs.append(group["lr"])
                wds.append(group["weight_decay"])
                originals.append(self._originals[gi][pi])
        if not params:
            return
        dtype = torch.float64 if all(p.dtype == torch.float64 for p in params) else torch.float32
        weights = {k: w.to(device=params[0].device, dtype=dtype) for k, w in opt.rule.named_parameters()}
        alpha = opt.rule.config.alpha * weights["log_alpha"].exp()  # the rule scales its step by α
        lrs = [lr / alpha for lr in lrs]
        new_params, new_stats, oks = functional_call(
            opt.rule,
            weights,
            (
                opt.spec_for(originals),
                [p.to(dtype) for p in params],
                [g.to(dtype) for g in grads],
                [{k: s[k] for k in ("step", "momenta", "v")} for s in states],
                lrs,
                wds,
            ),
        )
        for (gi, pi), p, new, stats, state, ok in zip(slots, params, new_params, new_stats, states, oks):
            if not self._track_higher_grads:
                new, stats = new.detach(), {k: v.detach() for k, v in stats.items()}
            self.param_groups[gi]["params"][pi] = new.to(p.dtype)
            state.update(stats)
            state["nonfinite_skips"] = state["nonfinite_skips"] + (1 - ok.detach()).to(torch.int64)


higher.register_optim(NFNOptimizer, DifferentiableNFNOptimizer)
