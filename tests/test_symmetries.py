"""Property tests of the symmetry framework (glmc_mini.spaces / glmc_mini.symmetries).

Every transform the framework offers must leave the model's function unchanged. Hypothesis draws
tiny random architectures of all three families (nn.Sequential MLP, timm VisionTransformer, HF
GPT2LMHeadModel) in the variants users have, randomises LayerNorm gains / biases and LayerScale
gammas, and checks outputs to 1e-4 relative (max |diff| / max |output|) in float32 on CPU.

The architecture strategies and ``assert_same_function`` are shared with tests/test_canonical.py.
"""
import math
import os
import re

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings, strategies as st

import glmc_mini as gm
from glmc_mini.spaces import UnsupportedModelError
from glmc_mini.symmetries import (Invertible, Orthogonal, Permutation, SemiPermutation, compose_transforms,
                                  identity_transforms, invert_transforms, ones_complement)

ALL = ("perm", "semi", "orth", "inv")
RTOL = 1e-4
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_SCALE = float(os.environ.get("GLMC_TEST_EXAMPLES_SCALE", "1"))  # e.g. 10 for a deeper (slower) run


def examples(n):
    """``max_examples`` for a property test: n per run by default (the suite stays fast)."""
    return max(1, int(n * _SCALE))

WIDTHS = (8, 12, 16, 24, 32)
VOCAB, SEQ, IMG = 37, 10, 8


# --------------------------------------------------------------------------- helpers

def outputs(model, x):
    """Logits of a model in eval mode (GPT-2: ``.logits`` for input ids)."""
    model.eval()
    with torch.no_grad():
        if isinstance(model, _gpt2_class()):
            return model(input_ids=x).logits
        return model(x)


def assert_same_function(model_a, model_b, x, rtol=RTOL):
    """Outputs of ``model_b`` equal those of ``model_a`` on ``x`` to ``rtol`` relative:
    max |out_b - out_a| / max |out_a|. On failure the largest deviation and its output index are
    printed and put in the assertion message."""
    ya, yb = outputs(model_a, x), outputs(model_b, x)
    assert ya.shape == yb.shape, f"output shapes differ: {tuple(ya.shape)} vs {tuple(yb.shape)}"
    diff = (ya - yb).abs()
    worst, scale = diff.max().item(), ya.abs().max().item()
    rel = worst / max(scale, 1e-30)
    if not rel <= rtol:  # also catches nan
        idx = tuple(int(i) for i in torch.unravel_index(torch.argmax(torch.nan_to_num(diff, nan=math.inf)),
                                                       diff.shape))
        msg = (f"outputs differ: largest deviation {worst:.3e} at output index {idx} "
               f"(reference {ya[idx].item():.6g}, transformed {yb[idx].item():.6g}); relative {rel:.3e} > "
               f"{rtol:g} (max |reference output| {scale:.3e}, output shape {tuple(ya.shape)})")
        print(msg)
        raise AssertionError(msg)
    return rel


def assert_same_params(model_a, model_b, rtol=RTOL):
    """Equal state dicts (same keys, shapes; values to ``rtol`` of each tensor's scale)."""
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape, f"{k}: shape {tuple(sa[k].shape)} vs {tuple(sb[k].shape)}"
        if sa[k].is_floating_point():
            dev = (sa[k] - sb[k]).abs().max().item() if sa[k].numel() else 0.0
            tol = rtol * max(1.0, sa[k].abs().max().item() if sa[k].numel() else 0.0)
            assert dev <= tol, f"parameter {k} differs by {dev:.3e} (> {tol:.1e})"
        else:
            assert torch.equal(sa[k], sb[k]), k


