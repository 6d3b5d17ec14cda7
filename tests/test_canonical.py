"""Tests of the canonical form (glmc_mini.canonical): function-preserving, still the stock class,
input untouched, loadable as an ordinary timm / Hugging Face model; bad inputs named.

Architectures and helpers come from tests/test_symmetries.py.
"""
import functools
import math
import os
import re
import sys

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import glmc_mini as gm
from glmc_mini.spaces import UnsupportedModelError
from glmc_mini.symmetries import Orthogonal

sys.path.insert(0, os.path.dirname(__file__))
from test_symmetries import (ALL, SETTINGS, _gpt2, _timm_vit, _vit, any_arch, assert_same_function,  # noqa: E402
                             examples,
                             assert_same_params, assert_unchanged, build, check_transformed, inputs, is_tied, seeds,
                             snapshot)


def _residual_writers(spec):
    return [(p, dim) for p, axes in spec.axes.items() for dim, segs in enumerate(axes)
            if segs and segs[0].chain == (("residual", "out"),)]


@settings(max_examples=examples(30), **SETTINGS)
@given(arch=any_arch(), seed=seeds)
def test_canonicalize_preserves_function_and_leaves_input_alone(arch, seed):
    model = build(arch, seed)
    snap = snapshot(model)
    canon = gm.canonicalize(model)
    assert_unchanged(model, snap)
    assert type(canon) is type(model) and canon is not model
    assert_same_function(model, canon, inputs(arch))
    assert gm.is_canonical(canon)
    if arch["family"] == "mlp":
        assert_same_params(model, canon, rtol=0)
        return
    assert not gm.is_canonical(model)  # random gains: the input was not canonical
    spec = gm.build_spec(canon)
    state = canon.state_dict()
    for m in canon.modules():  # every norm gain (and LayerScale gain) is 1
        if isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
    for name, t in state.items():
        if name.endswith(".gamma"):
            assert torch.equal(t, torch.ones_like(t)), name
    for p, dim in _residual_writers(spec):  # every writer is centred
        assert state[p].mean(dim).abs().max() < 1e-5, p
    if arch["family"] == "gpt2":  # untied, and the config says so
        assert not is_tied(canon) and canon.config.tie_word_embeddings is False
        assert canon.lm_head.weight.data_ptr() != canon.transformer.wte.weight.data_ptr()
    # idempotent: the canonical form of a canonical model is itself
    again = gm.canonicalize(canon)
    assert_same_params(canon, again, rtol=1e-5)


@settings(max_examples=examples(10), **SETTINGS)
@given(arch=any_arch(), seed=seeds, tseed=seeds)
def test_canonical_of_a_transformed_model_is_canonical(arch, seed, tseed):
    """Canonicalising after permutations / per-head maps / scaled permutations keeps the function."""
    model = build(arch, seed)
    moved = gm.apply_transforms(model, gm.random_transforms(gm.build_spec(model), ("perm", "semi", "inv"), tseed))
    canon = gm.canonicalize(moved)
    assert gm.is_canonical(canon)
    assert_same_function(model, canon, inputs(arch))


def test_canonicalize_gpt2_save_and_load_roundtrip(tmp_path):
    """A canonical GPT-2 (untied) survives save_pretrained / from_pretrained (safetensors), also after
    an orthogonal map of the residual stream."""
    from transformers import GPT2LMHeadModel
    arch = _gpt2(tie_word_embeddings=True, activation_function="gelu_new", n_inner=24)
    model = build(arch, 3)
    assert is_tied(model)
    canon = gm.canonicalize(model)
    assert is_tied(model) and model.config.tie_word_embeddings  # input untouched
    rotated = check_transformed(canon, gm.random_transforms(gm.build_spec(canon), ALL, seed=5), arch, reference=model)
    for i, m in enumerate((canon, rotated)):
        path = tmp_path / str(i)
        m.save_pretrained(path)
        assert (path / "model.safetensors").exists()
        loaded = GPT2LMHeadModel.from_pretrained(path)
        assert not is_tied(loaded) and loaded.config.tie_word_embeddings is False
        assert_same_params(m, loaded, rtol=0)
        assert_same_function(model, loaded, inputs(arch))


