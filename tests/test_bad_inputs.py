"""Bad inputs are refused up front, by name: unsupported models and modules, pairs that are not one
architecture, invalid arguments and data. Each case asserts the exception type and that the
message names the cause. Also the fixes that go with them: learned matching keeps modes and
chooses on held-out batches, single-pass data, the caller's RNG, the profile switch.
Tiny models built from configs (no download)."""
import copy
import functools
import itertools
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import glmc_mini as gm
from glmc_mini.spaces import UnsupportedModelError


# --------------------------------------------------------------------------- tiny models

def vit(seed=0, **kw):
    from timm.models.vision_transformer import VisionTransformer
    args = dict(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2,
                mlp_ratio=2)
    args.update(kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VisionTransformer(**args).eval()


def gpt(seed=0, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel
    args = dict(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    args.update(kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(**args)).eval()


def mlp(seed=0, act=nn.GELU, hidden=8):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), act(), nn.Linear(hidden, 3)).eval()


def img_batches(n=3, size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 8, 8, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def mlp_batches(n=3, size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 64, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def tok_batches(n=3, size=4, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 32, (size, T), generator=g) for _ in range(n)]


def raises(err, pattern, call):
    with pytest.raises(err, match=pattern):
        call()


# --------------------------------------------------------------------------- unsupported models, by name

class Extra(nn.Module):
    def forward(self, x):
        return x


class MyReLU(nn.ReLU):
    def forward(self, x):
        return super().forward(x) * 2


def _distilled():
    from timm.models.deit import VisionTransformerDistilled
    return VisionTransformerDistilled(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1,
                                      num_heads=2)


def _vit_subclass(extra_param):
    from timm.models.vision_transformer import VisionTransformer

    class MyViT(VisionTransformer):
        def __init__(self):
            super().__init__(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2)
            if extra_param:
                self.prompt = nn.Parameter(torch.zeros(1, 1, 16))

    return MyViT()


def _gpt_subclass():
    from transformers import GPT2Config, GPT2LMHeadModel

    class MyGPT(GPT2LMHeadModel):
        pass

    return MyGPT(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=None,
                            eos_token_id=None))


def _with(model, name, module):
    setattr(model, name, module)
    return model


def _vit_with_attention_subclass():
    from timm.models.vision_transformer import Attention

    class MyAttention(Attention):
        pass

    m = vit()
    m.blocks[0].attn = MyAttention(16, num_heads=2, qkv_bias=True)
    return m


def _vit_with_act(act):
    m = vit()
    m.blocks[0].mlp.act = act
    return m


UNSUPPORTED = [
    ("deit-distilled", _distilled, "dist_token"),
    ("deit-distilled-head", _distilled, "head_dist.weight"),
    ("vit-subclass-extra-param", lambda: _vit_subclass(True), "prompt"),
    ("vit-subclass", lambda: _vit_subclass(False), "subclass of VisionTransformer"),
    ("vit-extra-module", lambda: _with(vit(), "adapter", nn.Linear(16, 16)), "adapter.weight"),
    ("vit-extra-buffer", lambda: vit().register_buffer("temperature", torch.ones(1)) or None, None),
    ("vit-attention-subclass", _vit_with_attention_subclass, "MyAttention"),
    ("vit-act-softmax", lambda: _vit_with_act(nn.Softmax(-1)), "Softmax"),
    ("vit-act-prelu", lambda: _vit_with_act(nn.PReLU()), "PReLU"),
    ("vit-act-subclass", lambda: _vit_with_act(MyReLU()), "MyReLU"),
    ("vit-qk-norm", lambda: vit(qk_norm=True), "q_norm"),
    ("vit-post-norm", lambda: vit(block_fn=__import__("timm.models.vision_transformer",
                                                      fromlist=["ResPostBlock"]).ResPostBlock), "ResPostBlock"),
    ("vit-map-pool", lambda: vit(global_pool="map"), "map"),
    ("vit-custom-module", lambda: _with(vit(), "pos_drop", Extra()), "pos_drop is a Extra"),
    ("gpt-subclass", _gpt_subclass, "subclass of GPT2LMHeadModel"),
    ("gpt-extra-module", lambda: _with(gpt(), "value_head", nn.Linear(16, 1)), "value_head.weight"),
    ("gpt-linear-act", lambda: gpt(activation_function="linear"), "LinearActivation"),
    ("gpt-cross-attention", lambda: gpt(add_cross_attention=True), "cross-attention"),
    ("mlp-layernorm", lambda: nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2)),
     "LayerNorm at 1"),
    ("mlp-custom", lambda: nn.Sequential(nn.Linear(4, 8), Extra(), nn.Linear(8, 2)), "Extra"),
    ("mlp-relu-subclass", lambda: nn.Sequential(nn.Linear(4, 8), MyReLU(), nn.Linear(8, 2)), "MyReLU"),
    ("mlp-flatten-inside", lambda: nn.Sequential(nn.Linear(4, 8), nn.Flatten(), nn.Linear(8, 2)), "Flatten at 1"),
    ("mlp-prelu", lambda: nn.Sequential(nn.Linear(4, 8), nn.PReLU(), nn.Linear(8, 2)), "PReLU"),
]