def snapshot(model):
    """Everything a public call must leave untouched: the full state dict and GPT-2 tied-ness."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, is_tied(model),
            getattr(getattr(model, "config", None), "tie_word_embeddings", None), model.training)


def assert_unchanged(model, snap):
    state, tied, tie_flag, training = snap
    now = model.state_dict()
    assert now.keys() == state.keys(), "the input model's parameter names changed"
    for k, v in state.items():
        assert now[k].shape == v.shape, f"input parameter {k} changed shape"
        same = torch.equal(now[k], v) or (v.is_floating_point() and  # nan == nan here
                                           torch.allclose(now[k], v, rtol=0, atol=0, equal_nan=True))
        assert same, f"input parameter {k} was modified"
    assert is_tied(model) == tied, "the input model's embedding tying changed"
    assert getattr(getattr(model, "config", None), "tie_word_embeddings", None) == tie_flag
    assert model.training == training


def is_tied(model):
    if isinstance(model, _gpt2_class()):
        return model.lm_head.weight is model.transformer.wte.weight
    return None


def _gpt2_class():
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel


# --------------------------------------------------------------------------- architectures

def _heads_for(d):
    return [h for h in (1, 2, 3, 4, 8) if d % h == 0 and d // h >= 2]


@st.composite
def vit_archs(draw, act=None):
    d = draw(st.sampled_from(WIDTHS))
    pool = draw(st.sampled_from(["token", "avg"]))
    return dict(
        family="vit", embed_dim=d, num_heads=draw(st.sampled_from(_heads_for(d))),
        depth=draw(st.integers(1, 3)), mlp_ratio=draw(st.sampled_from([0.5, 1.0, 4 / 3, 2.0, 2.5, 4.0])),
        qkv_bias=draw(st.booleans()), init_values=draw(st.sampled_from([None, 0.5])),
        act=act or draw(st.sampled_from(["relu", "gelu"])), global_pool=pool,
        class_token=True if pool == "token" else draw(st.booleans()),
        fc_norm=draw(st.sampled_from([None, True, False])), reg_tokens=draw(st.sampled_from([0, 0, 1])),
        no_embed_class=draw(st.booleans()), proj_bias=draw(st.sampled_from([True, True, False])),
        patch_size=draw(st.sampled_from([2, 4])))


@st.composite
def gpt2_archs(draw, act=None):
    d = draw(st.sampled_from(WIDTHS))
    return dict(
        family="gpt2", n_embd=d, n_head=draw(st.sampled_from(_heads_for(d))), n_layer=draw(st.integers(1, 3)),
        n_inner=draw(st.one_of(st.none(), st.integers(4, 40))),
        activation_function=act or draw(st.sampled_from(["relu", "gelu_new"])),
        tie_word_embeddings=draw(st.booleans()))


@st.composite
def mlp_archs(draw, act=None):
    depth = draw(st.integers(1, 3))
    return dict(family="mlp", hidden=[draw(st.integers(8, 32)) for _ in range(depth)],
                acts=[act or draw(st.sampled_from(["relu", "gelu"])) for _ in range(depth)],
                bias=draw(st.booleans()), flatten=draw(st.booleans()))


def any_arch(act=None):
    return st.one_of(vit_archs(act), gpt2_archs(act), mlp_archs(act))


def transformer_arch(act=None):
    return st.one_of(vit_archs(act), gpt2_archs(act))


seeds = st.integers(0, 2 ** 16)


def build(arch, seed=0):
    """A model of ``arch`` (eval mode) with random weights, norm gains/biases and LayerScale gammas."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _construct(arch)
        _randomise(model, arch)
    return model.eval()


def _construct(arch):
    a = dict(arch)
    family = a.pop("family")
    if family == "mlp":
        layers, width = ([nn.Flatten()] if a["flatten"] else []), 6
        for h, act in zip(a["hidden"], a["acts"]):
            layers += [nn.Linear(width, h, bias=a["bias"]), nn.ReLU() if act == "relu" else nn.GELU()]
            width = h
        return nn.Sequential(*layers, nn.Linear(width, 4))
    if family == "vit":
        from timm.models.vision_transformer import VisionTransformer
        act = nn.ReLU if a.pop("act") == "relu" else nn.GELU
        return VisionTransformer(img_size=IMG, in_chans=3, num_classes=5, act_layer=act, **a)
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=VOCAB, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None, **a)
    return GPT2LMHeadModel(config)


def _randomise(model, arch):
    if arch["family"] == "mlp":
        return
    d = arch.get("embed_dim") or arch.get("n_embd")
    norms = {id(m.weight) for m in model.modules() if isinstance(m, nn.LayerNorm) and m.weight is not None}
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.LayerNorm) and m.bias is not None}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in norms:  # gains of either sign, bounded away from 0
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5) * (torch.randint(0, 4, p.shape) > 0).float()
                        .mul(2).sub(1))
            elif id(p) in norm_biases:
                p.normal_(0.0, 0.5)
            elif name.endswith(".gamma"):
                p.uniform_(0.3, 1.5)
            else:  # unit-scale activations: attention is far from uniform, so qk maps matter
                p.normal_(0.0, 1.0 / math.sqrt(d))