def test_canonical_vit_loads_into_a_fresh_stock_vit():
    from timm.models.vision_transformer import VisionTransformer
    arch = _vit(init_values=0.3, global_pool="avg", class_token=False, reg_tokens=1)
    model = build(arch, 4)
    canon = gm.canonicalize(model)
    kw = {k: v for k, v in arch.items() if k not in ("family", "act")}
    fresh = VisionTransformer(img_size=8, in_chans=3, num_classes=5, act_layer=nn.ReLU, **kw).eval()
    fresh.load_state_dict(canon.state_dict())
    assert_same_function(model, fresh, inputs(arch))


def test_layernorm_without_affine_parameters():
    """A ViT whose norms have no gain / bias (elementwise_affine=False) is canonical after centring."""
    model = _timm_vit(norm_layer=functools.partial(nn.LayerNorm, elementwise_affine=False), init_values=0.5)
    with torch.no_grad():
        for blk in model.blocks:
            blk.ls1.gamma.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    canon = gm.canonicalize(model)
    assert gm.is_canonical(canon)
    assert_same_function(model, canon, x)
    O = {"residual": Orthogonal.random(16, generator=torch.Generator().manual_seed(0))}
    assert_same_function(model, gm.apply_transforms(canon, O), x)


# --------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("arch,param,value", [
    (_vit(), "blocks.1.mlp.fc1.weight", math.nan),
    (_vit(), "pos_embed", math.inf),
    (_gpt2(tie_word_embeddings=True), "transformer.wte.weight", -math.inf),
    (_gpt2(), "transformer.h.0.ln_1.bias", math.nan),
    (dict(family="mlp", hidden=[8, 8], acts=["relu", "gelu"], bias=True, flatten=False), "2.bias", math.nan),
], ids=["vit-nan", "vit-inf", "gpt2-inf", "gpt2-norm-nan", "mlp-nan"])
def test_non_finite_weights_are_named(arch, param, value):
    model = build(arch, 0)
    with torch.no_grad():
        model.get_parameter(param).view(-1)[0] = value
    snap = snapshot(model)
    with pytest.raises(ValueError, match=re.escape(f"parameter {param} has non-finite")):
        gm.canonicalize(model)
    assert_unchanged(model, snap)


def test_zero_gain_cannot_be_folded():
    model = build(_vit(), 0)
    with torch.no_grad():
        model.blocks[0].norm2.weight[3] = 0.0
    with pytest.raises(UnsupportedModelError, match=re.escape("blocks.0.norm2 has a zero gain")):
        gm.canonicalize(model)


def test_vit_without_a_head_is_refused():
    """num_classes=0: the final norm's gain has nowhere to go; dropping it would change the output."""
    model = _timm_vit(num_classes=0)
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    with pytest.raises(UnsupportedModelError, match=re.escape("norm has no reader")):
        gm.canonicalize(model)


def test_spaces_of_a_vit_without_a_head_are_refused():
    """A headless ViT outputs the residual stream: not even a residual permutation keeps its function."""
    with pytest.raises(UnsupportedModelError, match=re.escape("without a head (num_classes=0)")):
        gm.build_spec(_timm_vit(num_classes=0))


def test_canonicalize_rejects_unsupported_models_by_name():
    from timm.models.vision_transformer import ResPostBlock
    for model, name in [(nn.Conv2d(3, 4, 3), "Conv2d"), (_timm_vit(qk_norm=True), "q_norm"),
                        (_timm_vit(block_fn=ResPostBlock), "ResPostBlock"), (_timm_vit(pre_norm=True), "norm_pre"),
                        (_timm_vit(global_pool="map"), "map")]:
        snap = snapshot(model)
        with pytest.raises(UnsupportedModelError, match=re.escape(name)):
            gm.canonicalize(model)
        assert_unchanged(model, snap)


def test_is_canonical_detects_each_violation():
    canon = gm.canonicalize(build(_gpt2(tie_word_embeddings=False), 0))
    assert gm.is_canonical(canon)
    for param, change in [("transformer.h.1.ln_2.weight", lambda t: t.mul_(1.1)),
                          ("transformer.wpe.weight", lambda t: t.add_(0.1)),
                          ("transformer.h.0.mlp.c_proj.bias", lambda t: t.add_(0.1))]:
        bad = gm.apply_transforms(canon, {})
        with torch.no_grad():
            change(bad.get_parameter(param))
        assert not gm.is_canonical(bad), param
    tied = gm.apply_transforms(canon, {})
    tied.lm_head.weight = tied.transformer.wte.weight
    assert not gm.is_canonical(tied)
