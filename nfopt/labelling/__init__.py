"""Inferring a model's weight-space labelling from its structure, and applying group elements to models.

``permutation``: the labelling API: which parameter axes share a neuron set, inferred or given.
``monomial``: which of those sets also admit sign flips or scalings, and the graph check that decides.
``trace``: the torch.fx core both stand on: tracing a model, running its graph, watching its forward
(and exporting, for one fx cannot trace).
``axes``: the permutation inference: axis variables tied and pinned while walking the graphs.
``op_rules``, ``module_rules``: what each torch function, tensor method, ATen operator and nn module does
to them.
"""

from .monomial import MonomialLabelling, act_model_, label_monomial, monomial_invariance_error
from .permutation import ModelLabelling, invariance_error, label_explicit, label_model, permute_model_

__all__ = [
    "ModelLabelling",
    "MonomialLabelling",
    "act_model_",
    "invariance_error",
    "label_explicit",
    "label_model",
    "label_monomial",
    "monomial_invariance_error",
    "permute_model_",
]
