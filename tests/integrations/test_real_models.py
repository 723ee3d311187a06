"""label_model on real-world model families, built from configs with random initialisation (no
weights are downloaded): torchvision's ResNet-18, MobileNetV3-Small and SqueezeNet 1.1, timm's
ViT-Tiny, ResNet-10t and ConvNeXt-Atto, and transformers' GPT-2 and BERT.

Each test labels the model with and without example inputs and checks two things:

* the claimed symmetry is real: a random element of the group the labelling claims (a random
  permutation of every coupled neuron set, applied to parameters and buffers by
  ``permute_model_``) leaves the model's outputs unchanged up to rounding (the models run in
  float64, so rounding is far below :data:`TOL` and a wrong coupling far above it);
* the labelling finds as much structure as it did when these tests were written: the fraction of
  parameter tensors coupled with another tensor is at least a floor just below the fraction
  measured then (the counts are in each test's docstring), so a regression fails the test.

A family whose package is missing, or fails to import, is skipped. (torchvision's wheels for
x86-64 Linux on PyPI are CUDA builds whose compiled ops do not load next to a CPU-only torch,
and ``import torchvision`` then raises; timm imports torchvision, and transformers imports an
installed torchvision too, so a broken one skips those families as well.)
"""

from __future__ import annotations

import copy
import importlib
import warnings
from collections import defaultdict
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

from nfopt.labelling import label_model, permute_model_
from nfopt.labelling.permutation import ModelLabelling
from nfopt.weight_space import WeightSpaceSpec

TOL = 1e-10
"""The largest relative output change (largest change over largest output, in float64) a correct
labelling may show under a group element: rounding only."""

WITH_AND_WITHOUT = pytest.mark.parametrize("shaped", [True, False], ids=["with_inputs", "without_inputs"])


def require(name: str) -> ModuleType:
    """The package, or a skip when it is missing or fails to import (``pytest.importorskip``
    catches only ImportError; a torchvision whose compiled ops do not load raises RuntimeError)."""
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any failure to import means the family cannot run here
        pytest.skip(f"{name} cannot be imported here ({type(e).__name__}: {e})")


def coupled_tensors(spec: WeightSpaceSpec) -> tuple[int, int]:
    """(coupled, total): how many parameter tensors have an axis whose label also labels an axis
    of some other tensor, and how many tensors there are."""
    owners: dict[Any, set[int]] = defaultdict(set)
    for i, t in enumerate(spec.tensors):
        for label in t.axes:
            if label is not None:
                owners[label].add(i)
    coupled = sum(
        1 for i, t in enumerate(spec.tensors) if any(label is not None and owners[label] - {i} for label in t.axes)
    )
    return coupled, len(spec.tensors)


def outputs(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output (a tensor, a tuple, or a transformers
    ModelOutput, which is a dict), in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in outputs(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in outputs(o)]
    return []


def output_change(model: nn.Module, inputs: tuple, labelling: ModelLabelling, seed: int = 0) -> float:
    """The largest relative output change (over the output's largest entry) when a random group
    element of the labelling is applied to a copy of the model (eval mode, no grad)."""
    moved = copy.deepcopy(model)
    permute_model_(moved, labelling, labelling.random_permutation(torch.Generator().manual_seed(seed)))
    with torch.no_grad():
        before, after = outputs(model(*inputs)), outputs(moved(*inputs))
    assert before and len(before) == len(after)
    worst = 0.0
    for y, y_moved in zip(before, after, strict=True):
        scale = y.abs().max().clamp_min(torch.finfo(y.dtype).tiny)
        worst = max(worst, float((y_moved - y).abs().max() / scale))
    return worst


def check(
    build: Callable[[], nn.Module],
    inputs: tuple,
    shaped: bool,
    floor: float,
    warns: str | None = None,
) -> None:
    """Label the model (with ``inputs`` as examples when ``shaped``), then assert the coupled
    fraction is at least ``floor`` and a random group element leaves the outputs unchanged.
    ``warns``, when given, is text that one of label_model's warnings must contain."""
    torch.manual_seed(0)
    model = build().double().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labelling = label_model(model, inputs if shaped else None)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    for m in messages:
        print(f"label_model warned: {m}")  # shown with -rP / -s: what the labelling did not understand
    if warns is not None:
        assert any(warns in m for m in messages), messages

    coupled, total = coupled_tensors(labelling.params)
    print(f"coupled {coupled} of {total} parameter tensors, {len(labelling.coupled_sets)} coupled sets")
    assert coupled / total >= floor, f"only {coupled} of {total} parameter tensors coupled (floor {floor:.0%})"

    if labelling.coupled_sets:
        change = output_change(model, inputs, labelling)
        print(f"largest relative output change under a group element: {change:.3g}")
        assert change <= TOL, f"a random group element changed the outputs by {change:.3g} of their scale"


def images() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64),)


