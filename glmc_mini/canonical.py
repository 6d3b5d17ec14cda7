"""The function-preserving canonical form that stays the stock class.

A pre-norm transformer reads its residual stream x only through LayerNorms,

    LN(x) = g ⊙ (M x) / rms(M x) + b,      M = I - (1/d) 1 1^T,

and every reader W of a norm sees ``W LN(x) = (W diag(g)) [(M x)/rms(M x) + b/g]``. So:

1. untie the output embedding from the input embedding (GPT-2);
2. fold LayerScale gains into the writer before them (``ls.gamma -> 1``; ViT);
3. centre every residual writer: its output axis is multiplied by M (weights, biases, embeddings,
   positional embeddings, class token). LN(Mx) = LN(x), so nothing downstream changes;
4. fold each norm's gain into its readers (``W -> W diag(g)``) and set ``g -> 1``, ``b -> b / g``.

Afterwards LN(O x) = O LN(x) for every orthogonal O that fixes the all-ones direction, so one
such O can rotate the whole residual stream (``symmetries.Orthogonal``).
Which modules are norms, readers and writers is the family's (``families``; steps 1-2 are its
``prepare``); the steps themselves are here.
Introduced in chapter 3.
"""
import copy

import torch

from .families import detect
from .spaces import build_spec, UnsupportedModelError


def _centre_writers(model, spec):
    """x -> M x on every axis where the residual space acts as 'out'."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, axes in spec.axes.items():
        for dim, segments in enumerate(axes):
            if segments and segments[0].chain == (("residual", "out"),):
                p = params[name]
                p.sub_(p.mean(dim=dim, keepdim=True))


def _fold_gains(model, norm_readers):
    """W -> W diag(g) for every reader of each norm, then g -> 1 and b -> b / g.

    ``norm_readers``: [(norm module name, [reader module names])] (the family's ``norm_readers``)."""
    for norm_name, readers in norm_readers:
        norm = model.get_submodule(norm_name)
        if norm.weight is None:  # elementwise_affine=False: no gain (and no bias) to fold
            continue
        g = norm.weight.detach().clone()
        if (g.abs() < 1e-12).any():
            raise UnsupportedModelError(f"{norm_name} has a zero gain: it cannot be folded into its readers")
        if not readers:
            raise UnsupportedModelError(f"{norm_name} has no reader to fold its gain into (a "
                                        f"{type(model).__name__} without a Linear head, num_classes=0): "
                                        "its output is the residual stream itself")
        for r in readers:
            W = model.get_submodule(r).weight
            in_dim = 0 if type(model.get_submodule(r)).__name__ == "Conv1D" else 1
            shape = [1, 1]
            shape[in_dim] = -1
            W.mul_(g.view(shape).to(W.dtype))
        if norm.bias is not None:
            norm.bias.div_(g)
        norm.weight.fill_(1.0)


def canonicalize(model):
    """A function-preserving copy of ``model`` in canonical form (see the module docstring).

    Inputs: any supported model; its family (``families.detect``) canonicalises the copy in place:
    a stock MLP (and a circuit model) is returned as a plain copy, a timm VisionTransformer or HF
    GPT2LMHeadModel goes through steps 1-4. The input model is never modified. Non-finite weights
    raise ValueError. Introduced in chapter 3.
    """
    build_spec(model)  # UnsupportedModelError naming whatever is not supported
    _check_finite(model)
    new = copy.deepcopy(model)
    with torch.no_grad():
        detect(new).canonicalize(new)
    return new


def _check_finite(model):
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"parameter {name} has non-finite values (nan or inf)")


def is_canonical(model, atol=1e-5):
    """Norm gains (and LayerScale gains) are 1, writers centred, output embedding untied (the
    family's ``is_canonical``; MLPs and circuit models always are)."""
    build_spec(model)
    return detect(model).is_canonical(model, atol)


def centred_with_unit_gains(model, spec, atol=1e-5):
    """Every residual writer centred along its residual axis and every norm gain 1 (to ``atol``)."""
    state = model.state_dict()
    for name, axes in spec.axes.items():
        for dim, segments in enumerate(axes):
            if not segments:
                continue
            role = segments[0].chain
            if role == (("residual", "out"),) and state[name].mean(dim).abs().max() > atol:
                return False
            if role == (("residual", "norm"),) and not name.endswith("bias") and \
                    (state[name] - 1).abs().max() > atol:
                return False
    return True
