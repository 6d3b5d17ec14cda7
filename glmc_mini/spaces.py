"""The space table of a model: which symmetry acts on which parameter axis.

A model's parameters live in a few named *spaces* (the book's notation page and chapters 1-4).
For a pre-norm transformer of width d, H heads of size d/H, FFN width f and L layers:

    residual  (d)         orthogonal, or permutation       every residual writer and reader, norm biases
    ffn.l     (f)         permutation / semi-permutation   fc1 output, fc2 input
    heads.l   (H units)   permutation / semi-permutation   q, k, v blocks of the qkv output, projection input
    qk.l      (H blocks)  invertible, one hd x hd map per head: query gets A, key gets A^-T
    ov.l      (H blocks)  invertible, one map per head: value gets B, projection input B^-1

A :class:`Spec` stores, for every parameter name of the stock model, one entry per tensor axis:
``None`` (no symmetry acts there) or a tuple of :class:`Segment`s that tile the axis. A segment
names the chain of ``(space, role)`` pairs acting on it, applied in order. Roles:

- ``"out"``: the axis carries a vector of the space: ``v -> T v`` (writers, fc1 rows, queries);
- ``"in"``:  the axis is read against the space: ``W -> W T^+`` with ``T^+ T = I``; for square T
  this is ``W T^-1``, so along the axis the matrix ``T^-T`` acts (readers, fc2 columns, keys);
- ``"norm"``: a LayerNorm gain or bias, which moves with the normalised stream.

This is Git Re-Basin's ``PermutationSpec`` generalised from permutations to four classes; a new
architecture is a new table (a new ``_spec_*`` builder), not new algorithms.
Introduced in chapter 1.
"""
from dataclasses import dataclass, field

import torch.nn as nn


class UnsupportedModelError(TypeError):
    """The model (or one of its modules) is outside what glmc_mini supports; the message says which."""


@dataclass(frozen=True)
class Space:
    """One space of a model. ``size`` units; a unit spans ``unit`` entries on an axis (head size
    for heads); ``blocks`` > 1 means the class acts block-diagonally (one map per head)."""
    name: str          # "residual", "ffn.3", "heads.3", "qk.3", "ov.3", "hidden.0"
    kind: str          # "residual" | "ffn" | "hidden" | "heads" | "qk" | "ov"
    size: int          # units (heads: H; qk/ov: H * head_dim)
    classes: tuple     # classes that act exactly: subset of ("perm", "semi", "orth", "inv")
    unit: int = 1      # axis entries per unit
    blocks: int = 1    # block-diagonal structure (qk/ov: H blocks of head_dim)
    layer: int = -1    # block index, -1 for model-wide spaces


@dataclass(frozen=True)
class Segment:
    """Entries ``start:stop`` of an axis, acted on by ``chain`` = ((space, role), ...) in order."""
    start: int
    stop: int
    chain: tuple


@dataclass
class Spec:
    """The space table of one model: ``spaces`` by name and ``axes[param][dim]`` segments."""
    family: str
    spaces: dict = field(default_factory=dict)
    axes: dict = field(default_factory=dict)
    act: str = "gelu"  # the FFN nonlinearity ("relu" admits semi-permutations)
    invariant: tuple = ()  # parameters and buffers no symmetry acts on (output biases, constant masks)
    tied: tuple = ()  # groups of names allowed to share one tensor (GPT-2's wte / lm_head), sorted tuples

    def add_space(self, space):
        self.spaces[space.name] = space
        return space.name

    def set_axis(self, param, dim, ndim, segments):
        entry = list(self.axes.get(param, (None,) * ndim))
        entry[dim] = tuple(segments)
        self.axes[param] = tuple(entry)

    def spaces_on(self, param):
        """Names of the spaces that act on some axis of ``param`` (empty if none does)."""
        return {s for ax in self.axes.get(param, ()) if ax for seg in ax for s, _ in seg.chain}

    def params_of(self, space):
        """Parameter names with an axis on which ``space`` acts."""
        return [p for p in self.axes if space in self.spaces_on(p)]

    def of_kind(self, kind):
        return [n for n, s in self.spaces.items() if s.kind == kind]


