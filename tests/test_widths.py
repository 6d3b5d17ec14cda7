"""embed_wider: a narrow transformer re-expressed in a wider one's shapes computes exactly the same
function (timm ViT with token and average pooling, HF GPT-2), stays a canonical stock model that
gm.align handles, and unsupported pairs get clear errors. Tiny models built directly."""
import copy

import pytest
import torch
import torch.nn as nn

import glmc_mini as gm
from glmc_mini.models import forward_logits
from glmc_mini.widths import embed_wider
from test_align import _randomise_norms  # tests/ is on sys.path (pytest's rootdir-relative import)


def vit(width=16, seed=0, pool="token", depth=1, heads=2):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    return _randomise_norms(VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=width,
                                              depth=depth, num_heads=heads, mlp_ratio=2, global_pool=pool)).eval()


def gpt(width=16, seed=0, depth=1, heads=2):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=32, n_positions=16, n_embd=width, n_layer=depth, n_head=heads, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    return _randomise_norms(GPT2LMHeadModel(cfg)).eval()


def inputs(family, seed=0):
    g = torch.Generator().manual_seed(seed)
    if family == "gpt2":
        return torch.randint(0, 32, (4, 16), generator=g)
    return torch.randn(4, 1, 8, 8, generator=g)


def logits(model, x):
    with torch.no_grad():
        return forward_logits(model.eval(), x).double()


CASES = {"vit-token": lambda w, s: vit(w, s), "vit-avg": lambda w, s: vit(w, s, pool="avg"),
         "gpt2": lambda w, s: gpt(w, s)}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [None, 3], ids=["helmert", "random"])
def test_embedded_model_reproduces_the_narrow_model(case, seed):
    narrow, wide = CASES[case](16, 0), CASES[case](24, 1)
    before = copy.deepcopy(narrow.state_dict())
    embedded = embed_wider(narrow, wide, seed=seed)
    assert type(embedded) is type(wide) and gm.is_canonical(embedded)
    shapes = {k: v.shape for k, v in wide.state_dict().items()}
    assert {k: v.shape for k, v in embedded.state_dict().items()} == shapes
    x = inputs("gpt2" if case == "gpt2" else "vit")
    a, b = logits(narrow, x), logits(embedded, x)
    assert float((a - b).norm() / a.norm()) < 1e-4
    assert all(torch.equal(before[k], v) for k, v in narrow.state_dict().items())  # input untouched


def test_wider_ffn_is_padded_with_zero_units():
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(1)
    wide = VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=24, depth=1,
                             num_heads=2, mlp_ratio=3).eval()
    narrow, x = vit(16), inputs("vit")
    embedded = embed_wider(narrow, wide)
    assert embedded.blocks[0].mlp.fc1.out_features == 72
    a = logits(narrow, x)
    assert float((a - logits(embedded, x)).norm() / a.norm()) < 1e-4


def test_align_and_barrier_run_on_the_embedded_model():
    narrow, wide = vit(16, 0), vit(24, 1)
    embedded = embed_wider(narrow, wide)
    res = gm.align(wide, embedded, method="weight", progress=False)
    x = inputs("vit")
    assert torch.allclose(logits(res.model_b, x), logits(narrow, x), atol=1e-4)
    data = [(x, torch.arange(4))]
    curve = gm.barrier(res.model_a, res.model_b, data, num_points=3)
    assert len(curve.losses) == 3 and all(torch.isfinite(torch.tensor(curve.losses)))


@pytest.mark.parametrize("narrow, wide, match", [
    (lambda: vit(24), lambda: vit(16), "narrower"),
    (lambda: vit(16), lambda: gpt(24), "different families"),
    (lambda: vit(16), lambda: vit(24, depth=2), "different depths"),
    (lambda: gpt(16), lambda: gpt(24, heads=4), "split_heads"),
])
def test_unsupported_pairs(narrow, wide, match):
    with pytest.raises(ValueError, match=match):
        embed_wider(narrow(), wide())


def test_different_norm_eps_is_refused():
    wide = vit(24)
    for m in wide.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = 1e-5
    with pytest.raises(ValueError, match="eps"):
        embed_wider(vit(16), wide)