def token_ids() -> tuple[torch.Tensor]:
    return (torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1)),)


# --------------------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------------------


@WITH_AND_WITHOUT
def test_torchvision_resnet18(shaped: bool) -> None:
    """resnet18(num_classes=10). Measured 61 of 62 tensors coupled with inputs (only fc.bias, on
    the output, is not), 54 of 62 without (layer4's last BatchNorms, downsample BN and fc stay
    apart: the flatten before fc needs shapes). Largest output change 6e-7 in float32."""
    tv = require("torchvision")
    check(lambda: tv.models.resnet18(weights=None, num_classes=10), images(), shaped, 0.95 if shaped else 0.85)


@WITH_AND_WITHOUT
def test_torchvision_mobilenet_v3_small(shaped: bool) -> None:
    """mobilenet_v3_small(num_classes=10): depthwise convs, squeeze-excitation, hardswish.
    Measured 141 of 142 tensors coupled with inputs, 139 of 142 without. Largest output change
    8e-7 in float32."""
    tv = require("torchvision")
    check(lambda: tv.models.mobilenet_v3_small(weights=None, num_classes=10), images(), shaped, 0.97 if shaped else 0.95)


@WITH_AND_WITHOUT
def test_torchvision_squeezenet1_1(shaped: bool) -> None:
    """squeezenet1_1(num_classes=10): Fire modules concatenate two convs' channels. Measured 34 of
    52 tensors coupled with and without inputs (the expand convs' biases and the final classifier
    conv stay apart). Largest output change 7e-7 in float32."""
    tv = require("torchvision")
    check(lambda: tv.models.squeezenet1_1(weights=None, num_classes=10), images(), shaped, 0.63)


# --------------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------------


@WITH_AND_WITHOUT
def test_timm_vit_tiny(shaped: bool) -> None:
    """vit_tiny_patch16_224 at img_size=32, patch_size=4, num_classes=10. Measured 36 of 152
    tensors coupled, with or without inputs: only each block's MLP hidden neurons (fc1 weight and
    bias, fc2 weight); the residual stream, attention and norms stay apart. Largest output change
    1e-6 in float32."""
    timm = require("timm")
    build = lambda: timm.create_model(  # noqa: E731
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=4
    )
    check(build, images(), shaped, 0.22)


class TimmStyleAttention(nn.Module):
    """timm's ViT attention as timm writes it: one fused qkv Linear, a reshape into (3, heads,
    head_dim), a permute, unbind, ``scaled_dot_product_attention``, an output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class TimmStyleBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), TimmStyleAttention(dim, heads), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmStyleViT(nn.Module):
    """A ViT written out as timm's VisionTransformer computes it (patch conv, class token,
    position embedding, pre-norm blocks, final norm, head on the class token): timm itself needs
    torchvision, which does not import here, so this keeps its structure under test."""

    def __init__(self, dim: int = 32, heads: int = 2, depth: int = 3, patch: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (32 // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*(TimmStyleBlock(dim, heads) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


@WITH_AND_WITHOUT
def test_timm_style_vit(shaped: bool) -> None:
    """:class:`TimmStyleViT`. Measured 40 of 44 tensors coupled with inputs (the residual stream
    through the patch conv, tokens, norms, attention and MLPs; the three packed qkv biases and the
    head's bias stay apart), 9 of 44 without (the MLPs' hidden neurons: the tokens' concatenation
    and the reshapes need shapes)."""
    check(TimmStyleViT, images(), shaped, 0.88 if shaped else 0.2)


@WITH_AND_WITHOUT
def test_timm_resnet10t(shaped: bool) -> None:
    """resnet10t (num_classes=10): a deep stem and average-pool downsampling. Measured 43 of 44
    tensors coupled with inputs, 38 of 44 without. Largest output change 3e-7 in float32."""
    timm = require("timm")
    check(lambda: timm.create_model("resnet10t", pretrained=False, num_classes=10), images(), shaped,
          0.95 if shaped else 0.84)


@WITH_AND_WITHOUT
def test_timm_convnext_atto(shaped: bool) -> None:
    """convnext_atto (num_classes=10): depthwise 7x7 convs, channels-last LayerNorm, layer scale.
    Measured 127 of 128 tensors coupled with inputs, 36 of 128 without (without shapes only the
    blocks' MLP hidden neurons couple). Largest output change 1e-6 in float32."""
    timm = require("timm")
    check(lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=10), images(), shaped,
          0.97 if shaped else 0.27)


