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
- ``"norm"``: a LayerNorm gain or bias, which moves with the normalised stream;
- ``"gain"``: an RMSNorm gain, 1 in canonical form: permutations reorder it, an orthogonal map
  leaves the all-ones gain as it is (RMSNorm without gain commutes with every orthogonal map);
- ``"copy"``: the unit is copied but never rescaled (a SwiGLU gate row: SiLU is not homogeneous).

This is Git Re-Basin's ``PermutationSpec`` generalised from permutations to four classes; a new
architecture is a new table (a new family in ``glmc_mini.families``), not new algorithms. This module
holds the table's vocabulary, which every family uses, and the generic checks of :func:`build_spec`.
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
    fix_ones: bool = False  # residual of a LayerNorm family: an orthogonal map must fix the all-ones direction
    rotary: bool = False    # qk under rotary embeddings: per-head maps commute with the rotation (Rotary)


@dataclass(frozen=True)
class Segment:
    """Entries ``start:stop`` of an axis, acted on by ``chain`` = ((space, role), ...) in order.

    ``units``: ((space, entries per unit), ...) overriding a space's own ``unit`` on this axis (a
    key-value group of heads spans more query rows than key rows); ``repeats``: ((space, r), ...):
    each block of a block-diagonal space spans r consecutive copies on this axis, all transformed
    by that block's map (the query heads that share one key-value head)."""
    start: int
    stop: int
    chain: tuple
    units: tuple = ()
    repeats: tuple = ()

    def unit_of(self, space, default):
        return dict(self.units).get(space, default)

    def repeat_of(self, space):
        return dict(self.repeats).get(space, 1)


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


def build_spec(model):
    """The :class:`Spec` of a supported model, derived from the instance (its modules and shapes).

    The model's family (``families.detect``: ``nn.Sequential`` MLPs, timm ``VisionTransformer``,
    HF ``GPT2LMHeadModel``, circuit models, ...) builds the table and checks its module types and
    exact class. Coverage is checked here, not assumed: every parameter and buffer must be placed on
    the table's axes or listed as invariant (``Spec.invariant``) and no module may carry a hook;
    anything else raises :class:`UnsupportedModelError` naming the unsupported part.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"a {type(model).__name__} is not a model: expected a torch nn.Module")
    from .families import detect
    return _check_coverage(model, detect(model).spec(model))


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


def _stock_checks(model, spec, allowed, cls):
    """The checks of a stock library class, in the order that names the most specific reason first:
    coverage (an unplaced parameter, e.g. a subclass's extra token), every submodule of a type in
    ``allowed`` (:func:`_check_module_types`), then the class itself, not a subclass. Returns ``spec``."""
    _check_coverage(model, spec)
    _check_module_types(model, allowed)
    return _exact_class(model, cls, spec)


def _exact_class(model, cls, spec):
    if type(model) is not cls:
        raise UnsupportedModelError(f"{type(model).__name__} is a subclass of {cls.__name__}: glmc_mini supports "
                                    f"{cls.__name__} itself (a subclass may compute something its space table "
                                    "does not describe)")
    return spec