def _whole(n, *chain):
    return (Segment(0, n, tuple(chain)),)


_TORCH_ELEMENTWISE = (nn.GELU, nn.Tanh, nn.SiLU, nn.Sigmoid, nn.Mish, nn.ELU, nn.LeakyReLU, nn.ReLU6,
                      nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.SELU, nn.CELU, nn.Softsign)
# element-wise activations of the libraries whose models we take, by (module, class name); no parameters
_LIBRARY_ELEMENTWISE = {
    "transformers.activations": {"GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation",
                                 "ClippedGELUActivation", "AccurateGELUActivation", "PytorchGELUTanh", "GELUTanh",
                                 "SiLUActivation", "MishActivation", "ReLUSquaredActivation", "LaplaceActivation"},
    "timm.layers.activations": {"GELU", "GELUTanh", "QuickGELU", "Swish", "Sigmoid", "Tanh", "Mish", "HardMish",
                                "HardSigmoid", "HardSwish"},
}


def _activation_name(module, where=""):
    """ "relu" (nn.ReLU: positively homogeneous, admits semi-permutations), "gelu" (any other
    element-wise map without parameters: permutations only) or "identity"; anything else (a
    subclass, a map with parameters, one that mixes units) raises UnsupportedModelError naming it.
    Exact types: a subclass may override ``forward``."""
    cls = type(module)
    if cls is nn.ReLU:
        return "relu"
    if cls is nn.Identity:
        return "identity"
    if cls in _TORCH_ELEMENTWISE or cls.__name__ in _LIBRARY_ELEMENTWISE.get(cls.__module__, ()):
        if not any(True for _ in module.parameters()):
            return "gelu"
    at = f" at {where}" if where else ""
    raise UnsupportedModelError(f"unsupported activation {cls.__name__}{at}: glmc_mini knows element-wise maps "
                                "without parameters (ReLU, GELU and its variants, tanh, SiLU, sigmoid, ...)")


def _ffn_classes(act):
    return ("perm", "semi") if act == "relu" else ("perm",)


# --------------------------------------------------------------------------- MLP

def mlp_layers(model):
    """The one definition of a supported MLP: an ``nn.Sequential`` (exactly) of ``nn.Linear`` layers
    with element-wise activations (:func:`_activation_name`), ``nn.Dropout`` and ``nn.Identity``
    between them and an optional ``nn.Flatten`` before the first Linear; at least two Linears.
    Returns (Linear child names, gaps): gaps[i] lists the activations after Linear i.
    Anything else raises UnsupportedModelError naming the child (``models.model_family`` and
    ``build_spec`` both ask this function)."""
    if type(model) is not nn.Sequential:
        raise UnsupportedModelError(f"{type(model).__name__} is not an nn.Sequential MLP")
    linears, gaps = [], []
    for name, module in model.named_children():
        cls = type(module)
        if cls is nn.Linear:
            linears.append(name)
            gaps.append([])
        elif cls in (nn.Dropout, nn.Identity):
            continue
        elif cls is nn.Flatten:
            if linears:
                raise UnsupportedModelError(f"Flatten at {name} after a Linear layer: an MLP flattens its input only")
        elif cls in (nn.LayerNorm, nn.BatchNorm1d, nn.Softmax) or any(True for _ in module.parameters()):
            raise UnsupportedModelError(f"{cls.__name__} at {name} inside the MLP: glmc_mini transforms Linear "
                                        "layers and element-wise activations only")
        else:
            act = _activation_name(module, name)
            if not linears:
                raise UnsupportedModelError(f"activation {cls.__name__} at {name} before any Linear layer")
            gaps[-1].append(act)
    if len(linears) < 2:
        raise UnsupportedModelError("an MLP needs at least two Linear layers (one hidden space)")
    return linears, gaps


