"""The MLP family: an ``nn.Sequential`` of Linear layers with element-wise activations between them.

Its spaces are the hidden layers (``hidden.i``, permutations; semi-permutations too when every
activation of the gap is a ReLU). It has no residual stream, no norms and no attention, so its
canonical form is the model itself. Introduced in chapter 1.
"""
import torch.nn as nn

from ..spaces import Space, Spec, UnsupportedModelError, _activation_name, _ffn_classes, _whole
from . import Family

_ACTS = {"gelu": nn.GELU, "relu": nn.ReLU}
_PASS = (nn.Linear, nn.Flatten, nn.Dropout, nn.Identity)  # children that are not activations


def mlp_layers(model):
    """The one definition of a supported MLP: an ``nn.Sequential`` (exactly) of ``nn.Linear`` layers
    with element-wise activations (``spaces._activation_name``), ``nn.Dropout`` and ``nn.Identity``
    between them and an optional ``nn.Flatten`` before the first Linear; at least two Linears.
    Returns (Linear child names, gaps): gaps[i] lists the activations after Linear i.
    Anything else raises UnsupportedModelError naming the child (detection and the space table
    both ask this function)."""
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


def _gap_act(acts):
    """Several element-wise maps in a row: ReLU-like only if all are ReLU."""
    acts = [a for a in acts if a != "identity"]
    if not acts:
        return "identity"
    return "relu" if set(acts) == {"relu"} else "gelu"


def stock_mlp(in_features, hidden, num_classes, act="gelu"):
    """Flatten -> (Linear -> act) per hidden width -> Linear."""
    layers, width = [nn.Flatten()], in_features
    for h in hidden:
        layers += [nn.Linear(width, h), _ACTS[act]()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


class MLP(Family):
    """``nn.Sequential`` MLPs (:func:`mlp_layers`); presets: Flatten -> (Linear -> act)* -> Linear."""
    name, kind = "mlp", "classification"
    what = "nn.Sequential MLPs (Linear layers, element-wise activations)"

    def claims(self, model):
        """Any ``nn.Sequential`` is claimed; one that is not a supported MLP raises the reason."""
        if not isinstance(model, nn.Sequential):
            return False
        mlp_layers(model)
        return True

    def spec(self, model):
        """hidden.i between Linear i and i+1: rows of Linear i ("out"), columns of Linear i+1 ("in");
        the last bias is invariant."""
        linears, gaps = mlp_layers(model)
        hidden_acts = [_gap_act(g) for g in gaps[:-1]]
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

    def canonicalize(self, model):
        """Nothing to do: an MLP has no norms, so every model is its own canonical form."""

    def is_canonical(self, model, atol=1e-5):
        return True

    def blocks(self, model):
        return []

    def activation_sites(self, model, spec):
        """hidden.i: the output of the i-th activation module; no residual stream."""
        acts = [m for m in model.children() if not isinstance(m, _PASS)]
        return {f"hidden.{i}": (m, "output") for i, m in enumerate(acts[:len(spec.of_kind("hidden"))])}, []

    def build(self, config):
        """:func:`stock_mlp` with the preset's keyword arguments."""
        return stock_mlp(**config.model)

    def describe(self, config):
        m = config.model
        return f"MLP hidden {m['hidden']}, {m['act'].upper()}"
