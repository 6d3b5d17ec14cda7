"""Solvers recover planted transformations; gm.align keeps B's function, checks its arguments and
leaves its inputs untouched. Tiny models built directly (fast, no training cache); tests/conftest.py
runs them on one thread."""
import copy

import pytest
import torch
import torch.nn as nn

import glmc_mini as gm
from glmc_mini.matching import activation_matching, weight_matching
from glmc_mini.models import forward_logits
from glmc_mini.spaces import build_spec
from glmc_mini.symmetries import Orthogonal, Permutation, apply_transforms, invert_transforms, random_transforms


CLASS_SETS = [("perm",), ("perm", "orth"), ("perm", "orth", "inv")]


def mlp(seed=0, hidden=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, 10)).eval()


def vit(seed=0):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    m = VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depth=1,
                          num_heads=2, mlp_ratio=2)
    return _randomise_norms(m).eval()


def gpt(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return _randomise_norms(GPT2LMHeadModel(cfg)).eval()


def _randomise_norms(model):
    """Non-trivial LayerNorm gains/biases so canonicalization has something to fold."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


BUILD = {"mlp": mlp, "vit": vit, "gpt2": gpt}


def batches(family, n=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    if family == "gpt2":
        return [torch.randint(0, 32, (size, 16), generator=g) for _ in range(n)]
    shape = (size, 64) if family == "mlp" else (size, 1, 8, 8)
    return [(torch.randn(*shape, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def inputs(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def outputs(model, data):
    with torch.no_grad():
        return torch.cat([forward_logits(model.eval(), inputs(b)).float().flatten() for b in data])


def planted(family, symmetries, seed=0):
    A = gm.canonicalize(BUILD[family](seed))
    R = random_transforms(build_spec(A), symmetries, seed=seed + 1)
    return A, apply_transforms(A, R), R


@pytest.mark.parametrize("family", ["mlp", "vit", "gpt2"])
@pytest.mark.parametrize("symmetries", CLASS_SETS, ids=lambda s: "+".join(s))
def test_weight_matching_recovers_planted(family, symmetries):
    if family == "mlp" and symmetries != ("perm",):
        pytest.skip("an MLP has hidden spaces only: permutations")
    A, B, R = planted(family, symmetries)
    T, history = weight_matching(A, B, symmetries=symmetries, seed=0)
    expected = invert_transforms(R)
    for name, E in expected.items():
        if isinstance(E, Permutation):
            assert torch.equal(T[name].perm, E.perm), f"space {name}: wrong permutation"
        elif isinstance(E, Orthogonal):
            assert torch.allclose(T[name].O.float(), E.O.float(), atol=1e-4), f"space {name}: wrong orthogonal map"
    moved = apply_transforms(B, T)
    sa, sm = A.state_dict(), moved.state_dict()
    for k in sa:
        assert torch.allclose(sa[k].float(), sm[k].float(), atol=1e-4), f"{k} not recovered"
    data = batches(family)
    assert abs(gm.barrier(A, moved, data, num_points=5).barrier) < 1e-4
    assert history[-1] < 1e-6 * max(history[0], 1.0)


def test_activation_matching_recovers_planted_permutation():
    A, B, R = planted("mlp", ("perm",))
    T = activation_matching(A, B, batches("mlp", n=4, size=64), symmetries=("perm",), seed=0)
    for name, E in invert_transforms(R).items():
        assert torch.equal(T[name].perm, E.perm), f"space {name}: wrong permutation"


METHODS = ["none", "activation", "weight", "learned"]


@pytest.mark.parametrize("family", ["mlp", "vit", "gpt2"])
@pytest.mark.parametrize("form", ["stock", "circuit"])
@pytest.mark.parametrize("method", METHODS)
def test_align_keeps_b_function_and_inputs(family, form, method):
    if family == "mlp" and form == "circuit":
        pytest.skip("circuit form is for transformers")
    A, B = BUILD[family](0), BUILD[family](1)
    before_a, before_b = copy.deepcopy(A.state_dict()), copy.deepcopy(B.state_dict())
    data = batches(family)
    res = gm.align(A, B, method=method, data=data, steps=3, form=form, progress=False)
    assert torch.allclose(outputs(res.model_b, data), outputs(B, data), atol=1e-4)
    assert torch.allclose(outputs(res.model_a, data), outputs(A, data), atol=1e-4)
    for before, model in ((before_a, A), (before_b, B)):
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _train(model, data, steps=30, lr=3e-2):
    from glmc_mini.models import batch_loss, model_kind
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for i in range(steps):
        loss, n, _ = batch_loss(model, data[i % len(data)], model_kind(model))
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("family, form", [("mlp", "stock"), ("vit", "stock"), ("vit", "circuit"),
                                          ("gpt2", "stock"), ("gpt2", "circuit")])
def test_learned_matching_does_not_increase_weight_matching_barrier(family, form):
    """Measured on the data it trained on, from weight matching's start (all classes)."""
    data = batches(family, n=4, size=32, seed=3)
    build = (lambda s: mlp(s, hidden=32)) if family == "mlp" else BUILD[family]
    A, B = _train(build(0), data, lr=1e-2), _train(build(1), data, lr=1e-2)
    weight = gm.align(A, B, method="weight", form=form, progress=False)
    learned = gm.align(A, B, method="learned", data=data, steps=40, form=form, progress=False)
    b_weight = gm.barrier(weight.model_a, weight.model_b, data).barrier
    b_learned = gm.barrier(learned.model_a, learned.model_b, data).barrier
    assert b_learned <= b_weight + 1e-4, (b_weight, b_learned)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="bogus"), "unknown method"),
    (dict(symmetries=("perm", "rot")), "unknown symmetry class"),
    (dict(method="activation"), "needs data"),
    (dict(method="learned"), "needs data"),
    (dict(form="tree"), "unknown form"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gm.align(mlp(0), mlp(1), **kwargs)


def test_bad_pairs():
    with pytest.raises(ValueError, match="different families"):
        gm.align(mlp(0), vit(0))
    with pytest.raises(ValueError, match="incompatible shapes"):
        gm.align(mlp(0, hidden=16), mlp(1, hidden=24))