def _spec_mlp(model):
    """nn.Sequential of Linear layers with element-wise activations between them (:func:`mlp_layers`)."""
    linears, gaps = mlp_layers(model)

    def gap_act(acts):  # several element-wise maps in a row: ReLU-like only if all are ReLU
        acts = [a for a in acts if a != "identity"]
        if not acts:
            return "identity"
        return "relu" if set(acts) == {"relu"} else "gelu"

    hidden_acts = [gap_act(g) for g in gaps[:-1]]
    spec = Spec("mlp", act=hidden_acts[0])
    for i, (a, b) in enumerate(zip(linears[:-1], linears[1:])):
        act = hidden_acts[i]
        n = getattr(model, a).out_features
        space = spec.add_space(Space(f"hidden.{i}", "hidden", n, _ffn_classes(act), layer=i))
        spec.set_axis(f"{a}.weight", 0, 2, _whole(n, (space, "out")))
        if getattr(model, a).bias is not None:
            spec.set_axis(f"{a}.bias", 0, 1, _whole(n, (space, "out")))
        spec.set_axis(f"{b}.weight", 1, 2, _whole(n, (space, "in")))
    spec.invariant = (f"{linears[-1]}.bias",)
    return spec


# --------------------------------------------------------------------------- transformers

def _attention_spaces(spec, l, H, hd):
    heads = spec.add_space(Space(f"heads.{l}", "heads", H, ("perm", "semi"), unit=hd, layer=l))
    qk = spec.add_space(Space(f"qk.{l}", "qk", H * hd, ("inv",), blocks=H, layer=l))
    ov = spec.add_space(Space(f"ov.{l}", "ov", H * hd, ("inv",), blocks=H, layer=l))
    D = H * hd
    qkv = (Segment(0, D, ((qk, "out"), (heads, "out"))),
           Segment(D, 2 * D, ((qk, "in"), (heads, "out"))),
           Segment(2 * D, 3 * D, ((ov, "out"), (heads, "out"))))
    proj_in = (Segment(0, D, ((ov, "in"), (heads, "in"))),)
    return qkv, proj_in


def _layer_norm_types():
    """torch's LayerNorm and timm's (same function; a fused kernel), as exact types."""
    types = [nn.LayerNorm]
    try:
        from timm.layers.norm import LayerNorm
        types.append(LayerNorm)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _norm(spec, prefix, module, d):
    """A LayerNorm on the residual stream: gain and bias move with the normalised stream."""
    if type(module) not in _layer_norm_types():
        raise UnsupportedModelError(f"{prefix}: expected nn.LayerNorm, found {type(module).__name__}")
    if module.weight is not None:
        spec.set_axis(f"{prefix}.weight", 0, 1, _whole(d, ("residual", "norm")))
    if getattr(module, "bias", None) is not None:
        spec.set_axis(f"{prefix}.bias", 0, 1, _whole(d, ("residual", "norm")))


def _linear(spec, name, module, out_segments=None, in_segments=None, conv1d=False):
    """Axes of a Linear (weight [out, in]) or HF Conv1D (weight [in, out])."""
    out_dim, in_dim = (1, 0) if conv1d else (0, 1)
    if out_segments is not None:
        spec.set_axis(f"{name}.weight", out_dim, 2, out_segments)
        if module.bias is not None:
            spec.set_axis(f"{name}.bias", 0, 1, out_segments)
    if in_segments is not None:
        spec.set_axis(f"{name}.weight", in_dim, 2, in_segments)


def _require_identity(prefix, **modules):
    for attr, module in modules.items():
        if module is not None and not isinstance(module, (nn.Identity, nn.Dropout)):
            raise UnsupportedModelError(
                f"{prefix}.{attr} is {type(module).__name__}; glmc_mini supports pre-norm blocks without it")


def _vit_module_types():
    from timm.layers import DropPath, Mlp, PatchEmbed
    from timm.models.vision_transformer import Attention, Block, LayerScale
    return (PatchEmbed, nn.Conv2d, nn.Identity, nn.Dropout, DropPath, nn.Sequential, nn.ModuleList, Block,
            Attention, LayerScale, Mlp, nn.Linear) + _layer_norm_types()


def _gpt2_module_types():
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention, GPT2Block, GPT2Model
    from transformers.pytorch_utils import Conv1D
    return (GPT2Model, GPT2Block, GPT2Attention, GPT2MLP, Conv1D, nn.Embedding, nn.LayerNorm, nn.Dropout,
            nn.ModuleList, nn.Linear)


