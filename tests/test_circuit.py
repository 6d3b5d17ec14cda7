"""The circuit form: exact conversion, symmetries acting through the spec, no invertible freedom,
head splitting, interpolation."""
import importlib.util

import pytest
import torch
import torch.nn as nn

import glmc_mini as gm
from glmc_mini.circuit import CircuitTransformer, apply_transforms as circuit_apply, split_heads, to_circuit
from glmc_mini.spaces import UnsupportedModelError
from glmc_mini.symmetries import Invertible, SemiPermutation, apply_transforms, random_transforms


def rel(a, b):
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


def _randomise_norms(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
            if hasattr(m, "gamma"):
                m.gamma.copy_(torch.rand(m.gamma.shape, generator=g) + 0.5)
    return model


def vit(pool="token", qkv_bias=True, heads=4, seed=0, **kw):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    m = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2,
                          num_heads=heads, mlp_ratio=2, qkv_bias=qkv_bias, global_pool=pool,
                          class_token=pool == "token", **kw)
    return _randomise_norms(m.eval(), seed)


def gpt2(act="gelu_new", heads=4, seed=0, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=40, n_positions=12, n_embd=32, n_layer=2, n_head=heads, activation_function=act,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, **kw)
    return _randomise_norms(GPT2LMHeadModel(cfg).eval(), seed)


IMG = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(2))


def stock_out(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits if hasattr(model, "transformer") else model(IMG)


def circ_out(model):
    with torch.no_grad():
        return model(IDS if model.source_family == "gpt2" else IMG)


# --------------------------------------------------------------------------- conversion

@pytest.mark.parametrize("pool,qkv_bias,init_values", [("token", True, None), ("token", False, 0.5),
                                                       ("avg", True, None), ("avg", False, None)])
def test_vit_to_circuit_is_exact(pool, qkv_bias, init_values):
    model = vit(pool, qkv_bias, init_values=init_values)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c = to_circuit(model)
    assert rel(circ_out(c), stock_out(model)) < 1e-5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    assert c.glmc_family == "circuit" and c.glmc_kind == "classification" and c.source_family == "vit"
    assert c.blocks[0].attn.qk.shape == (4, 33, 33) and c.blocks[0].attn.ov.shape == (4, 33, 32)
    assert circ_out(c).shape == (6, 10)


@pytest.mark.parametrize("act,kw", [("gelu_new", {}), ("relu", {"n_inner": 48}),
                                    ("gelu_new", {"tie_word_embeddings": False}),
                                    ("relu", {"scale_attn_by_inverse_layer_idx": True})])
def test_gpt2_to_circuit_is_exact(act, kw):
    model = gpt2(act, **kw)
    c = to_circuit(model)
    assert rel(circ_out(c), stock_out(model)) < 1e-5
    assert model.lm_head.weight is model.transformer.wte.weight or not model.config.tie_word_embeddings
    assert c.glmc_kind == "language" and c.source_family == "gpt2" and circ_out(c).shape == (3, 12, 40)
    assert isinstance(c.blocks[0].act, type(model.transformer.h[0].mlp.act))


def test_factored_form_and_alias():
    model = gpt2()
    f = CircuitTransformer.from_stock(model, form="factored")
    assert f.blocks[0].attn.form == "factored" and f.blocks[0].attn.wq.shape == (33, 32)
    assert rel(circ_out(f), stock_out(model)) < 1e-5
    c, c2 = to_circuit(model), f.as_circuits()
    for (k, a), (k2, b) in zip(c.state_dict().items(), c2.state_dict().items()):
        assert k == k2 and torch.allclose(a, b, atol=1e-6)


def test_follows_dtype():
    model = gpt2().double()
    c = to_circuit(model)
    assert all(p.dtype == torch.float64 for p in c.parameters())
    assert rel(circ_out(c), stock_out(model)) < 1e-12


def test_unsupported_model_raises():
    with pytest.raises(UnsupportedModelError):
        to_circuit(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))


# --------------------------------------------------------------------------- the spec

@pytest.mark.parametrize("make", [lambda: vit("token"), lambda: vit("avg"), lambda: gpt2("relu")])
def test_residual_and_head_symmetries_through_the_spec(make):
    c = to_circuit(make())
    spec = c.spec()
    assert spec.family == "circuit" and not spec.of_kind("qk") and not spec.of_kind("ov")
    t = random_transforms(spec, symmetries=("perm", "orth"), seed=3)
    assert type(t["residual"]).__name__ == "Orthogonal" and type(t["heads.0"]).__name__ == "Permutation"
    moved = apply_transforms(c, t)
    assert rel(circ_out(moved), circ_out(c)) < 1e-4
    qk, qk2 = c.blocks[0].attn.qk, moved.blocks[0].attn.qk
    assert qk2.shape == qk.shape                     # the augmented entry is kept, not dropped
    assert torch.allclose(qk2[:, -1, -1].sort().values, qk[:, -1, -1].sort().values, atol=1e-6)
    assert not torch.allclose(qk2, qk[t["heads.0"].perm], atol=1e-3)  # the residual map did act