def inputs(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    if arch["family"] == "vit":
        return torch.randn(3, 3, IMG, IMG, generator=g)
    if arch["family"] == "gpt2":
        return torch.randint(0, VOCAB, (2, SEQ), generator=g)
    return torch.randn(5, 6, generator=g)


def check_transformed(model, transforms, arch, reference=None):
    """apply_transforms leaves ``model`` untouched, returns the same class, same function."""
    snap = snapshot(model)
    new = gm.apply_transforms(model, transforms)
    assert_unchanged(model, snap)
    assert type(new) is type(model)
    assert_same_function(reference if reference is not None else model, new, inputs(arch))
    return new


# --------------------------------------------------------------------------- the helper itself

def test_assert_same_function_reports_where():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    other = gm.apply_transforms(model, {})
    with torch.no_grad():
        other[2].bias[3] += 1.0
    with pytest.raises(AssertionError, match=r"largest deviation 1\.000e\+00 at output index \(\d, 3\)"):
        assert_same_function(model, other, torch.randn(5, 6))


# --------------------------------------------------------------------------- function preservation

@settings(max_examples=examples(25), **SETTINGS)
@given(arch=any_arch(), seed=seeds, tseed=seeds, canonical=st.booleans())
def test_permutations_preserve_function(arch, seed, tseed, canonical):
    model = build(arch, seed)
    base = gm.canonicalize(model) if canonical else model
    snap = snapshot(model)
    spec = gm.build_spec(base)
    assert_unchanged(model, snap)
    T = gm.random_transforms(spec, ("perm",), seed=tseed)
    assert T.keys() == spec.spaces.keys() - {n for n, s in spec.spaces.items() if s.kind in ("qk", "ov")}
    assert all(isinstance(t, Permutation) for t in T.values())
    new = check_transformed(base, T, arch, reference=model)
    if arch["family"] == "gpt2":  # a permutation keeps tied embeddings tied
        assert is_tied(new) == is_tied(base)


@settings(max_examples=examples(15), **SETTINGS)
@given(arch=any_arch(act="relu"), seed=seeds, tseed=seeds)
def test_scaled_permutations_of_relu_units(arch, seed, tseed):
    model = build(arch, seed)
    spec = gm.build_spec(model)
    T = gm.random_transforms(spec, ("perm", "semi"), seed=tseed)
    relu_spaces = [n for n, s in spec.spaces.items() if s.kind in ("ffn", "hidden")]
    assert relu_spaces and all(isinstance(T[n], SemiPermutation) for n in relu_spaces)
    assert all(not bool((T[n].scale == 1).all()) for n in relu_spaces)  # really rescaled
    check_transformed(model, T, arch)


@settings(max_examples=examples(15), **SETTINGS)
@given(arch=st.one_of(mlp_archs(), vit_archs("relu"), gpt2_archs("relu")), seed=seeds, tseed=seeds,
       extra=st.lists(st.integers(0, 12), min_size=3, max_size=3))
def test_widening_by_splitting(arch, seed, tseed, extra):
    """Semi-permutations n -> m > n split ReLU units (FFN / MLP hidden); the wider model has the
    same output. GELU hidden layers get a permutation."""
    model = build(arch, seed)
    spec = gm.build_spec(model)
    g = torch.Generator().manual_seed(tseed)
    T, widths = {}, {}
    for i, name in enumerate(n for n, s in spec.spaces.items() if s.kind in ("ffn", "hidden")):
        n = spec.spaces[name].size
        if "semi" in spec.spaces[name].classes:
            T[name] = SemiPermutation.random(n, n + extra[i % 3], generator=g)
        else:
            T[name] = Permutation.random(n, generator=g)
        widths[name] = T[name].m
    new = check_transformed(model, T, arch)
    if arch["family"] == "gpt2":
        assert model.config.n_inner == arch["n_inner"]  # the input's config is untouched
    new_spec = gm.build_spec(new)
    for name, m in widths.items():
        assert new_spec.spaces[name].size == m
    if arch["family"] == "gpt2" and len(set(widths.values())) == 1:
        assert new.config.n_inner == next(iter(widths.values()))


@settings(max_examples=examples(20), **SETTINGS)
@given(arch=any_arch(), seed=seeds, tseed=seeds)
def test_orthogonal_residual_maps_on_canonical_models(arch, seed, tseed):
    model = build(arch, seed)
    canon = gm.canonicalize(model)
    spec = gm.build_spec(canon)
    T = gm.random_transforms(spec, ("perm", "orth"), seed=tseed)
    if arch["family"] != "mlp":
        O = T["residual"]
        assert isinstance(O, Orthogonal) and O.fixes_ones()
        assert not torch.allclose(O.O, torch.eye(O.n), atol=0.1)  # not a near-identity
    new = check_transformed(canon, T, arch, reference=model)
    if arch["family"] != "mlp":
        assert gm.is_canonical(new)  # O 1 = 1 keeps writers centred and gains at 1


@settings(max_examples=examples(15), **SETTINGS)
@given(arch=transformer_arch(), seed=seeds, tseed=seeds, canonical=st.booleans())
def test_invertible_per_head_maps(arch, seed, tseed, canonical):
    """Per-head invertible maps need no canonical form (they only touch qkv and the projection)."""
    model = build(arch, seed)
    base = gm.canonicalize(model) if canonical else model
    spec = gm.build_spec(base)
    T = gm.random_transforms(spec, ("perm", "inv"), seed=tseed)
    inv = [n for n, s in spec.spaces.items() if s.kind in ("qk", "ov")]
    assert inv and all(isinstance(T[n], Invertible) for n in inv)
    check_transformed(base, T, arch, reference=model)


@settings(max_examples=examples(20), **SETTINGS)
@given(arch=any_arch(), seed=seeds, tseed=seeds)
def test_all_classes_together(arch, seed, tseed):
    model = build(arch, seed)
    canon = gm.canonicalize(model)
    T = gm.random_transforms(gm.build_spec(canon), ALL, seed=tseed)
    check_transformed(canon, T, arch, reference=model)


@settings(max_examples=examples(15), **SETTINGS)
@given(arch=any_arch(), seed=seeds, s1=seeds, s2=seeds,
       sym1=st.sampled_from([("perm",), ALL, ("perm", "inv")]), sym2=st.sampled_from([("perm",), ALL]))
def test_compose_and_invert(arch, seed, s1, s2, sym1, sym2):
    """T then T^-1 gives back the parameters; compose(T2, T1) at once equals T1 then T2 (also across
    nested classes: permutation ∘ orthogonal, permutation ∘ semi-permutation, ...)."""
    canon = gm.canonicalize(build(arch, seed))
    spec = gm.build_spec(canon)
    T1 = gm.random_transforms(spec, sym1, seed=s1)
    T2 = gm.random_transforms(spec, sym2, seed=s2)
    one = gm.apply_transforms(canon, T1)
    assert_same_params(canon, gm.apply_transforms(one, invert_transforms(T1)))
    both = gm.apply_transforms(one, T2)
    at_once = gm.apply_transforms(canon, compose_transforms(T2, T1))
    assert_same_params(both, at_once)
    assert_same_function(canon, at_once, inputs(arch))
    # the identity element changes nothing
    assert_same_params(canon, gm.apply_transforms(canon, identity_transforms(spec)), rtol=0)


# --------------------------------------------------------------------------- deterministic cases

def _vit(**kw):
    arch = dict(family="vit", embed_dim=16, num_heads=4, depth=2, mlp_ratio=2.0, qkv_bias=True, init_values=0.5,
                act="relu", global_pool="token", class_token=True, fc_norm=None, reg_tokens=0,
                no_embed_class=False, proj_bias=True, patch_size=4)
    arch.update(kw)
    return arch


def _gpt2(**kw):
    arch = dict(family="gpt2", n_embd=16, n_head=4, n_layer=2, n_inner=None, activation_function="relu",
                tie_word_embeddings=True)
    arch.update(kw)
    return arch


def test_random_transforms_is_seeded():
    spec = gm.build_spec(build(_vit()))
    a, b = gm.random_transforms(spec, ALL, seed=3), gm.random_transforms(spec, ALL, seed=3)
    c = gm.random_transforms(spec, ALL, seed=4)
    assert a.keys() == b.keys() == spec.spaces.keys()
    for k in a:
        assert torch.equal(a[k].out_matrix(), b[k].out_matrix())
    assert not torch.equal(a["residual"].out_matrix(), c["residual"].out_matrix())


def test_permuting_a_tied_gpt2_keeps_it_tied():
    arch = _gpt2(tie_word_embeddings=True)
    model = build(arch, 1)
    assert is_tied(model)
    new = check_transformed(model, gm.random_transforms(gm.build_spec(model), ("perm", "semi", "inv"), 2), arch)
    assert is_tied(new)


def test_widened_gpt2_saves_and_loads(tmp_path):
    from transformers import GPT2LMHeadModel
    arch = _gpt2(tie_word_embeddings=False, n_inner=12)
    model = build(arch, 0)
    g = torch.Generator().manual_seed(0)
    T = {f"ffn.{l}": SemiPermutation.random(12, 20, generator=g) for l in range(2)}
    wide = check_transformed(model, T, arch)
    assert wide.config.n_inner == 20
    wide.save_pretrained(tmp_path)
    assert_same_function(model, GPT2LMHeadModel.from_pretrained(tmp_path), inputs(arch))


def test_compose_is_applied_in_order_for_heads_and_per_head_maps():
    """P2 A2 P1 A1 on the q/k/v blocks: the composed per-head maps follow the first head order."""
    arch = _vit(num_heads=4, depth=1)
    model = build(arch, 0)
    g = torch.Generator().manual_seed(0)
    T1 = {"heads.0": Permutation(torch.tensor([2, 0, 3, 1])), "qk.0": Invertible.random(4, 4, generator=g),
          "ov.0": Invertible.random(4, 4, generator=g)}
    T2 = {"heads.0": Permutation(torch.tensor([1, 3, 0, 2])), "qk.0": Invertible.random(4, 4, generator=g)}
    assert_same_params(gm.apply_transforms(gm.apply_transforms(model, T1), T2),
                       gm.apply_transforms(model, compose_transforms(T2, T1)))
    assert_same_params(model, gm.apply_transforms(gm.apply_transforms(model, T1), invert_transforms(T1)))
    split = {"heads.0": SemiPermutation(torch.tensor([0, 1, 2, 3, 0]), share=torch.tensor([.5, 1, 1, 1, .5]))}
    with pytest.raises(ValueError, match="head-splitting"):
        compose_transforms({"qk.0": Invertible.random(5, 4, generator=g)}, split)


# --------------------------------------------------------------------------- the classes themselves

@pytest.mark.parametrize("n", [2, 3, 8, 17, 64])
def test_orthogonal_random_is_orthogonal_and_fixes_ones(n):
    g = torch.Generator().manual_seed(n)
    I = torch.eye(n)
    O = Orthogonal.random(n, generator=g)
    assert O.O.dtype == torch.float32
    assert torch.allclose(O.O.T @ O.O, I, atol=1e-5) and torch.allclose(O.O @ O.O.T, I, atol=1e-5)
    assert O.fixes_ones(atol=1e-5)
    assert torch.allclose(O.O @ torch.ones(n), torch.ones(n), atol=1e-5)
    acc = Orthogonal.identity(n)
    for _ in range(10):
        acc = Orthogonal.random(n, generator=g).compose(acc)
    assert torch.allclose(acc.O.T @ acc.O, I, atol=1e-5) and acc.fixes_ones(atol=1e-5)
    assert torch.allclose(acc.inverse().compose(acc).O, I, atol=1e-5)
    free = Orthogonal.random(n, generator=g, fix_ones=False)
    assert torch.allclose(free.O.T @ free.O, I, atol=1e-5)
    if n > 2:
        assert not free.fixes_ones()


@pytest.mark.parametrize("n,m", [(2, 3), (8, 12), (12, 32), (16, 16), (5, 64)])
def test_rectangular_orthogonal(n, m):
    O = Orthogonal.random(n, m, generator=torch.Generator().manual_seed(m))
    assert O.O.shape == (m, n) and (O.n, O.m) == (n, m)
    assert torch.allclose(O.O.T @ O.O, torch.eye(n), atol=1e-5)  # orthonormal columns
    assert torch.allclose(O.O @ (torch.ones(n) / math.sqrt(n)), torch.ones(m) / math.sqrt(m), atol=1e-5)
    assert O.fixes_ones(atol=1e-5)
    # writers carry sqrt(m/n) O: the per-coordinate RMS of a vector is kept
    v = torch.randn(n, generator=torch.Generator().manual_seed(0))
    assert torch.allclose((O.out_matrix() @ v).pow(2).mean(), v.pow(2).mean(), rtol=1e-4)
    if m > n:
        with pytest.raises(ValueError, match="no inverse"):
            O.inverse()


def test_ones_complement_is_an_orthonormal_basis_of_ones_perp():
    for n in (2, 5, 16):
        Q = ones_complement(n)
        assert Q.shape == (n, n - 1)
        assert torch.allclose(Q.T @ Q, torch.eye(n - 1, dtype=Q.dtype), atol=1e-12)
        assert torch.allclose(Q.T @ torch.ones(n, dtype=Q.dtype), torch.zeros(n - 1, dtype=Q.dtype), atol=1e-12)


@pytest.mark.parametrize("H,hd", [(1, 2), (4, 4), (3, 8), (8, 16)])
def test_invertible_random_is_well_conditioned(H, hd):
    A = Invertible.random(H, hd, generator=torch.Generator().manual_seed(H * hd))
    assert A.A.shape == (H, hd, hd)
    cond = torch.linalg.cond(A.A.double())
    assert (cond <= 4.0 * (1 + 1e-4)).all(), cond.max()
    eye = torch.eye(hd).expand(H, hd, hd)
    assert torch.allclose(A.inverse().A @ A.A, eye, atol=1e-5)
    assert torch.allclose(A.inv_t().transpose(-1, -2) @ A.A, eye, atol=1e-5)
    assert torch.allclose(A.inverse().compose(A).A, eye, atol=1e-5)
    assert (A.n, A.m) == (H * hd, H * hd)


def _transform_zoo(g):
    perm = Permutation.random(6, generator=g)
    return [perm, Permutation.identity(6), SemiPermutation.random(6, generator=g),
            SemiPermutation.random(6, 9, generator=g), SemiPermutation.identity(6), Orthogonal.random(6, generator=g),
            Orthogonal.random(6, generator=g, fix_ones=False), Invertible.random(3, 2, generator=g)]


@pytest.mark.parametrize("unit", [1, 3])
def test_apply_matches_the_matrices(unit):
    """``apply`` along any axis = kron(matrix, I_unit) along it, and in^T out = I (square maps and
    splitting semi-permutations)."""
    g = torch.Generator().manual_seed(unit)
    for T in _transform_zoo(g):
        if isinstance(T, Invertible) and unit > 1:
            continue
        x = torch.randn(4, T.n * unit, 5, generator=g)
        for role in ("out", "in"):
            R = torch.kron(T.matrix(role).contiguous(), torch.eye(unit))
            assert torch.allclose(T.apply(x, 1, role, unit=unit), torch.einsum("mn,anb->amb", R, x), atol=1e-5), \
                (T, role)
        assert torch.allclose(T.in_matrix().T @ T.out_matrix(), torch.eye(T.n), atol=1e-5), T


def test_permutation_and_semi_permutation_algebra():
    g = torch.Generator().manual_seed(0)
    P, Q = Permutation.random(7, generator=g), Permutation.random(7, generator=g)
    assert torch.equal(P.compose(Q).out_matrix(), P.out_matrix() @ Q.out_matrix())
    assert torch.equal(P.inverse().compose(P).perm, torch.arange(7))
    S, U = SemiPermutation.random(7, generator=g), SemiPermutation.random(7, 10, generator=g)
    for second, first in [(S, P), (P, S), (U, S), (U, P)]:
        C = second.compose(first)
        assert torch.allclose(C.out_matrix(), second.out_matrix() @ first.out_matrix(), atol=1e-6)
        assert torch.allclose(C.in_matrix(), second.in_matrix() @ first.in_matrix(), atol=1e-6)
    assert torch.allclose(S.inverse().compose(S).out_matrix(), torch.eye(7), atol=1e-6)
    assert S.inverse().compose(S).is_permutation()
    O = Orthogonal.random(7, generator=g)
    assert torch.allclose(P.compose(O).O, P.out_matrix() @ O.O) and torch.allclose(O.compose(P).O, O.O @ P.out_matrix())
    with pytest.raises(TypeError, match="different classes"):
        O.compose(S)
    with pytest.raises(TypeError, match="different classes"):
        Invertible.random(7, 1, generator=g).compose(P)
    with pytest.raises(ValueError, match="inverse"):
        U.inverse()


def test_semi_permutation_validation():
    with pytest.raises(ValueError, match=r"drops source units \[1\]"):
        SemiPermutation(torch.tensor([0, 0, 2]), n=3)
    with pytest.raises(ValueError, match="scale > 0"):
        SemiPermutation(torch.tensor([0, 1]), scale=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="sum to 1"):
        SemiPermutation(torch.tensor([0, 0, 1]), share=torch.tensor([0.5, 0.6, 1.0]))


# --------------------------------------------------------------------------- bad inputs

class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc((x + self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("model,name", [
    (ResNetish(), "ResNetish"),
    (nn.Conv2d(3, 4, 3), "Conv2d"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)), "Conv2d"),
    (nn.Sequential(nn.Linear(4, 8), nn.Softmax(-1), nn.Linear(8, 2)), "Softmax"),
    (nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)), "BatchNorm1d"),
    (nn.Sequential(nn.ReLU(), nn.Linear(4, 2)), "before any Linear"),
    (nn.Sequential(nn.Linear(4, 2), nn.ReLU()), "at least two Linear"),
])
def test_unsupported_models_are_named(model, name):
    snap = snapshot(model)
    for call in (gm.build_spec, gm.canonicalize, lambda m: gm.apply_transforms(m, {})):
        with pytest.raises(UnsupportedModelError, match=re.escape(name)):
            call(model)
    assert_unchanged(model, snap)


