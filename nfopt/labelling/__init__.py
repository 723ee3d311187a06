"""Inferring a model's weight-space labelling from its structure, and applying group elements to models.

``permutation``: which parameter axes share a neuron set (a torch.fx trace of the model).
``monomial``: which of those sets also admit sign flips or scalings (from the activations).
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