# --------------------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------------------


def quiet(transformers: ModuleType) -> None:
    transformers.logging.set_verbosity_error()


@WITH_AND_WITHOUT
def test_transformers_gpt2(shaped: bool) -> None:
    """GPT2LMHeadModel(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32) on
    input_ids. The model does not trace with torch.fx; with inputs, torch.export gives its ATen
    graph, labelled whole. Measured 26 of 28 tensors coupled with inputs: the residual stream
    (the embeddings' columns, every LayerNorm, attention's c_attn input rows and c_proj outputs,
    the MLP's ends, lm_head tied to wte) and each block's MLP hidden neurons; only the c_attn
    biases stay apart (c_attn's outputs are the packed q/k/v, which the split pins). 0 without
    inputs (label_model says it cannot trace the model). Largest output change 4e-16 in float64."""
    transformers = require("transformers")
    quiet(transformers)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0, use_cache=False
    )
    check(lambda: transformers.GPT2LMHeadModel(config), token_ids(), shaped, 0.9 if shaped else 0.0,
          warns=None if shaped else "cannot be traced")


@WITH_AND_WITHOUT
def test_transformers_bert(shaped: bool) -> None:
    """BertModel(hidden_size=32, 2 layers, 2 heads, intermediate_size=64, vocab_size=100) on
    input_ids, labelled from its exported graph with inputs (fx cannot trace it). Measured 6 of 39
    tensors coupled with inputs: each layer's intermediate hidden neurons (intermediate.dense's
    rows and bias, output.dense's columns). The residual stream is the model's output
    (last_hidden_state), so it is pinned: embeddings, LayerNorms and the attention projections'
    input and output features stay apart, as they must. 0 without inputs. Largest output change
    2e-16 in float64."""
    transformers = require("transformers")
    quiet(transformers)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32,
    )
    check(lambda: transformers.BertModel(config), token_ids(), shaped, 0.15 if shaped else 0.0,
          warns=None if shaped else "cannot be traced")


@WITH_AND_WITHOUT
def test_transformers_bert_for_sequence_classification(shaped: bool) -> None:
    """BertForSequenceClassification (the BERT above, num_labels=3): here the residual stream
    ends in the pooler and classifier, so it couples. Measured 34 of 41 tensors coupled with
    inputs (only the query, key and value biases, whose rows the per-head view pins, and the
    classifier's bias, on the output, stay apart), 0 without. Largest output change 3e-16 in
    float64."""
    transformers = require("transformers")
    quiet(transformers)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=3,
    )
    check(lambda: transformers.BertForSequenceClassification(config), token_ids(), shaped, 0.8 if shaped else 0.0,
          warns=None if shaped else "cannot be traced")


def test_transformers_gpt2_is_coupled() -> None:
    """What drop-in use on GPT-2 needs: most of its tensors coupled (the MLP hidden units and the
    residual stream, as a torch.nn transformer gets), with the outputs unchanged."""
    transformers = require("transformers")
    quiet(transformers)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0, use_cache=False
    )
    check(lambda: transformers.GPT2LMHeadModel(config), token_ids(), True, 0.5)
