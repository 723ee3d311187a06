"""The axis inference: how classes of tied axes become labels, what is pinned, and how models that
do not trace whole, fail on their inputs or carry hooks are analysed."""

from __future__ import annotations

import pytest
import torch

from nfopt.labelling.axes import UNKNOWN, AxisInference, Layout, Rules, Unsupported
from nfopt.labelling.permutation import invariance_error, label_model
from nfopt.weight_space import MAX_LABELLED_AXES

from ..zoo import ZOO, UntraceableRoot
from .labels import TOL, label_of

NO_RULES = Rules({}, {}, {})


def labels(inf: AxisInference, **tensors: torch.Tensor) -> dict[str, tuple]:
    """The labels of each named tensor's axes."""
    return {t.name: t.axes for t in inf.specs(list(tensors.items()))}


# ---- from classes to labels ---------------------------------------------------------------------


def test_a_class_of_axes_becomes_a_set_named_after_its_first_axis() -> None:
    a, b = torch.zeros(3, 4), torch.zeros(4, 2)
    inf = AxisInference([a, b], NO_RULES)
    inf.union(inf.tensor(b).vars[0], inf.tensor(a).vars[1])
    assert labels(inf, a=a, b=b) == {"a": ("a:0", "a:1"), "b": ("a:1", "b:1")}


def test_pinned_classes_label_one_axis_each() -> None:
    a, b = torch.zeros(3, 4), torch.zeros(4, 2)
    inf = AxisInference([a, b], NO_RULES)
    inf.union(inf.tensor(a).vars[1], inf.tensor(b).vars[0])
    inf.pin(inf.tensor(b))
    assert labels(inf, a=a, b=b) == {"a": ("a:0", "a:1"), "b": ("b:0", "b:1")}


def test_a_class_whose_axes_differ_in_size_is_dropped() -> None:
    a, b = torch.zeros(3, 4), torch.zeros(5, 2)
    inf = AxisInference([a, b], NO_RULES)
    inf.union(inf.tensor(a).vars[1], inf.tensor(b).vars[0])
    assert labels(inf, a=a, b=b) == {"a": ("a:0", "a:1"), "b": ("b:0", "b:1")}


def test_coupled_axes_beyond_what_a_tensor_spec_holds_give_way() -> None:
    k = torch.zeros(3, 3, 3)
    vectors = [torch.zeros(3) for _ in range(3)]
    inf = AxisInference([k, *vectors], NO_RULES)
    for v_k, vector in zip(inf.tensor(k).vars, vectors):
        inf.union(v_k, inf.tensor(vector).vars[0])
    out = labels(inf, k=k, u=vectors[0], v=vectors[1], w=vectors[2])
    assert MAX_LABELLED_AXES == 2
    assert out == {"k": ("k:0", "k:1", None), "u": ("k:0",), "v": ("k:1",), "w": ("w:0",)}


def test_other_tensors_are_constants_with_pinned_axes() -> None:
    inf = AxisInference([], NO_RULES)
    const = inf.tensor(torch.zeros(2, 3))
    assert const.sizes == (2, 3) and const.complete
    assert all(inf.sets.pinned(v) for v in const.vars)
    assert inf.tensor(None) is None


# ---- broadcasting, opaque calls, recorded shapes -----------------------------------------------


def test_broadcast_dimensions_tie_only_the_operands_not_broadcast() -> None:
    inf = AxisInference([], NO_RULES)
    a, b, c = (inf.sets.new(False) for _ in range(3))
    v, size = inf.merge([(a, 4), (b, 1), (c, 4)])
    assert size == 4 and inf.sets.find(v) == inf.sets.find(a) == inf.sets.find(c) != inf.sets.find(b)
    with pytest.raises(Unsupported):
        inf.merge([(a, 4), (inf.sets.new(False), 5)])
    d, e = inf.sets.new(False), inf.sets.new(False)
    v, size = inf.merge([(d, None), (e, 3)])
    assert size is None and inf.sets.pinned(d) and inf.sets.pinned(e) and inf.sets.pinned(v)


def test_a_call_no_rule_understands_pins_what_it_touches() -> None:
    def refuses(inf: AxisInference, args: tuple, kwargs: dict) -> Layout:
        raise Unsupported

    inf = AxisInference([], Rules({torch.flip: refuses}, {}, {}))
    for target in (torch.flip, torch.roll):  # a rule that refuses, and no rule at all
        x = Layout((inf.sets.new(False), inf.sets.new(False)), (4, 6), True)
        assert inf.call("call_function", target, (x,), {"dims": [-1]}) is UNKNOWN
        assert all(inf.sets.pinned(v) for v in x.vars)


def test_what_a_node_really_produced_wins() -> None:
    inf = AxisInference([], NO_RULES)
    v = inf.sets.new(False)
    fitted = inf.fit(Layout((v,), (6,), False), torch.Size([4, 6]))
    assert fitted.complete and fitted.sizes == (4, 6) and fitted.vars[1] == v and not inf.sets.pinned(v)
    w = inf.sets.new(False)
    fitted = inf.fit(Layout((w,), (6,), True), torch.Size([5]))
    assert fitted.sizes == (5,) and fitted.vars[0] != w and inf.sets.pinned(w)


# ---- whole models -------------------------------------------------------------------------------


def test_untraceable_root_without_inputs_warns_and_couples_nothing() -> None:
    model, _ = ZOO["untraceable_root"]()
    with pytest.warns(UserWarning, match="cannot be traced"):
        lab = label_model(model)
    assert lab.coupled_sets == {}


class ReachesIntoChild(UntraceableRoot):
    """Uses a child's weight outside the child's forward: that weight must not couple."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x @ self.body[0].weight.T.sum(1, keepdim=True)


def test_parameter_used_outside_its_child_is_not_coupled() -> None:
    model = ReachesIntoChild().double()
    x = torch.randn(4, 5, dtype=torch.float64)
    lab = label_model(model, (x,))
    assert label_of(lab, "body.0.weight", 0) not in lab.coupled_sets
    assert label_of(lab, "body.0.bias", 0) not in lab.coupled_sets
    assert invariance_error(model, lab, (x,)) < TOL


def test_failed_shape_propagation_warns_and_stays_correct() -> None:
    model, x = ZOO["mlp_batchnorm"]()
    with pytest.warns(UserWarning, match="could not run"):
        lab = label_model(model, (x.float(),))  # float32 input to a float64 model
    assert label_of(lab, "bn.weight", 0) not in lab.coupled_sets
    assert invariance_error(model, lab, (x,)) < TOL


def test_hooked_module_is_not_trusted() -> None:
    model, x = ZOO["mlp2_tanh"]()
    model[1].register_forward_hook(lambda m, args, out: out.flip(-1))
    lab = label_model(model, (x,))
    assert lab.coupled_sets == {}
