"""Interpolation, evaluation and the barrier, on cases with known answers; the figures."""
import math

import matplotlib
import pytest
import torch
from torch import nn

import glmc_mini as gm
from glmc_mini.barrier import barrier_of

matplotlib.use("Agg")


class Bump(nn.Module):
    """Two-class model with one scalar parameter w: logits [c (w^2 - 1/2), 0] for every input.

    With every label 0 the loss is L(w) = log(1 + exp(-c (w^2 - 1/2))). Interpolating w = -1 and
    w = +1 passes through w = 0 at lambda = 1/2, so the barrier is
    log(1 + e^{c/2}) - log(1 + e^{-c/2}) = c / 2; the prediction is right iff w^2 > 1/2.
    """
    glmc_kind = "classification"

    def __init__(self, w, c=4.0):
        super().__init__()
        self.w, self.c = nn.Parameter(torch.tensor(float(w))), c

    def forward(self, x):
        z = self.c * (self.w ** 2 - 0.5) * torch.ones(len(x), device=x.device)
        return torch.stack([z, torch.zeros_like(z)], dim=1)  # (B, 2)


def label_zero_batches(n=3, size=4):
    return [(torch.zeros(size, 1), torch.zeros(size, dtype=torch.long)) for _ in range(n)]


def tiny_mlp(seed, hidden=8):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 3))


def tiny_gpt(seed):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=8, n_embd=16, n_layer=1, n_head=2,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=None, eos_token_id=None))


def test_known_positive_barrier():
    curve = gm.barrier(Bump(-1.0), Bump(1.0), label_zero_batches(), num_points=11)
    assert curve.barrier == pytest.approx(4.0 / 2, abs=1e-5)
    assert curve.losses[5] == pytest.approx(math.log1p(math.exp(2.0)), abs=1e-5)
    assert curve.loss_a == curve.loss_b == pytest.approx(math.log1p(math.exp(-2.0)), abs=1e-6)
    assert curve.accs == [1.0, 1.0] + [0.0] * 7 + [1.0, 1.0]  # right iff (2 lambda - 1)^2 > 1/2
    assert curve.barrier_acc == pytest.approx(1.0 - 0.0)


def test_barrier_of_affine_and_self_interpolation_is_zero():
    lambdas = [i / 10 for i in range(11)]
    assert barrier_of(lambdas, [2.0 - 1.5 * lam for lam in lambdas]) == pytest.approx(0.0, abs=1e-12)
    assert barrier_of(lambdas, [1.0, 0.5, 1.0]) == pytest.approx(0.0)  # below the chord: zero
    model = tiny_mlp(0)
    data = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(2)]
    curve = gm.barrier(model, model, data, num_points=5)
    assert curve.barrier == pytest.approx(0.0, abs=1e-6) and curve.barrier_acc == pytest.approx(0.0, abs=1e-9)
    assert max(curve.losses) - min(curve.losses) < 1e-6 and curve.lambdas == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_interpolate_values_and_inputs_untouched():
    model_a, model_b = tiny_mlp(0), tiny_mlp(1)
    before = {k: v.clone() for k, v in model_a.state_dict().items()}
    mid = gm.interpolate(model_a, model_b, 0.25)
    for key, value in mid.state_dict().items():
        assert torch.allclose(value, 0.75 * model_a.state_dict()[key] + 0.25 * model_b.state_dict()[key])
    assert all(torch.equal(before[k], v) for k, v in model_a.state_dict().items())
    assert type(mid) is nn.Sequential and mid is not model_a
    end = gm.interpolate(model_a, model_b, 1.0).state_dict()
    assert all(torch.equal(end[k], v) for k, v in model_b.state_dict().items())


def test_interpolate_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"1\.weight"):
        gm.interpolate(tiny_mlp(0, hidden=8), tiny_mlp(0, hidden=6), 0.5)
    with pytest.raises(ValueError, match="Sequential.*Bump"):
        gm.interpolate(tiny_mlp(0), Bump(1.0), 0.5)
    with pytest.raises(ValueError, match="only one"):
        gm.interpolate(nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2, bias=False)), 0.5)
    untied = tiny_gpt(1)
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())
    with pytest.raises(ValueError, match="tying"):
        gm.interpolate(tiny_gpt(0), untied, 0.5)


def test_interpolate_gpt2_keeps_tied_embeddings():
    mid = gm.interpolate(tiny_gpt(0), tiny_gpt(1), 0.5)
    assert mid.lm_head.weight.data_ptr() == mid.transformer.wte.weight.data_ptr()
    expected = 0.5 * (tiny_gpt(0).transformer.wte.weight + tiny_gpt(1).transformer.wte.weight)
    assert torch.allclose(mid.transformer.wte.weight, expected)


def test_evaluate_classifier_matches_manual_and_restores_mode():
    model = tiny_mlp(0).train()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    out = gm.evaluate(model, [(x[:6], y[:6]), (x[6:], y[6:])])
    logits = model(x)
    assert out["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), abs=1e-6)
    assert out["acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert model.training


def test_evaluate_language_model_all_batch_formats():
    model = tiny_gpt(0)
    x = torch.randint(0, 256, (6, 8))
    reference = model(input_ids=x, labels=x).loss.item()  # HF: mean over B * (T - 1) shifted tokens
    for data in ([x[:3], x[3:]], [(x[:3], None), (x[3:], None)], (b for b in [x[:3], x[3:]])):
        out = gm.evaluate(model, data)
        assert out["loss"] == pytest.approx(reference, abs=1e-5) and out["acc"] is None


def test_barrier_materialises_an_iterator_once():
    model_a, model_b = tiny_gpt(0), tiny_gpt(1)
    batches = [torch.randint(0, 256, (2, 8)) for _ in range(3)]
    from_list = gm.barrier(model_a, model_b, batches, num_points=3)
    from_iter = gm.barrier(model_a, model_b, iter(batches), num_points=3)
    assert from_list.losses == pytest.approx(from_iter.losses) and from_iter.accs is None
    assert from_iter.barrier_acc is None and from_iter.barrier >= 0


def test_gm_barrier_is_callable_whatever_was_imported_first():
    import glmc_mini.barrier  # noqa: F401  (binds the package attribute to the module)
    curve = gm.barrier(Bump(-1.0), Bump(1.0), label_zero_batches(1), num_points=3)
    assert isinstance(curve, gm.BarrierCurve)


def test_plots_return_axes():
    curve = gm.barrier(Bump(-1.0), Bump(1.0), label_zero_batches(1), num_points=5)
    assert gm.plot_curves({"vanilla": curve}).get_legend() is not None
    assert gm.plot_curves({"vanilla": curve}, metric="acc").get_ylabel() == "test accuracy"
    assert gm.plot_matrix(torch.eye(4)[[2, 0, 3, 1]], title="P").get_title() == "P"
    W = torch.distributions.Dirichlet(torch.ones(3)).sample((30,))
    points = torch.cat([torch.eye(3), W])
    ax = gm.plot_simplex(points, points[:, 0] ** 2)
    assert {t.get_text() for t in ax.texts} >= {"A", "B", "C"}
    import matplotlib.pyplot as plt
    plt.close("all")