def test_no_invertible_freedom_left():
    """Stock models that differ by per-head invertible maps have identical circuits."""
    for model in (vit("token"), gpt2()):
        spec = gm.build_spec(model)
        g = torch.Generator().manual_seed(4)
        t = {n: Invertible.random(s.blocks, s.size // s.blocks, generator=g)
             for n, s in spec.spaces.items() if s.kind in ("qk", "ov")}
        other = apply_transforms(model, t)
        assert rel(stock_out(other), stock_out(model)) < 1e-4
        assert not torch.allclose(gm.canonicalize(other).state_dict()[_qkv(model)],
                                  gm.canonicalize(model).state_dict()[_qkv(model)], atol=1e-3)
        a, b = to_circuit(model).state_dict(), to_circuit(other).state_dict()
        for k in a:
            assert (a[k] - b[k]).abs().max() <= 1e-5 * max(a[k].abs().max(), 1.0), k


def _qkv(model):
    return "blocks.0.attn.qkv.weight" if hasattr(model, "blocks") else "transformer.h.0.attn.c_attn.weight"


def test_factored_layers_keep_their_invertible_freedom():
    """Factored layers carry qk.l / ov.l spaces; invertible maps change the factors, not the circuits."""
    f = to_circuit(gpt2(), form="factored")
    spec = f.spec()
    assert spec.of_kind("qk") == ["qk.0", "qk.1"] and spec.spaces["heads.0"].unit == 8
    t = random_transforms(spec, symmetries=("inv",), seed=5)
    assert sorted(t) == ["ov.0", "ov.1", "qk.0", "qk.1"]
    moved = apply_transforms(f, t)
    assert rel(circ_out(moved), circ_out(f)) < 1e-4
    assert rel(moved.blocks[1].attn.wq, f.blocks[1].attn.wq) > 1e-2
    for a, b in zip(f.blocks[1].attn.circuits(), moved.blocks[1].attn.circuits()):
        assert rel(b, a) < 1e-5
    moved = apply_transforms(f, random_transforms(spec, symmetries=("perm", "orth", "inv"), seed=6))
    assert rel(circ_out(moved), circ_out(f)) < 1e-4


def test_ffn_semi_permutation_widens_through_the_stock_apply():
    c = to_circuit(gpt2("relu"))
    g = torch.Generator().manual_seed(6)
    wide = apply_transforms(c, {"ffn.0": SemiPermutation.random(128, 160, generator=g)})
    assert wide.blocks[0].fc1.out_features == 160
    assert rel(circ_out(wide), circ_out(c)) < 1e-5


# --------------------------------------------------------------------------- head splitting

@pytest.mark.parametrize("form", ["circuit", "factored"])
def test_split_heads_is_exact(form):
    c = to_circuit(vit("token"), form=form)
    s = split_heads(c, {0: 7, "heads.1": 5})
    assert s.num_heads == [7, 5] and c.num_heads == [4, 4]
    assert rel(circ_out(s), circ_out(c)) < 1e-5


def test_split_heads_with_explicit_semi_permutation_and_stock_input():
    model = gpt2()
    T = SemiPermutation(torch.tensor([0, 1, 2, 3, 1, 1]), share=torch.tensor([1, .5, 1, 1, .25, .25]), n=4)
    s = split_heads(model, {1: T})
    assert s.num_heads == [4, 6]
    qk, ov = s.blocks[1].attn.qk, s.blocks[1].attn.ov
    assert torch.equal(qk[4], qk[1]) and torch.allclose(ov[4], ov[1] / 2)
    assert rel(circ_out(s), stock_out(model)) < 1e-5
    with pytest.raises(ValueError):
        split_heads(s, 3)


def test_different_head_counts_meet_after_splitting_and_interpolate():
    a, b = to_circuit(gpt2(heads=4, seed=0)), to_circuit(gpt2(heads=2, seed=1))
    b4 = split_heads(b, 4, seed=7)
    assert rel(circ_out(b4), circ_out(b)) < 1e-5
    assert b4.scales != a.scales                      # head size 16 vs 8: 1/sqrt(hd) differs
    b4 = b4.rescaled(a.scales)                        # same function, the scale moved into QK
    assert b4.scales == a.scales and rel(circ_out(b4), circ_out(b)) < 1e-5
    sa, sb = a.state_dict(), b4.state_dict()
    assert sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)
    assert all(v.is_floating_point() for v in sa.values())
    if importlib.util.find_spec("glmc_mini.barrier") is not None:
        mid = gm.interpolate(a, b4, 0.5)
        ends = gm.interpolate(a, b4, 0.0), gm.interpolate(a, b4, 1.0)
        assert rel(circ_out(ends[0]), circ_out(a)) < 1e-6 and rel(circ_out(ends[1]), circ_out(b4)) < 1e-6
    else:  # pragma: no cover - barrier.py written elsewhere
        mid = circuit_apply(a, {})
        mid.load_state_dict({k: 0.5 * sa[k] + 0.5 * sb[k] for k in sa})
    for k, v in mid.state_dict().items():
        assert torch.allclose(v, 0.5 * sa[k] + 0.5 * sb[k])
    assert torch.isfinite(circ_out(mid)).all()