@pytest.mark.parametrize("build,name", [(b, n) for _, b, n in UNSUPPORTED if n],
                         ids=[i for i, _, n in UNSUPPORTED if n])
def test_unsupported_models_are_refused_by_name(build, name):
    model = build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    raises(UnsupportedModelError, re.escape(name), lambda: gm.build_spec(model))
    raises(UnsupportedModelError, re.escape(name), lambda: gm.align(model, copy.deepcopy(model), progress=False))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_an_unplaced_buffer_is_named():
    model = vit()
    model.register_buffer("temperature", torch.ones(1))
    raises(UnsupportedModelError, "temperature", lambda: gm.canonicalize(model))


def test_one_definition_of_an_mlp():
    """What build_spec accepts, model_family (and so barrier / evaluate / learned matching) accepts."""
    for act in (nn.Tanh, nn.SiLU, nn.Sigmoid, nn.ReLU, nn.GELU):
        model = nn.Sequential(nn.Linear(64, 8), act(), nn.Dropout(0.0), nn.Linear(8, 3)).eval()
        assert gm.model_family(model) == "mlp" and gm.build_spec(model).family == "mlp"
        other = nn.Sequential(nn.Linear(64, 8), act(), nn.Dropout(0.0), nn.Linear(8, 3)).eval()
        res = gm.align(model, other, method="learned", data=mlp_batches(), steps=2, progress=False)
        assert gm.barrier(res.model_a, res.model_b, mlp_batches(), num_points=3).barrier == pytest.approx(
            gm.barrier(res.model_a, res.model_b, mlp_batches(), num_points=3).barrier)
    bad = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    raises(TypeError, "LayerNorm", lambda: gm.model_family(bad))


# --------------------------------------------------------------------------- pairs that are not one architecture

PAIRS = [
    ("gpt-activation", lambda: (gpt(), gpt(1, activation_function="relu")), "activation_function"),
    ("gpt-eps", lambda: (gpt(), gpt(1, layer_norm_epsilon=1e-3)), "layer_norm_epsilon"),
    ("gpt-inverse-layer-idx", lambda: (gpt(), gpt(1, scale_attn_by_inverse_layer_idx=True)),
     "scale_attn_by_inverse_layer_idx"),
    ("gpt-scale-weights", lambda: (gpt(), gpt(1, scale_attn_weights=False)), "scale_attn_weights"),
    ("gpt-depth", lambda: (gpt(), gpt(1, n_layer=2)), "n_layer"),
    ("gpt-deeper-a", lambda: (gpt(1, n_layer=2), gpt()), "config.n_layer: 2 vs 1"),
    ("vit-pool", lambda: (vit(), vit(1, global_pool="avg")), "global_pool"),
    ("vit-eps", lambda: (vit(), vit(1, norm_layer=functools.partial(_timm_layer_norm(), eps=1e-3))), "eps"),
    ("vit-act", lambda: (vit(), vit(1, act_layer=nn.ReLU)), "ReLU"),
    ("vit-depth", lambda: (vit(), vit(1, depth=2)), "blocks.1"),
    ("vit-gelu-approximate", lambda: (vit(), _vit_with_act(nn.GELU(approximate="tanh"))), "approximate"),
    ("vit-attn-scale", lambda: (vit(), _scaled(vit(1))), "scale"),
    ("vit-class-token", lambda: (vit(global_pool="avg"), vit(1, global_pool="avg", class_token=False)),
     "num_prefix_tokens"),
    ("mlp-act", lambda: (mlp(), mlp(1, nn.ReLU)), "ReLU"),
    ("mlp-width", lambda: (mlp(), mlp(1, hidden=6)), "1.weight"),
    ("families", lambda: (mlp(), vit()), "different families"),
    ("dtype", lambda: (gpt(), gpt(1).half()), "float16"),
]


def _timm_layer_norm():
    from timm.layers import LayerNorm
    return LayerNorm


def _scaled(model):
    model.blocks[0].attn.scale = 0.5
    return model


@pytest.mark.parametrize("make,name", [(m, n) for _, m, n in PAIRS], ids=[i for i, _, _ in PAIRS])
def test_pairs_that_differ_are_refused_by_name(make, name):
    a, b = make()
    raises(ValueError, re.escape(name), lambda: gm.align(a, b, method="none", progress=False))
    raises(ValueError, re.escape(name), lambda: gm.align(a, b, progress=False))
    if type(a) is type(b):
        raises(ValueError, re.escape(name), lambda: gm.interpolate(a, b, 0.5))


def test_barrier_and_align_many_refuse_pairs_that_differ():
    raises(ValueError, "global_pool", lambda: gm.barrier(vit(), vit(1, global_pool="avg"), img_batches()))
    raises(ValueError, "layer_norm_epsilon",
           lambda: gm.align_many([gpt(), gpt(1), gpt(2, layer_norm_epsilon=1e-3)], progress=False))


# --------------------------------------------------------------------------- models that cannot be used

def _nan(model, value=float("nan")):
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = value
    return model


def _meta():
    with torch.device("meta"):
        return mlp()


def _mixed_dtypes():
    m = mlp()
    m[1].half()
    return m