def _timm_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer
    args = dict(img_size=8, patch_size=4, num_classes=3, embed_dim=16, depth=1, num_heads=2)
    args.update(kw)
    return VisionTransformer(**args)


def _unsupported_vits():
    from timm.layers import RmsNorm, SwiGLU
    from timm.models import vision_transformer as vt
    cases = [
        (dict(qk_norm=True), "q_norm"),
        (dict(global_pool="map"), "map"),
        (dict(global_pool="max"), "max"),
        (dict(global_pool=""), "global_pool=''"),
        (dict(pre_norm=True), "norm_pre"),
        (dict(scale_attn_norm=True), "attn.norm"),
        (dict(scale_mlp_norm=True), "mlp.norm"),
        (dict(final_norm=False), "final norm"),
        (dict(norm_layer=RmsNorm), "RmsNorm"),
        (dict(mlp_layer=SwiGLU), "SwiGLU"),
        (dict(embed_norm_layer=nn.LayerNorm), "patch_embed_norm"),
        (dict(act_layer=nn.PReLU), "PReLU"),
    ]
    for block in ("ResPostBlock", "ParallelScalingBlock", "ParallelThingsBlock"):
        if hasattr(vt, block):
            cases.append((dict(block_fn=getattr(vt, block)), block))
    return cases


