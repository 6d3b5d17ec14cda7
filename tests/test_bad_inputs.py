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