@pytest.mark.parametrize("make,err,name", [
    (lambda: _nan(mlp(1)), ValueError, "non-finite"),
    (lambda: _nan(gpt(1), float("inf")), ValueError, "transformer.wte.weight has non-finite"),
    (lambda: _nan(vit(1)), ValueError, "non-finite"),
    (_meta, ValueError, "meta device"),
    (_mixed_dtypes, ValueError, "mixes floating dtypes"),
    (lambda: "a model", TypeError, "nn.Module"),
], ids=["nan-mlp", "inf-gpt", "nan-vit", "meta", "mixed-dtypes", "not-a-module"])
def test_models_that_cannot_be_used_are_named(make, err, name):
    b = make()
    a = mlp() if not isinstance(b, nn.Module) or isinstance(b, nn.Sequential) else type(b)  # noqa: E721
    a = {nn.Sequential: mlp}.get(type(b), {"vit": vit, "gpt2": gpt}.get(
        getattr(gm.build_spec(b), "family", None) if isinstance(b, nn.Module) and not isinstance(b, nn.Sequential)
        and not _is_meta(b) else None, mlp))()
    for call in (lambda: gm.align(a, b, method="none", progress=False), lambda: gm.interpolate(a, b, 0.5)):
        raises(err, name, call)


def _is_meta(model):
    return any(p.is_meta for p in model.parameters())


def test_non_finite_weights_in_barrier_and_canonicalize():
    raises(ValueError, "non-finite", lambda: gm.barrier(mlp(), _nan(mlp(1)), mlp_batches()))
    raises(ValueError, "non-finite", lambda: gm.canonicalize(_nan(gpt())))


# --------------------------------------------------------------------------- arguments

ALIGN_ARGS = [
    (dict(steps=0, method="learned"), ValueError, "steps"),
    (dict(steps=-1, method="learned"), ValueError, "steps"),
    (dict(steps=2.5, method="learned"), TypeError, "steps"),
    (dict(steps=True, method="learned"), TypeError, "steps"),
    (dict(symmetries=None), ValueError, "symmetries=None"),
    (dict(symmetries=()), ValueError, "none given"),
    (dict(symmetries=5), TypeError, "symmetries"),
    (dict(symmetries=("perm", None)), ValueError, "unknown symmetry class"),
    (dict(method=None), ValueError, "unknown method"),
    (dict(method="Weight"), ValueError, "unknown method"),
    (dict(form="paper"), ValueError, "unknown form"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(lr=0.0, method="learned"), ValueError, "lr"),
    (dict(lr=float("nan"), method="learned"), ValueError, "lr"),
    (dict(schedule="linear", method="learned"), ValueError, "schedule"),
    (dict(data=torch.zeros(4, 64), method="activation"), TypeError, "iterable of batches"),
    (dict(data=[], method="activation"), ValueError, "empty"),
    (dict(data=iter([]), method="learned"), ValueError, "empty"),
    (dict(data=mlp_batches(1), method="learned", steps=2), ValueError, "at least two batches"),
    (dict(data=[torch.randn(4, 64)], method="activation"), ValueError, "no labels"),
    (dict(data=[(torch.randn(4, 64), torch.randn(4))], method="activation"), ValueError, "integer class indices"),
    (dict(data=[{"x": torch.randn(4, 64)}], method="activation"), TypeError, "dict"),
]


@pytest.mark.parametrize("kwargs,err,name", ALIGN_ARGS, ids=lambda v: str(v)[:40])
def test_align_arguments_are_checked(kwargs, err, name):
    kwargs = dict(dict(progress=False), **kwargs)
    if kwargs.get("method") in ("activation", "learned"):
        kwargs.setdefault("data", mlp_batches())
    a, b = mlp()[1:], mlp(1)[1:]
    raises(err, name, lambda: gm.align(a, b, **kwargs))


@pytest.mark.parametrize("t,err,name", [
    (float("nan"), ValueError, "finite"), (float("inf"), ValueError, "finite"), (1.5, ValueError, "extrapolate"),
    (-0.1, ValueError, "extrapolate"), ("0.5", TypeError, "real number"), (None, TypeError, "real number"),
    (True, TypeError, "real number"),
])
def test_interpolate_t_is_checked(t, err, name):
    raises(err, name, lambda: gm.interpolate(mlp(), mlp(1), t))


def test_extrapolation_is_explicit():
    a, b = mlp(), mlp(1)
    out = gm.interpolate(a, b, 1.5, extrapolate=True).state_dict()
    assert torch.allclose(out["1.weight"], -0.5 * a[1].weight + 1.5 * b[1].weight)
    out = gm.interpolate(a, b, torch.tensor(0.25)).state_dict()
    assert torch.allclose(out["1.weight"], 0.75 * a[1].weight + 0.25 * b[1].weight)


@pytest.mark.parametrize("num_points,err", [(1, ValueError), (0, ValueError), (-3, ValueError), (2.5, TypeError),
                                            (None, TypeError)])
def test_barrier_num_points_is_checked(num_points, err):
    raises(err, "num_points", lambda: gm.barrier(mlp(), mlp(1), mlp_batches(), num_points=num_points))