@pytest.mark.parametrize("kw,name", _unsupported_vits(), ids=lambda v: str(v)[:40])
def test_unsupported_vit_variants_are_named(kw, name):
    model = _timm_vit(**kw)
    with pytest.raises(UnsupportedModelError, match=re.escape(name)):
        gm.build_spec(model)
    with pytest.raises(UnsupportedModelError, match=re.escape(name)):
        gm.canonicalize(model)


def test_gpt2_with_cross_attention_is_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                       add_cross_attention=True, bos_token_id=None, eos_token_id=None))
    with pytest.raises(UnsupportedModelError, match="cross-attention"):
        gm.build_spec(model)


@pytest.mark.parametrize("arch", [_vit(), _gpt2(), _vit(init_values=None, act="gelu"), _gpt2(tie_word_embeddings=False)],
                         ids=["vit", "gpt2-tied", "vit-gelu", "gpt2-untied"])
def test_orthogonal_needs_the_canonical_form(arch):
    model = build(arch, 0)
    spec = gm.build_spec(model)
    O = {"residual": Orthogonal.random(spec.spaces["residual"].size, generator=torch.Generator().manual_seed(0))}
    snap = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"is not 1: .*canonicalize"):
        gm.apply_transforms(model, O)
    assert_unchanged(model, snap)
    canon = gm.canonicalize(model)
    check_transformed(canon, O, arch, reference=model)  # fine once canonical