def _check_module_types(model, allowed):
    """Every submodule is one of ``allowed`` (exact types: a subclass may override ``forward``) or,
    under the name ``act``, an element-wise activation; else UnsupportedModelError naming it."""
    for name, module in model.named_modules():
        if not name or type(module) in allowed:
            continue
        if name.rsplit(".", 1)[-1] == "act":
            _activation_name(module, name)
            continue
        raise UnsupportedModelError(f"{name} is a {type(module).__name__}: glmc_mini does not know this module "
                                    f"inside a {type(model).__name__}, so it cannot transform it exactly")


def _spec_vit(model):
    """timm ``VisionTransformer``: pre-norm blocks, class token or average pooling."""
    d = model.embed_dim
    spec = Spec("vit", invariant=("head.bias",))
    spec.add_space(Space("residual", "residual", d, ("perm", "orth")))
    R_out, R_in = _whole(d, ("residual", "out")), _whole(d, ("residual", "in"))
    _check_vit_top(model)
    for p in ("cls_token", "reg_token", "pos_embed"):
        t = getattr(model, p, None)
        if isinstance(t, nn.Parameter):
            spec.set_axis(p, t.dim() - 1, t.dim(), R_out)
    spec.set_axis("patch_embed.proj.weight", 0, 4, R_out)
    if model.patch_embed.proj.bias is not None:
        spec.set_axis("patch_embed.proj.bias", 0, 1, R_out)
    acts = set()
    for l, blk in enumerate(model.blocks):
        acts.add(_vit_block(spec, f"blocks.{l}", blk, l, d, R_out, R_in))
    for name in ("norm", "fc_norm"):
        module = getattr(model, name)
        if isinstance(module, nn.LayerNorm):
            _norm(spec, name, module, d)
    if isinstance(model.head, nn.Linear):
        _linear(spec, "head", model.head, in_segments=R_in)
    spec.act = "relu" if acts == {"relu"} else "gelu"
    return spec


def _check_vit_top(model):
    if model.global_pool not in ("token", "avg"):
        raise UnsupportedModelError(f"VisionTransformer global_pool={model.global_pool!r}: only 'token' and 'avg'")
    _require_identity("VisionTransformer", norm_pre=model.norm_pre, patch_drop=getattr(model, "patch_drop", None),
                      patch_embed_norm=getattr(model.patch_embed, "norm", None))
    if getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError("VisionTransformer attn_pool (global_pool='map') is not supported")
    for name in ("norm", "fc_norm"):
        module = getattr(model, name)
        if not isinstance(module, (nn.LayerNorm, nn.Identity)):
            raise UnsupportedModelError(f"VisionTransformer.{name} is {type(module).__name__}; glmc_mini supports "
                                        "nn.LayerNorm")
    if not isinstance(model.norm, nn.LayerNorm) and not isinstance(model.fc_norm, nn.LayerNorm):
        raise UnsupportedModelError("VisionTransformer without a final norm: the head would read the raw "
                                    "residual stream, which has no orthogonal symmetry")
    if isinstance(model.head, nn.Identity):
        raise UnsupportedModelError("VisionTransformer without a head (num_classes=0): its output is the "
                                    "residual stream itself, so no transform of that stream keeps the function "
                                    "and the final norm has no reader to fold its gain into; give it a Linear head")
    if not isinstance(model.head, nn.Linear):
        raise UnsupportedModelError(f"VisionTransformer head {type(model.head).__name__}: only nn.Linear")