@pytest.mark.parametrize("kwargs,err,name", [
    (dict(iters=0), ValueError, "iters"), (dict(concentration=0.0, method="learned"), ValueError, "concentration"),
    (dict(steps=0, method="learned"), ValueError, "steps"), (dict(select_batches=0), ValueError, "select_batches"),
])
def test_align_many_arguments_are_checked(kwargs, err, name):
    kwargs = dict(dict(progress=False), **kwargs)
    if kwargs.get("method") == "learned":
        kwargs["data"] = mlp_batches()
    raises(err, name, lambda: gm.align_many([mlp(), mlp(1), mlp(2)], **kwargs))


def test_other_entry_points_check_their_arguments():
    raises(TypeError, "list of models", lambda: gm.align_many(mlp()))
    raises(ValueError, "form", lambda: gm.to_circuit(gpt(), form="paper"))
    raises(ValueError, "bogus", lambda: gm.describe_profile("mlp-digits", profile="bogus"))
    A = gm.canonicalize(mlp())
    init = gm.weight_matching(A, gm.canonicalize(mlp(1)))[0]
    raises(ValueError, "lam_range", lambda: gm.learned_matching(A, A, mlp_batches(), init, steps=1,
                                                                 lam_range=(0.6, 0.4), progress=False))
    raises(ValueError, "steps", lambda: gm.learned_matching(A, A, mlp_batches(), init, steps=0, progress=False))
    raises(ValueError, "schedule", lambda: gm.learned_matching(A, A, mlp_batches(), init, steps=1, schedule="linear",
                                                                progress=False))


# --------------------------------------------------------------------------- data that does not fit the model

@pytest.mark.parametrize("batch,name", [
    (torch.full((2, 8), 32), "vocab_size = 32"),
    (torch.full((2, 8), -1), "token ids"),
    (torch.zeros(2, 17, dtype=torch.long), "n_positions = 16"),
    (torch.zeros(2, 8), "token ids of shape"),
    (torch.zeros(2, 1, dtype=torch.long), "at least 2 tokens"),
    (torch.zeros(2, 2, 8, dtype=torch.long), "[B, T]"),
], ids=["id-above-vocab", "negative-id", "too-long", "float-ids", "one-token", "3d"])
def test_language_batches_are_checked(batch, name):
    model = gpt()
    raises(ValueError, re.escape(name), lambda: gm.evaluate(model, [batch]))
    raises(ValueError, re.escape(name), lambda: gm.align(model, gpt(1), method="learned", data=[batch, batch],
                                                         steps=1, progress=False))


@pytest.mark.parametrize("batch,err,name", [
    (torch.randn(4, 1, 8, 8), ValueError, "no labels"),
    ((torch.randn(4, 1, 8, 8), torch.full((4,), 3)), ValueError, "labels must lie in [0, 3)"),
    ((torch.randn(4, 1, 8, 8), torch.zeros(5, dtype=torch.long)), ValueError, "shape [B] = [4]"),
    (("not a tensor", torch.zeros(4, dtype=torch.long)), TypeError, "inputs x"),
], ids=["no-labels", "label-range", "label-count", "x-not-tensor"])
def test_classifier_batches_are_checked(batch, err, name):
    raises(err, re.escape(name), lambda: gm.evaluate(vit(), [batch]))


def test_bad_data_is_refused_before_any_solver_runs(monkeypatch):
    import glmc_mini.matching as matching

    def solver(*args, **kwargs):
        raise AssertionError("a solver ran before the data was checked")

    monkeypatch.setattr(matching, "weight_matching", solver)
    bad = [torch.full((2, 8), 40)]
    for method in ("activation", "learned"):
        raises(ValueError, "vocab_size", lambda: gm.align(gpt(), gpt(1), method=method, data=bad + bad,
                                                          progress=False))


# --------------------------------------------------------------------------- the fixes that go with them

def test_single_pass_generators_are_accepted():
    gen = (b for b in img_batches(4))
    res = gm.align(vit(), vit(1), method="learned", data=gen, steps=3, progress=False)
    assert len(res.losses) == 3
    res = gm.align(vit(), vit(1), method="activation", data=(b for b in img_batches(2)), progress=False)
    assert res.transforms


def test_held_out_batches_are_never_trained_on():
    from glmc_mini.checks import split_held_out
    data = list(range(10))
    held, train = split_held_out(iter(data), 4)
    assert held == [0, 1, 2, 3]
    assert list(itertools.islice(train, 15)) == [4, 5, 6, 7, 8, 9, 4, 5, 6, 7, 8, 9, 4, 5, 6]
    held, train = split_held_out([0, 1, 2], 4)
    assert held == [0] and list(itertools.islice(train, 4)) == [1, 2, 1, 2]


def test_learned_matching_is_never_worse_than_its_start_on_held_out_batches():
    from glmc_mini.learned import _LossOf, _score
    A = gm.canonicalize(vit())
    spec = gm.build_spec(A)
    B = gm.apply_transforms(A, gm.random_transforms(spec, ("perm", "orth", "inv"), seed=3))
    init = gm.weight_matching(A, B)[0]
    data = img_batches(8)
    T, losses = gm.learned_matching(A, B, data, init, steps=20, lr=0.5, progress=False, select_batches=4)
    sa, sb = A.state_dict(), B.state_dict()
    start = _score(_LossOf(A), sa, sb, spec, init, data[:4])[0]
    end = _score(_LossOf(A), sa, sb, spec, T, data[:4])[0]
    assert end <= start + 1e-6


