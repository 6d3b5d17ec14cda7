"""Several models: universe matching puts planted copies into one point (each keeping its function),
learned refinement runs, interpolate_many is exact and checks its weights, the simplex grid and
the loss over it. Tiny models built directly (fast, no training cache)."""
import pytest
import torch
import torch.nn as nn

import glmc_mini as gm
from glmc_mini.many import simplex_losses
from glmc_mini.models import forward_logits
from glmc_mini.spaces import build_spec
from glmc_mini.symmetries import apply_transforms, random_transforms


def vit(seed=0):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    return VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depth=1,
                             num_heads=2, mlp_ratio=2).eval()


def gpt(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(cfg).eval()


def mlp(seed=0, hidden=8):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3)).eval()


BUILD = {"vit": vit, "gpt2": gpt}


def data_of(family, seed=0, n=2):
    """``n`` batches (learned refinement holds the first out to choose its iterate, trains on the rest)."""
    g = torch.Generator().manual_seed(seed)
    if family == "gpt2":
        return [torch.randint(0, 32, (4, 16), generator=g) for _ in range(n)]
    return [(torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]


def logits(model, data):
    x = data[0][0] if isinstance(data[0], (tuple, list)) else data[0]
    with torch.no_grad():
        return forward_logits(model, x)


def planted_copies(family):
    """Model 0 (canonical) and two random symmetric images of it: the same function three times."""
    A = gm.canonicalize(BUILD[family](0))
    spec = build_spec(A)
    return [A] + [apply_transforms(A, random_transforms(spec, ("perm", "orth", "inv"), seed=s)) for s in (1, 2)]


@pytest.mark.parametrize("family", ["vit", "gpt2"])
def test_universe_matching_merges_planted_copies(family):
    models, data = planted_copies(family), data_of(family)
    res = gm.align_many(models, progress=False)
    assert len(res.models) == len(res.transforms) == 3 and res.seconds > 0
    states = [m.state_dict() for m in res.models + [res.reference]]
    for state in states[1:]:
        for k, v in states[0].items():
            assert torch.allclose(v.float(), state[k].float(), atol=1e-4), k
    for original, aligned in zip(models, res.models):
        assert torch.allclose(logits(original, data), logits(aligned, data), atol=1e-4)


def test_learned_refinement_keeps_each_function():
    models, data = planted_copies("vit"), data_of("vit")
    res = gm.align_many(models, method="learned", data=data, steps=2, progress=False)
    assert len(res.losses) == 2
    for original, aligned in zip(models, res.models):
        assert torch.allclose(logits(original, data), logits(aligned, data), atol=1e-4)


def test_align_many_arguments():
    with pytest.raises(ValueError, match="needs data"):
        gm.align_many([vit(0), vit(1)], method="learned")
    with pytest.raises(ValueError, match="unknown method"):
        gm.align_many([vit(0), vit(1)], method="activation")
    with pytest.raises(ValueError, match="at least two"):
        gm.align_many([vit(0)])
    with pytest.raises(ValueError, match="different families"):
        gm.align_many([vit(0), gpt(0)])


def test_interpolate_many_is_exact_and_checks_weights():
    models = [mlp(s) for s in range(3)]
    for k in range(3):
        one_hot = [float(i == k) for i in range(3)]
        mixed = gm.interpolate_many(models, one_hot).state_dict()
        assert all(torch.equal(v, models[k].state_dict()[n]) for n, v in mixed.items())
    mixed = gm.interpolate_many(models, [0.2, 0.3, 0.5]).state_dict()
    expected = sum(w * m.state_dict()["1.weight"] for w, m in zip((0.2, 0.3, 0.5), models))
    assert torch.allclose(mixed["1.weight"], expected, atol=1e-6)
    for weights, match in (([0.5, 0.6, -0.1], "non-negative"), ([0.2, 0.2, 0.2], "sum to 1"),
                           ([0.5, 0.5], "one weight per model")):
        with pytest.raises(ValueError, match=match):
            gm.interpolate_many(models, weights)
    with pytest.raises(ValueError, match="shape mismatch"):
        gm.interpolate_many([mlp(0), mlp(1, hidden=6)], [0.5, 0.5])


def test_simplex_grid():
    P = gm.simplex_grid(4)
    assert P.shape == (10, 3) and torch.allclose(P.sum(1), torch.ones(10)) and (P >= 0).all()
    corners = {tuple(r) for r in torch.eye(3).tolist()}
    assert corners <= {tuple(r) for r in P.tolist()}
    with pytest.raises(ValueError):
        gm.simplex_grid(1)


def test_simplex_losses_match_the_corners():
    models = [mlp(s) for s in range(3)]
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))]
    points, losses = simplex_losses(models, data, n=3)
    assert points.shape == (6, 3) and losses.shape == (6,)
    for i, row in enumerate(points.tolist()):
        if max(row) == 1.0:
            assert losses[i].item() == pytest.approx(gm.evaluate(models[row.index(1.0)], data)["loss"], abs=1e-6)
