"""The learned optimizer.

``features``: the statistics each parameter keeps and the features the NFN reads from them.
``rule``: the update rule (features -> NFN -> a bounded residual on Adam's step).
``optimizer``: :class:`NFNOptimizer`, the ``torch.optim.Optimizer`` around the rule.
``higher``: NFNOptimizer as a differentiable inner optimizer for ``higher.innerloop_ctx``.
"""

from .features import FeatureConfig
from .optimizer import NFNOptimizer, default_checkpoint_path
from .rule import LearnedUpdate, UpdateConfig

__all__ = ["FeatureConfig", "LearnedUpdate", "NFNOptimizer", "UpdateConfig", "default_checkpoint_path"]