def test_cosine_schedule_decays_both_learning_rates_to_zero(monkeypatch):
    from glmc_mini.learned import learning_rate_factor
    assert [learning_rate_factor("constant", s, 10) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    cosine = [learning_rate_factor("cosine", s, 10) for s in range(10)]
    assert cosine[0] == 1.0 and abs(cosine[5] - 0.5) < 1e-12 and 0 < cosine[-1] < 0.025
    assert all(x > y for x, y in zip(cosine, cosine[1:]))
    # a run with each schedule: B's function kept, the start's held-out loss never exceeded
    from glmc_mini.learned import _LossOf, _score
    A = gm.canonicalize(vit())
    spec = gm.build_spec(A)
    B = gm.apply_transforms(A, gm.random_transforms(spec, ("perm", "orth", "inv"), seed=3))
    init, data = gm.weight_matching(A, B)[0], img_batches(8)
    sa, sb = A.state_dict(), B.state_dict()
    start = _score(_LossOf(A), sa, sb, spec, init, data[:4])[0]
    rates, step = [], torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda opt, *a, **k: (
        rates.append([g["lr"] for g in opt.param_groups]), step(opt, *a, **k))[1])
    for schedule, factors in (("constant", [1.0] * 10), ("cosine", cosine)):
        rates.clear()
        T, _ = gm.learned_matching(A, B, data, init, steps=10, lr=0.5, lr_perm=0.05, schedule=schedule,
                                   progress=False)
        assert rates == [[0.05 * f, 0.5 * f] for f in factors], (schedule, rates)
        assert _score(_LossOf(A), sa, sb, spec, T, data[:4])[0] <= start + 1e-6
        x = data[0][0]
        with torch.no_grad():
            assert (gm.apply_transforms(B, T)(x) - B(x)).abs().max() < 1e-4


def test_learned_matching_keeps_the_models_modes():
    a, b = vit().train(), vit(1).train()
    res = gm.align(a, b, method="learned", data=img_batches(3), steps=2, progress=False)
    assert res.model_a.training and res.model_b.training and a.training
    res = gm.align(gpt().train(), gpt(1).train(), method="learned", form="circuit", data=tok_batches(3), steps=2,
                   progress=False)
    assert res.model_a.training


def test_evaluate_on_another_device_leaves_the_model_where_it_is():
    model = mlp()
    with pytest.raises(Exception):
        gm.evaluate(model, mlp_batches(), device="meta")  # a copy goes to the meta device, and fails there
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("call", ["to_circuit", "split_heads", "embed_wider", "align-circuit"])
def test_the_callers_rng_is_not_consumed(call):
    small, wide = gpt(), gpt(1, n_embd=32)
    calls = {"to_circuit": lambda: gm.to_circuit(small), "split_heads": lambda: gm.split_heads(small, 3),
             "embed_wider": lambda: gm.embed_wider(small, wide),
             "align-circuit": lambda: gm.align(small, gpt(2), form="circuit", progress=False)}
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    calls[call]()
    assert torch.equal(state, torch.random.get_rng_state())


