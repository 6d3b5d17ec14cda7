"""The function-preserving canonical form that stays the stock class.

A pre-norm transformer reads its residual stream x only through LayerNorms,

    LN(x) = g ⊙ (M x) / rms(M x) + b,      M = I - (1/d) 1 1^T,

and every reader W of a norm sees ``W LN(x) = (W diag(g)) [(M x)/rms(M x) + b/g]``. So:

1. untie the output embedding from the input embedding (GPT-2);
2. fold LayerScale gains into the writer before them (``ls.gamma -> 1``);
3. centre every residual writer: its output axis is multiplied by M (weights, biases, embeddings,
   positional embeddings, class token). LN(Mx) = LN(x), so nothing downstream changes;
4. fold each norm's gain into its readers (``W -> W diag(g)``) and set ``g -> 1``, ``b -> b / g``.

Afterwards LN(O x) = O LN(x) for every orthogonal O that fixes the all-ones direction, so one
such O can rotate the whole residual stream (``symmetries.Orthogonal``).
Introduced in chapter 3.
"""
import copy

import torch
import torch.nn as nn

from .spaces import build_spec, UnsupportedModelError


def _norm_readers(model, family):
    """(norm module name, [reader module names]) pairs of a pre-norm transformer."""
    if family == "vit":
        pairs = [(f"blocks.{l}.norm1", [f"blocks.{l}.attn.qkv"]) for l in range(len(model.blocks))]
        pairs += [(f"blocks.{l}.norm2", [f"blocks.{l}.mlp.fc1"]) for l in range(len(model.blocks))]
        final = "norm" if isinstance(model.norm, nn.LayerNorm) else "fc_norm"
        pairs.append((final, ["head"] if isinstance(model.head, nn.Linear) else []))
        return pairs
    pairs = [(f"transformer.h.{l}.ln_1", [f"transformer.h.{l}.attn.c_attn"]) for l in range(len(model.transformer.h))]
    pairs += [(f"transformer.h.{l}.ln_2", [f"transformer.h.{l}.mlp.c_fc"]) for l in range(len(model.transformer.h))]
    pairs.append(("transformer.ln_f", ["lm_head"]))
    return pairs


def _untie(model):
    if model.lm_head.weight is model.transformer.wte.weight:
        model.lm_head.weight = nn.Parameter(model.transformer.wte.weight.detach().clone())
    model.config.tie_word_embeddings = False


def _fold_layerscale(model):
    for blk in model.blocks:
        for ls, writer in (("ls1", blk.attn.proj), ("ls2", blk.mlp.fc2)):
            gamma = getattr(getattr(blk, ls), "gamma", None)
            if gamma is not None:
                writer.weight.mul_(gamma[:, None])
                if writer.bias is not None:
                    writer.bias.mul_(gamma)
                gamma.fill_(1.0)


def _centre_writers(model, spec):
    """x -> M x on every axis where the residual space acts as 'out'."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, axes in spec.axes.items():
        for dim, segments in enumerate(axes):
            if segments and segments[0].chain == (("residual", "out"),):
                p = params[name]
                p.sub_(p.mean(dim=dim, keepdim=True))


def _fold_gains(model, family):
    for norm_name, readers in _norm_readers(model, family):
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

    Inputs: a stock MLP (returned as a copy: it has no norms), timm VisionTransformer or HF
    GPT2LMHeadModel. The input model is never modified. Non-finite weights raise ValueError.
    Introduced in chapter 3.
    """
    spec = build_spec(model)
    _check_finite(model)
    new = copy.deepcopy(model)
    if spec.family not in ("vit", "gpt2"):
        return new
    with torch.no_grad():
        if spec.family == "gpt2":
            _untie(new)
            spec = build_spec(new)
        else:
            _fold_layerscale(new)
        _centre_writers(new, spec)
        _fold_gains(new, spec.family)
    return new


def _check_finite(model):
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"parameter {name} has non-finite values (nan or inf)")


def is_canonical(model, atol=1e-5):
    """Norm gains (and LayerScale gains) are 1, writers centred, output embedding untied."""
    spec = build_spec(model)
    if spec.family not in ("vit", "gpt2"):
        return True
    if spec.family == "gpt2" and model.lm_head.weight is model.transformer.wte.weight:
        return False
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