def _vit_block(spec, prefix, blk, l, d, R_out, R_in):
    from timm.models.vision_transformer import Block
    if type(blk) is not Block:
        raise UnsupportedModelError(f"{prefix} is {type(blk).__name__}; only timm's pre-norm Block is supported "
                                    "(post-norm and parallel blocks have no residual orthogonal symmetry)")
    attn, mlp = blk.attn, blk.mlp
    _require_identity(f"{prefix}.attn", q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None),
                      norm=getattr(attn, "norm", None))
    from timm.layers import Mlp
    if type(mlp) is not Mlp:
        raise UnsupportedModelError(f"{prefix}.mlp is {type(mlp).__name__}; only timm's Mlp (fc1, act, fc2)")
    _require_identity(f"{prefix}.mlp", norm=getattr(mlp, "norm", None))
    H = attn.num_heads
    hd = attn.qkv.out_features // (3 * H)
    qkv, proj_in = _attention_spaces(spec, l, H, hd)
    _norm(spec, f"{prefix}.norm1", blk.norm1, d)
    _norm(spec, f"{prefix}.norm2", blk.norm2, d)
    _linear(spec, f"{prefix}.attn.qkv", attn.qkv, out_segments=qkv, in_segments=R_in)
    _linear(spec, f"{prefix}.attn.proj", attn.proj, out_segments=R_out, in_segments=proj_in)
    for ls in ("ls1", "ls2"):
        if hasattr(getattr(blk, ls), "gamma"):
            spec.set_axis(f"{prefix}.{ls}.gamma", 0, 1, _whole(d, ("residual", "norm")))
    act = _activation_name(mlp.act, f"{prefix}.mlp.act")
    f = mlp.fc1.out_features
    ffn = spec.add_space(Space(f"ffn.{l}", "ffn", f, _ffn_classes(act), layer=l))
    _linear(spec, f"{prefix}.mlp.fc1", mlp.fc1, out_segments=_whole(f, (ffn, "out")), in_segments=R_in)
    _linear(spec, f"{prefix}.mlp.fc2", mlp.fc2, out_segments=R_out, in_segments=_whole(f, (ffn, "in")))
    return act