def test_an_invalid_profile_does_not_break_import_or_help():
    env = dict(os.environ, GLMC_PROFILE="bogus")
    out = subprocess.run([sys.executable, "-m", "glmc_mini", "reproduce", "--profile", "quick", "--help"],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    code = "import glmc_mini as gm\ntry:\n    gm.PROFILE\nexcept ValueError as e:\n    print(e)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "GLMC_PROFILE='bogus'" in out.stdout, out.stderr


def test_describe_profile_describes_the_profile_it_is_given():
    assert "256" in gm.describe_profile("vit-digits", profile="paper")
    assert "width 32" in gm.describe_profile("vit-digits", profile="quick")


# --------------------------------------------------------------------------- variants (a second, demanding pass)

def _hooked(model, where, pre=False):
    module = model.get_submodule(where) if where else model
    if pre:
        module.register_forward_pre_hook(lambda mod, args: (args[0] * 2,) + tuple(args[1:]))
    else:
        module.register_forward_hook(lambda mod, args, out: out * 2 if torch.is_tensor(out) else out)
    return model


def _shared(model, blocks):
    blocks = model.get_submodule(blocks)
    blocks[1] = blocks[0]
    return model


MORE_UNSUPPORTED = [
    ("vit-forward-hook", lambda: _hooked(vit(), "blocks.0.mlp"), "blocks.0.mlp has a forward hook"),
    ("vit-pre-hook", lambda: _hooked(vit(), "", pre=True), "VisionTransformer has a forward pre-hook"),
    ("gpt-forward-hook", lambda: _hooked(gpt(), "transformer.h.0.mlp"), "transformer.h.0.mlp has a forward hook"),
    ("mlp-forward-hook", lambda: _hooked(mlp(), "1"), "1 has a forward hook"),
    ("vit-shared-blocks", lambda: _shared(vit(depth=2), "blocks"), "shares one tensor between blocks.0"),
    ("gpt-shared-blocks", lambda: _shared(gpt(n_layer=2), "transformer.h"), "shares one tensor between transformer.h.0"),
    ("mlp-shared-linear", lambda: (lambda l: nn.Sequential(nn.Linear(8, 8), nn.ReLU(), l, nn.ReLU(), l))(nn.Linear(8, 8)),
     "shares one tensor between 2.weight, 4.weight"),
    ("vit-norm-pre", lambda: vit(pre_norm=True), "norm_pre"),
    ("vit-max-pool", lambda: vit(global_pool="max"), "global_pool='max'"),
    ("vit-rmsnorm", lambda: vit(norm_layer=nn.RMSNorm), "RMSNorm"),
    ("vit-no-head", lambda: vit(num_classes=0), "num_classes=0"),
    ("deit-distilled-config", lambda: _distilled(), "head_dist.bias"),
    ("gpt-lm-head-bias", lambda: _with(gpt(), "lm_head", nn.Linear(16, 32)), "lm_head.bias"),
    ("mlp-weight-norm", lambda: (lambda m: (torch.nn.utils.parametrizations.weight_norm(m[1]), m)[1])(mlp()),
     "ParametrizedLinear at 1"),
    ("mlp-batchnorm", lambda: nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)),
     "BatchNorm1d at 1"),
    ("mlp-nested", lambda: nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 2)), "Sequential at 0"),
    ("mlp-log-softmax", lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.LogSoftmax(-1)),
     "LogSoftmax at 3"),
    ("mlp-threshold", lambda: nn.Sequential(nn.Linear(4, 8), nn.Threshold(0.1, 0.0), nn.Linear(8, 2)), "Threshold at 1"),
    ("gpt-double-heads", lambda: __import__("transformers").GPT2DoubleHeadsModel(gpt().config), "GPT2DoubleHeadsModel"),
    ("gpt-base-model", lambda: __import__("transformers").GPT2Model(gpt().config), "GPT2Model"),
    ("vit-compiled", lambda: torch.compile(vit()), "OptimizedModule"),
    ("vit-data-parallel", lambda: nn.DataParallel(vit()), "DataParallel"),
]


@pytest.mark.parametrize("build,name", [c[1:] for c in MORE_UNSUPPORTED], ids=[c[0] for c in MORE_UNSUPPORTED])
def test_more_unsupported_models_are_refused_by_name(build, name):
    model = build()
    raises(TypeError, re.escape(name), lambda: gm.align(model, copy.deepcopy(model), progress=False))
    if not isinstance(model, (nn.DataParallel,)) and type(model).__name__ not in ("OptimizedModule", "GPT2Model",
                                                                                    "GPT2DoubleHeadsModel"):
        raises(UnsupportedModelError, re.escape(name), lambda: gm.canonicalize(model))


def test_hooks_are_refused_by_every_converting_entry_point():
    model = _hooked(gpt(), "transformer.h.0")
    for call in (lambda: gm.to_circuit(model), lambda: gm.embed_wider(model, gpt(1, n_embd=32)),
                 lambda: gm.align_many([model, gpt(1)], progress=False)):
        raises(UnsupportedModelError, "forward hook", call)


MORE_PAIRS = [
    ("gpt-vocab", lambda: (gpt(), gpt(1, vocab_size=40)), "config.vocab_size: 32 vs 40"),
    ("gpt-positions", lambda: (gpt(), gpt(1, n_positions=12)), "config.n_positions: 16 vs 12"),
    ("gpt-gelu-vs-gelu-new", lambda: (gpt(activation_function="gelu"), gpt(1)), "activation_function"),
    ("gpt-n-inner", lambda: (gpt(n_inner=24), gpt(1, n_inner=48)), "config.n_inner: 24 vs 48"),
    ("gpt-eps-one-module", lambda: (gpt(), (lambda m: (setattr(m.transformer.h[0].ln_1, "eps", 1e-2), m)[1])(gpt(1))),
     "transformer.h.0.ln_1.eps"),
    ("vit-reg-tokens", lambda: (vit(), vit(1, reg_tokens=1)), "num_prefix_tokens"),
    ("vit-layer-scale", lambda: (vit(), vit(1, init_values=0.5)), "blocks.0.ls1.gamma"),
    ("vit-qkv-bias", lambda: (vit(), vit(1, qkv_bias=False)), "blocks.0.attn.qkv.bias"),
    ("vit-dynamic", lambda: (vit(), vit(1, dynamic_img_size=True)), "dynamic_img_size"),
    ("vit-no-embed-class", lambda: (vit(), vit(1, no_embed_class=True)), "no_embed_class"),
    ("vit-pos-none", lambda: (vit(), vit(1, pos_embed="none")), "pos_embed: 'a tensor of shape (1, 5, 16)' vs None"),
    ("vit-heads", lambda: (vit(), vit(1, num_heads=4)), "blocks.0.attn.num_heads: 2 vs 4"),
    ("vit-mlp-ratio", lambda: (vit(), vit(1, mlp_ratio=3)), "blocks.0.mlp.fc1.weight"),
    ("vit-img-size", lambda: (vit(), vit(1, img_size=12)), "pos_embed"),
    ("mlp-leaky-slope", lambda: (nn.Sequential(nn.Linear(64, 8), nn.LeakyReLU(0.1), nn.Linear(8, 3)),
                                 nn.Sequential(nn.Linear(64, 8), nn.LeakyReLU(0.2), nn.Linear(8, 3))), "negative_slope"),
    ("mlp-dropout-vs-identity", lambda: (nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 3)),
                                         nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Identity(), nn.Linear(8, 3))),
     "module 2 is a torch.nn.modules.dropout.Dropout"),
    ("mlp-final-tanh", lambda: (nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3)),
                                nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3), nn.Tanh())),
     "module 3 is in model_b only"),
    ("mlp-flatten-dims", lambda: (mlp(), _with(mlp(1), "0", nn.Flatten(0))), "0.start_dim: 1 vs 0"),
]


