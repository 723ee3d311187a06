"""The torch.fx core: which graphs a module traces to, what running them records, and what a
monitored forward sees."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nfopt.labelling.trace import (
    NONTENSOR,
    Traces,
    as_tuple,
    available,
    call_arg,
    exported_graphs,
    exported_shapes,
    has_hooks,
    leaves,
    monitored_forward,
    record_shapes,
)

from ..zoo import ZOO


def targets(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes]


# ---- tracing ------------------------------------------------------------------------------------


class FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.dropout(x, 0.5, self.training))


def test_modes_that_differ_only_in_training_flags_give_one_graph() -> None:
    graphs = Traces().graphs(FunctionalDropout())
    assert graphs is not None and len(graphs) == 1
    assert F.dropout in targets(graphs[0])


def test_a_forward_that_depends_on_the_mode_gives_both_graphs() -> None:
    model, _ = ZOO["train_only_flip"]()
    model.train()
    graphs = Traces().graphs(model)
    assert graphs is not None and len(graphs) == 2
    eval_graph, train_graph = (targets(gm) for gm in graphs)
    assert "flip" not in eval_graph and "flip" in train_graph
    assert model.training and all(m.training for m in model.modules())


def test_an_untraceable_child_is_kept_as_a_leaf() -> None:
    model, _ = ZOO["untraceable_part"]()
    traces = Traces()
    assert traces.graphs(model.gate) is None
    assert traces.graphs(model.gate) is None  # remembered, not traced again
    (gm,) = traces.graphs(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["fc1", "gate", "fc2", "fc3"]


def test_an_untraceable_root_gives_no_graph() -> None:
    model, _ = ZOO["untraceable_root"]()
    assert Traces().graphs(model) is None


def test_a_leaf_module_is_a_graph_that_calls_it() -> None:
    layer = nn.Linear(5, 3)
    (gm,) = Traces().graphs(layer)
    assert [(n.op, n.target) for n in gm.graph.nodes] == [("placeholder", "input"), ("call_module", "leaf"),
                                                          ("output", "output")]
    x = torch.randn(4, 5)
    assert torch.equal(gm(x), layer(x))


def test_a_hooked_root_is_not_traced() -> None:
    model, _ = ZOO["mlp2_tanh"]()
    assert Traces().graphs(model) is not None
    model.register_forward_pre_hook(lambda m, args: None)
    assert has_hooks(model) and not has_hooks(model[0])
    assert Traces().graphs(model) is None


def test_export_gives_aten_graphs_of_both_modes_with_their_shapes() -> None:
    model, x = ZOO["train_only_flip"]()
    model.train()
    graphs = exported_graphs(model, (x,))
    assert graphs is not None and len(graphs) == 2
    eval_graph, train_graph = (targets(gm) for gm in graphs)
    aten = torch.ops.aten
    assert aten.linear.default in eval_graph and aten.flip.default not in eval_graph
    assert aten.flip.default in train_graph
    assert model.training and all(m.training for m in model.modules())
    shapes = {n.name: s for n, s in exported_shapes(graphs[0]).items()}
    assert shapes["x"] == torch.Size([4, 5]) and shapes["fc1_weight"] == torch.Size([6, 5])
    assert shapes["output"] is NONTENSOR


def test_export_gives_no_graph_for_a_hooked_model_or_one_it_fails_on(capsys: pytest.CaptureFixture) -> None:
    model, x = ZOO["untraceable_root"]()  # data-dependent control flow
    assert exported_graphs(model, (x,)) is None
    assert capsys.readouterr().err == ""  # export's account of the failure is not shown
    model, x = ZOO["mlp2_tanh"]()
    model[0].register_forward_hook(lambda m, args, out: None)
    assert exported_graphs(model, (x,)) is None


# ---- running graphs and models ------------------------------------------------------------------


class ViewBySize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


def test_record_shapes_gives_each_node_its_output_shape() -> None:
    model = ViewBySize()
    (gm,) = Traces().graphs(model)
    shapes = record_shapes(gm, model, (torch.zeros(2, 3, 4),))
    by_target = {n.target: shapes[n] for n in gm.graph.nodes}
    assert by_target["x"] == torch.Size([2, 3, 4])
    assert by_target["size"] is NONTENSOR
    assert by_target["view"] == torch.Size([2, 12])


def test_record_shapes_warns_and_gives_none_if_the_model_fails() -> None:
    model, x = ZOO["mlp2_tanh"]()
    (gm,) = Traces().graphs(model)
    with pytest.warns(UserWarning, match="could not run Sequential on the example inputs"):
        assert record_shapes(gm, model, (x.float(),)) is None


class Outside(nn.Module):
    """Runs its children, and uses one of its own parameters and one of a child's outside them."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(5, 6), nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.inner(x)) * self.scale + self.inner.bias.sum()


def test_monitored_forward_records_unit_inputs_and_tensors_used_outside_them() -> None:
    model = Outside()
    model.train()
    x = torch.randn(4, 5)
    watched = {id(p) for p in model.parameters()}
    calls, outside = monitored_forward(model, [model.inner, model.head], (x,), watched)
    assert calls[id(model.inner)][0] is x and calls[id(model.head)][0].shape == (4, 6)
    assert outside == {id(model.scale), id(model.inner.bias)}
    assert model.training and not has_hooks(model.inner) and not has_hooks(model.head)


def test_monitored_forward_reports_a_failing_model() -> None:
    model = Outside()
    with pytest.raises(ValueError, match="the model failed on example_inputs"):
        monitored_forward(model, [model.inner], (torch.randn(4, 7),), set())
    assert not has_hooks(model.inner)


# ---- reading calls and values -------------------------------------------------------------------


def test_leaves_of_nested_values() -> None:
    assert list(leaves((1, [2, {"a": 3}], slice(4, None, 5)))) == [1, 2, 3, 4, None, 5]


def test_example_inputs_as_positional_arguments() -> None:
    x = torch.zeros(2)
    assert as_tuple(None) is None
    assert as_tuple(x)[0] is x and len(as_tuple(x)) == 1
    listed = as_tuple([x, 3])
    assert isinstance(listed, tuple) and len(listed) == 2 and listed[0] is x and listed[1] == 3


def test_call_arg_by_position_name_or_default() -> None:
    assert call_arg((1, 2), {}, 1, "dim") == 2
    assert call_arg((1,), {"dim": 3}, 1, "dim") == 3
    assert call_arg((1,), {}, 1, "dim", 4) == 4


def test_available_skips_what_this_torch_lacks() -> None:
    assert available(torch, "add no_such_function mul") == [torch.add, torch.mul]