def _spec_gpt2(model):
    """Hugging Face ``GPT2LMHeadModel`` (pre-norm; Conv1D weights are stored [in, out])."""
    cfg = model.config
    if getattr(cfg, "add_cross_attention", False):
        raise UnsupportedModelError("GPT-2 with cross-attention is not supported")
    d, H = cfg.n_embd, cfg.n_head
    acts = {_activation_name(blk.mlp.act, f"transformer.h.{l}.mlp.act") for l, blk in enumerate(model.transformer.h)}
    for l, blk in enumerate(model.transformer.h):
        attn = blk.attn
        if getattr(attn, "is_cross_attention", False) or attn.num_heads != H or getattr(attn, "pruned_heads", None) \
                or attn.c_attn.weight.shape != (d, 3 * d) or attn.c_proj.weight.shape != (d, d):
            raise UnsupportedModelError(f"transformer.h.{l}.attn is not the configured self-attention of {H} heads "
                                        "of size n_embd / n_head (pruned heads or cross-attention)")
    invariant = tuple(f"transformer.h.{l}.attn.{b}" for l in range(len(model.transformer.h))
                      for b in ("bias", "masked_bias"))  # causal-mask buffers of older transformers
    spec = Spec("gpt2", act="relu" if acts == {"relu"} else "gelu", invariant=invariant,
                tied=(("lm_head.weight", "transformer.wte.weight"),))  # canonicalize unties them
    spec.add_space(Space("residual", "residual", d, ("perm", "orth")))
    R_out, R_in = _whole(d, ("residual", "out")), _whole(d, ("residual", "in"))
    spec.set_axis("transformer.wte.weight", 1, 2, R_out)
    spec.set_axis("transformer.wpe.weight", 1, 2, R_out)
    for l, blk in enumerate(model.transformer.h):
        p = f"transformer.h.{l}"
        qkv, proj_in = _attention_spaces(spec, l, H, d // H)
        _norm(spec, f"{p}.ln_1", blk.ln_1, d)
        _norm(spec, f"{p}.ln_2", blk.ln_2, d)
        _linear(spec, f"{p}.attn.c_attn", blk.attn.c_attn, qkv, R_in, conv1d=True)
        _linear(spec, f"{p}.attn.c_proj", blk.attn.c_proj, R_out, proj_in, conv1d=True)
        f = blk.mlp.c_fc.nf
        ffn = spec.add_space(Space(f"ffn.{l}", "ffn", f, _ffn_classes(spec.act), layer=l))
        _linear(spec, f"{p}.mlp.c_fc", blk.mlp.c_fc, _whole(f, (ffn, "out")), R_in, conv1d=True)
        _linear(spec, f"{p}.mlp.c_proj", blk.mlp.c_proj, R_out, _whole(f, (ffn, "in")), conv1d=True)
    _norm(spec, "transformer.ln_f", model.transformer.ln_f, d)
    # tied or not, lm_head reads ln_f's output; tied weights must be untied (canonicalize) before
    # any non-permutation acts on the residual stream, since wte writes and lm_head reads.
    spec.set_axis("lm_head.weight", 1, 2, R_in)
    return spec


def build_spec(model):
    """The :class:`Spec` of a stock model, derived from the instance (its modules and shapes).

    Supports ``nn.Sequential`` MLPs (:func:`mlp_layers`), timm ``VisionTransformer`` and HF
    ``GPT2LMHeadModel`` (the classes themselves, not subclasses). Coverage is checked, not assumed:
    every submodule must be of a known type and every parameter and buffer must be placed on the
    table's axes or listed as invariant (``Spec.invariant``); anything else raises
    :class:`UnsupportedModelError` naming the unsupported part.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"a {type(model).__name__} is not a model: expected a torch nn.Module")
    if getattr(model, "glmc_family", None) == "circuit":
        spec = model.spec()
        return _check_coverage(model, spec)
    if isinstance(model, nn.Sequential):
        return _check_coverage(model, _spec_mlp(model))
    try:
        from timm.models.vision_transformer import VisionTransformer
        if isinstance(model, VisionTransformer):
            spec = _check_coverage(model, _spec_vit(model))
            _check_module_types(model, _vit_module_types())
            return _exact_class(model, VisionTransformer, spec)
    except ImportError:  # pragma: no cover
        pass
    from transformers import GPT2LMHeadModel
    if isinstance(model, GPT2LMHeadModel):
        spec = _check_coverage(model, _spec_gpt2(model))
        _check_module_types(model, _gpt2_module_types())
        return _exact_class(model, GPT2LMHeadModel, spec)
    raise UnsupportedModelError(
        f"{type(model).__name__} is not supported: glmc_mini handles nn.Sequential MLPs, timm "
        "VisionTransformer and transformers GPT2LMHeadModel")


def _check_coverage(model, spec):
    """UnsupportedModelError naming every parameter / buffer the table neither places nor lists as
    invariant, any tensor shared between places the table does not expect to be tied (a module or
    weight used twice would get two transforms), and any forward hook (a hook may compute anything,
    and the transformed or circuit model would run it on transformed values, or not at all)."""
    _check_hooks(model)
    state, groups = _named_state(model), {}
    for name, t in state:
        groups.setdefault(id(t), []).append(name)
    for names in groups.values():
        if len(names) > 1 and tuple(sorted(names)) not in spec.tied:
            raise UnsupportedModelError(f"{type(model).__name__} shares one tensor between {', '.join(names)} (a "
                                        "module or weight used in two places): each place would get its own "
                                        "transform, so glmc_mini cannot transform it exactly; give each its own copy")
    placed = set(spec.axes) | set(spec.invariant)
    missing = [n for n, _ in state if n not in placed]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise UnsupportedModelError(f"{type(model).__name__} has parameters or buffers that glmc_mini's space table "
                                    f"does not place: {shown}. No symmetry would transform them, so the result "
                                    "would not compute the same function")
    return spec


def _named_state(model):
    return list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")


def _check_hooks(model):
    for name, module in model.named_modules():
        for attr in _HOOK_DICTS:
            if getattr(module, attr, None):
                kind = "forward pre-hook" if "pre" in attr else "forward hook"
                raise UnsupportedModelError(f"{name or type(model).__name__} has a {kind}: a hook may change what the "
                                            "module computes, and glmc_mini cannot transform it exactly; remove it "
                                            "(handle.remove()) before aligning, merging or converting")


def _exact_class(model, cls, spec):
    if type(model) is not cls:
        raise UnsupportedModelError(f"{type(model).__name__} is a subclass of {cls.__name__}: glmc_mini supports "
                                    f"{cls.__name__} itself (a subclass may compute something its space table "
                                    "does not describe)")
    return spec