@pytest.mark.parametrize("make,name", [c[1:] for c in MORE_PAIRS], ids=[c[0] for c in MORE_PAIRS])
def test_more_pairs_that_differ_are_refused_by_name(make, name):
    A, B = make()
    raises(ValueError, re.escape(name), lambda: gm.align(A, B, progress=False))
    raises(ValueError, re.escape(name), lambda: gm.interpolate(A, B, 0.5))


def test_tied_and_untied_gpt2_are_one_architecture_for_align():
    A, B = gpt(), gpt(1, tie_word_embeddings=False)
    x = tok_batches(1)[0]
    res = gm.align(A, B, progress=False)
    assert torch.allclose(res.model_b(x).logits, B(x).logits, atol=1e-5)
    raises(ValueError, "tying differs", lambda: gm.interpolate(A, B, 0.5))  # raw models: tying is part of the class


MORE_DATA = [
    ("mlp-int-images", mlp, [(torch.randint(0, 3, (4, 64)), torch.zeros(4, dtype=torch.long))], "floating point"),
    ("mlp-features", mlp, [(torch.randn(4, 63), torch.zeros(4, dtype=torch.long))], "the MLP's first Linear takes 64"),
    ("mlp-nan-inputs", mlp, [(torch.full((4, 64), float("nan")), torch.zeros(4, dtype=torch.long))], "non-finite"),
    ("mlp-empty-batch", mlp, [(torch.randn(0, 64), torch.zeros(0, dtype=torch.long))], "no examples"),
    ("mlp-bool-labels", mlp, [(torch.randn(4, 64), torch.zeros(4, dtype=torch.bool))], "torch.bool"),
    ("mlp-meta-inputs", mlp, [(torch.randn(4, 64, device="meta"), torch.zeros(4, dtype=torch.long))], "meta device"),
    ("vit-channels", vit, [(torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))], "[B, 1, H, W]"),
    ("vit-image-size", vit, [(torch.randn(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))], "(8, 8) pixels"),
    ("vit-negative-label", vit, [(torch.randn(2, 1, 8, 8), torch.full((2,), -1))], "labels must lie in [0, 3)"),
    ("gpt-empty-batch", gpt, [torch.zeros(0, 8, dtype=torch.long)], "no examples"),
]


@pytest.mark.parametrize("build,data,name", [c[1:] for c in MORE_DATA], ids=[c[0] for c in MORE_DATA])
def test_more_bad_batches_are_named(build, data, name):
    A = build()
    raises(ValueError, re.escape(name), lambda: gm.evaluate(A, data))
    raises(ValueError, re.escape(name), lambda: gm.barrier(A, build(1), data, num_points=2))
    raises(ValueError, re.escape(name), lambda: gm.align(A, build(1), method="activation", data=data, progress=False))


def test_integer_token_ids_and_labels_of_any_int_dtype_are_accepted():
    A, x = gpt(), tok_batches(1)[0]
    ref = gm.evaluate(A, [x])["loss"]
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert gm.evaluate(A, [x.to(dtype)])["loss"] == pytest.approx(ref)
    (xi, yi), = img_batches(1)
    assert gm.evaluate(vit(), [(xi, yi.int())])["loss"] == pytest.approx(gm.evaluate(vit(), [(xi, yi)])["loss"])