def test_orthogonal_needs_layerscale_gains_of_one():
    arch = _vit(init_values=0.5)
    canon = gm.canonicalize(build(arch, 0))
    with torch.no_grad():
        canon.blocks[1].ls2.gamma.mul_(2.0)
    O = {"residual": Orthogonal.random(16, generator=torch.Generator().manual_seed(0))}
    with pytest.raises(UnsupportedModelError, match=re.escape("blocks.1.ls2.gamma is not 1")):
        gm.apply_transforms(canon, O)


@pytest.mark.parametrize("arch", [_vit(), _gpt2()], ids=["vit", "gpt2"])
def test_bad_transforms_raise_named_errors(arch):
    model = build(arch, 0)
    canon = gm.canonicalize(model)
    spec = gm.build_spec(canon)
    g = torch.Generator().manual_seed(0)
    d, f = spec.spaces["residual"].size, spec.spaces["ffn.0"].size
    gelu = build(dict(arch, **({"act": "gelu"} if arch["family"] == "vit" else {"activation_function": "gelu_new"})))
    cases = [
        (canon, {"residual": Orthogonal.random(d, generator=g, fix_ones=False)}, UnsupportedModelError, "all-ones"),
        (gelu, {"ffn.0": SemiPermutation.random(gelu_f(gelu), generator=g)}, UnsupportedModelError,
         "semi-permutations are exact only for ReLU"),
        (gelu, {"ffn.0": SemiPermutation.random(gelu_f(gelu), gelu_f(gelu) + 3, generator=g)}, UnsupportedModelError,
         "ReLU"),
        (canon, {"residual": Invertible.random(4, d // 4, generator=g)}, UnsupportedModelError, "qk and ov"),
        (canon, {"ffn.0": Invertible.random(1, f, generator=g)}, UnsupportedModelError, "qk and ov"),
        (canon, {"ffn.0": Orthogonal.random(f, generator=g)}, UnsupportedModelError, "residual stream"),
        (canon, {"qk.0": Permutation.random(d, generator=g)}, UnsupportedModelError, "moves entries between heads"),
        (canon, {"ov.0": Permutation(torch.arange(d).roll(1))}, UnsupportedModelError, "'ov.0' moves entries"),
        (canon, {"residual": SemiPermutation.random(d, generator=g)}, UnsupportedModelError, "'residual'"),
        (canon, {"heads.0": SemiPermutation.random(4, generator=g)}, UnsupportedModelError, "not rescaling"),
        (canon, {"heads.0": SemiPermutation(torch.tensor([0, 1, 2, 3, 0]), share=torch.tensor([.5, 1, 1, 1, .5]))},
         UnsupportedModelError, "cannot change the width of space 'heads.0'"),
        (canon, {"residual": Orthogonal.random(d, d + 4, generator=g)}, UnsupportedModelError,
         "cannot change the width of space 'residual'"),
        (canon, {"residual": Permutation.random(d - 1, generator=g)}, ValueError, "space 'residual' of 16 units"),
        (canon, {"ffn.0": Permutation.random(f // 2, generator=g)}, ValueError, "space 'ffn.0'"),
        (canon, {"qk.0": Invertible.random(2, 8, generator=g)}, ValueError, "in 4 blocks"),
        (canon, {"ffn.7": Permutation.random(f, generator=g)}, KeyError, "unknown space 'ffn.7'"),
        (canon, {"nonexistent": Permutation.random(d, generator=g)}, KeyError, "nonexistent"),
    ]
    for i, (model_, T, err, msg) in enumerate(cases):
        snap = snapshot(model_)
        with pytest.raises(err, match=re.escape(msg)):
            print(f"case {i}: {T} must raise {err.__name__}({msg!r})")
            gm.apply_transforms(model_, T)
        assert_unchanged(model_, snap)
    # a permutation inside each head is a (special) invertible map: allowed, exact
    hd = d // 4
    within = Permutation(torch.cat([h * hd + torch.randperm(hd, generator=g) for h in range(4)]))
    check_transformed(model, {"qk.0": within, "ov.0": within}, arch)


def gelu_f(model):
    return gm.build_spec(model).spaces["ffn.0"].size


def test_mlp_bad_transforms():
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    g = torch.Generator().manual_seed(0)
    with pytest.raises(UnsupportedModelError, match="exact only for ReLU"):
        gm.apply_transforms(model, {"hidden.0": SemiPermutation.random(8, generator=g)})
    with pytest.raises(KeyError, match="residual"):
        gm.apply_transforms(model, {"residual": Orthogonal.random(8, generator=g)})
    # the ReLU layer does take one, widening included
    new = gm.apply_transforms(model, {"hidden.1": SemiPermutation.random(8, 13, generator=g)})
    assert new[4].in_features == 13 and new[2].out_features == 13
    assert_same_function(model, new, torch.randn(5, 6, generator=g))


def test_mlp_activations_are_assigned_to_the_right_hidden_layer():
    """Linear, Linear, GELU, Linear, ReLU, Linear: hidden.0 is linear, hidden.1 GELU, hidden.2 ReLU —
    only hidden.2 may be rescaled."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    spec = gm.build_spec(model)
    assert "semi" not in spec.spaces["hidden.1"].classes
    assert "semi" in spec.spaces["hidden.2"].classes
    T = gm.random_transforms(spec, ("perm", "semi"), seed=0)
    assert_same_function(model, gm.apply_transforms(model, T), torch.randn(5, 6))
    # two element-wise maps in a row: ReLU-like only if both are ReLU
    two = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.ReLU(), nn.Linear(8, 4))
    assert gm.build_spec(two).spaces["hidden.0"].classes == ("perm",)