MORE_ARGS = [
    ("barrier-data-none", lambda: gm.barrier(mlp(), mlp(1), None), TypeError, "data is None"),
    ("evaluate-data-none", lambda: gm.evaluate(mlp(), None), TypeError, "data is None"),
    ("simplex-data-none", lambda: gm.simplex_losses([mlp(), mlp(1), mlp(2)], None), TypeError, "data is None"),
    ("barrier-huge-num-points", lambda: gm.barrier(mlp(), mlp(1), mlp_batches(1), num_points=10 ** 9), ValueError,
     "num_points must be an integer <= 1001"),
    ("barrier-num-points-float", lambda: gm.barrier(mlp(), mlp(1), mlp_batches(1), num_points=3.0), TypeError,
     "num_points"),
    ("evaluate-bad-device", lambda: gm.evaluate(mlp(), mlp_batches(1), device="nodev"), ValueError, "'nodev'"),
    ("align-seed-huge", lambda: gm.align(mlp(), mlp(1), seed=2 ** 70, progress=False), ValueError, "seed"),
    ("align-orth-on-mlp", lambda: gm.align(mlp(), mlp(1), symmetries=("orth",), progress=False), ValueError,
     "none of the symmetry classes ('orth',)"),
    ("align-inv-on-mlp", lambda: gm.align(mlp(), mlp(1), symmetries="inv", progress=False), ValueError,
     "acts on this mlp model"),
    ("align-many-orth-on-mlp", lambda: gm.align_many([mlp(), mlp(1)], symmetries=("orth",), progress=False),
     ValueError, "none of the symmetry classes"),
    ("split-heads-float", lambda: gm.split_heads(gpt(), 2.5), TypeError, "head count"),
    ("split-heads-str", lambda: gm.split_heads(gpt(), "4"), TypeError, "head count"),
    ("split-heads-zero", lambda: gm.split_heads(gpt(), 0), ValueError, "head count of layer 0"),
    ("split-heads-bad-seed", lambda: gm.split_heads(gpt(), 4, seed=-1), ValueError, "seed"),
    ("embed-wider-float-seed", lambda: gm.embed_wider(gpt(), gpt(1, n_embd=32), seed=1.5), TypeError, "seed"),
    ("embed-wider-negative-seed", lambda: gm.embed_wider(gpt(), gpt(1, n_embd=32), seed=-1), ValueError, "seed"),
    ("simplex-n-float", lambda: gm.simplex_grid(2.5), TypeError, "points per edge"),
    ("interpolate-t-vector", lambda: gm.interpolate(mlp(), mlp(1), torch.tensor([0.5, 0.5])), TypeError, "real number"),
    ("interpolate-t-complex", lambda: gm.interpolate(mlp(), mlp(1), 0.5j), TypeError, "real number"),
    ("interpolate-inf-extrapolated", lambda: gm.interpolate(mlp(), mlp(1), float("inf"), extrapolate=True), ValueError,
     "finite"),
]


@pytest.mark.parametrize("call,err,name", [c[1:] for c in MORE_ARGS], ids=[c[0] for c in MORE_ARGS])
def test_more_arguments_are_checked(call, err, name):
    raises(err, re.escape(name), call)


def test_numpy_and_tensor_scalars_are_accepted_as_numbers():
    import numpy as np
    A, B = mlp(), mlp(1)
    ref = gm.align(A, B, seed=1, progress=False)
    res = gm.align(A, B, seed=np.int64(1), progress=False)
    assert all(torch.equal(p, q) for p, q in zip(ref.model_b.parameters(), res.model_b.parameters()))
    for t in (np.float64(0.25), np.float32(0.25), torch.tensor(0.25), 0):
        gm.interpolate(A, B, t)
    assert len(gm.barrier(A, B, mlp_batches(1), num_points=np.int64(3)).lambdas) == 3


ACCEPTED_VARIANTS = [
    ("vit-avg-no-class-token", lambda s: vit(s, global_pool="avg", class_token=False)),
    ("vit-reg-tokens", lambda s: vit(s, reg_tokens=2)),
    ("vit-no-embed-class", lambda s: vit(s, no_embed_class=True)),
    ("vit-layer-scale", lambda s: vit(s, init_values=0.5)),
    ("vit-no-qkv-bias", lambda s: vit(s, qkv_bias=False)),
    ("vit-fc-norm", lambda s: vit(s, global_pool="avg", fc_norm=True)),
    ("vit-pos-none", lambda s: vit(s, pos_embed="none")),
    ("vit-silu-one-head", lambda s: vit(s, act_layer=nn.SiLU, num_heads=1)),
    ("vit-norm-without-affine", lambda s: vit(s, norm_layer=functools.partial(nn.LayerNorm, elementwise_affine=False))),
    ("vit-norm-without-bias", lambda s: vit(s, norm_layer=functools.partial(nn.LayerNorm, bias=False))),
    ("gpt-untied", lambda s: gpt(s, tie_word_embeddings=False)),
    ("gpt-silu-n-inner", lambda s: gpt(s, activation_function="silu", n_inner=24)),
    ("gpt-inverse-layer-idx-no-scale", lambda s: gpt(s, n_layer=2, scale_attn_by_inverse_layer_idx=True,
                                                     scale_attn_weights=False)),
    ("gpt-eps-sdpa", lambda s: gpt(s, layer_norm_epsilon=1e-3, attn_implementation="sdpa")),
]


@pytest.mark.parametrize("make", [c[1] for c in ACCEPTED_VARIANTS], ids=[c[0] for c in ACCEPTED_VARIANTS])
def test_accepted_variants_keep_their_function_in_stock_and_circuit_form(make):
    A, B = make(0), make(1)
    x = tok_batches(1)[0] if gm.model_family(A) == "gpt2" else img_batches(1)[0][0]
    out = lambda m: gm.forward_logits(m, x)
    with torch.no_grad():
        ya, yb = out(A), out(B)
        for form in ("stock", "circuit"):
            res = gm.align(A, B, form=form, progress=False)
            torch.testing.assert_close(out(res.model_a), ya, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out(res.model_b), yb, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out(gm.interpolate(res.model_a, res.model_b, 1)), yb, atol=1e-5, rtol=1e-4)
