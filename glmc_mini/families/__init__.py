"""One adapter per model family: everything glmc_mini knows about one kind of model, in one place.

The algorithms (``symmetries``, ``matching``, ``canonical``, ``circuit``, ``widths``) are written
once against the space table (``spaces.Spec``); what differs between model families -- where the
parameters sit, how the stock class is checked, which LayerNorm feeds which reader, where the FFN
activations can be recorded, how attention scales its logits, how a preset is built -- is a
:class:`Family`. Every entry point asks :func:`detect` which family a model belongs to (one
detector), and task presets name theirs (``TaskConfig.family``, :func:`by_name`).

Adding a family is one module here with a :class:`Family` subclass plus one line in
``_REGISTERED`` (which builds :data:`FAMILIES`). A capability a family does not have is refused by
name: the base class raises :class:`~glmc_mini.spaces.UnsupportedModelError` naming the family and
the capability.
Introduced in chapter 1.
"""
import importlib
import sys

from ..spaces import UnsupportedModelError

KINDS = ("classification", "language")

# the capabilities a family implements or refuses (Family.supports, tests/test_families.py)
CAPABILITIES = ("spec", "canonicalize", "is_canonical", "blocks", "activation_sites", "attention_logit_scale",
                "to_circuit", "build")


def _isinstance(model, module, name):
    """isinstance(model, module.name), without importing ``module`` (slow) if nobody has yet: a model
    of that class cannot exist before its module is imported."""
    mod = sys.modules.get(module)
    return mod is not None and isinstance(model, getattr(mod, name, ()))


class Family:
    """The interface of a model family (subclass it; the defaults refuse by name).

    Attributes
      ``name``  the family's name, as in ``Spec.family`` and ``TaskConfig.family`` ("mlp", "vit", "gpt2", ...);
      ``kind``  "classification" (logits [B, C]) or "language" (causal LM, logits [B, T, V]);
      ``what``  the supported models in words, for error messages ("timm VisionTransformer");
      ``resizable``  kinds of space whose width a transform may change (``symmetries``): FFN and
          hidden units, which ``symmetries.apply_transforms`` resizes on a stock model; None: any;
      ``refusals``  {capability: reason}: why the family refuses a capability (in the message).

    Detection (required)
      ``claims(model) -> bool``  cheap: is ``model`` of this family? Must not import a library the
          caller has not imported (use :func:`_isinstance`). May raise UnsupportedModelError naming
          the unsupported part of a model that is this family's container but not one it handles.

    Capabilities (the defaults raise UnsupportedModelError naming the family and the capability)
      ``spec(model) -> spaces.Spec``  the space table, with the family's own checks (a stock library
          class: ``spaces._stock_checks``, i.e. coverage, module types, exact class, in that order);
          ``spaces.build_spec`` runs the generic coverage and hook checks on every family's table.
      ``canonicalize(model)``  in place, on the copy ``canonical.canonicalize`` made, under no_grad:
          bring ``model`` to the family's canonical form (same function).
      ``is_canonical(model, atol) -> bool``  is ``model`` in that form (to ``atol``)?
      ``blocks(model) -> list``  the transformer blocks in order (an MLP has none: []).
      ``activation_sites(model, spec) -> (sites, residual_readers)``  for activation matching:
          ``sites`` {space name: (module, "output" | "input")}, the module whose output (or whose
          first input) holds the space's activations [..., n]; ``residual_readers`` the modules
          whose first input is the residual stream (their inputs are stacked).
      ``attention_logit_scale(model, layer) -> float``  the factor on q . k in block ``layer``.
      ``to_circuit(model, form) -> circuit.CircuitTransformer``  the circuit module of a canonical
          ``model`` (``circuit.to_circuit`` canonicalises first and calls this under no_grad).
      ``build(config) -> nn.Module``  the stock model of a task preset (``config.model`` its keyword
          arguments); ``models.build_model`` seeds the RNG and calls it.

    Hooks with defaults
      ``untie(model) -> model``  in place: give parameters the stock model ties (one tensor in two
          places) their own tensors (``widths`` loads a canonical state into a copy); default: nothing is tied.
      ``describe(config) -> str``  one line of a preset's model sizes.
      ``config_defaults(config) -> dict``  a Hugging Face config dict (``to_dict()``) with the
          family's implicit fields written out (GPT-2's ``n_inner=None`` is ``4 * n_embd``), so
          two configs compare by what they compute (``checks.check_architecture``); default: as is.
      ``supports(capability) -> bool``  whether this family overrides the refusing default.

    LayerNorm pre-norm transformers subclass ``prenorm.PreNormTransformer``, which implements the
    canonical form and the activation sites from ``blocks``, ``norm_readers`` and ``prepare``.
    """
    name = "family"
    kind = "classification"
    what = ""
    resizable = ("ffn", "hidden")
    refusals = {}  # {capability: why this family does not have it}, appended to the refusal

    def __repr__(self):
        return f"<glmc_mini family {self.name!r}>"

    def claims(self, model):
        raise NotImplementedError(f"{type(self).__name__} must implement claims(model)")

    def _refuse(self, capability):
        why = self.refusals.get(capability, f"the {self.name} family of glmc_mini does not implement it")
        raise UnsupportedModelError(f"{self.name} models do not support {capability}: {why}")

    def supports(self, capability):
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown capability {capability!r}; one of {', '.join(CAPABILITIES)}")
        return getattr(type(self), capability) is not getattr(Family, capability)

    # ----------------------------------------------------------------- capabilities

    def spec(self, model):
        self._refuse("spec")

    def canonicalize(self, model):
        self._refuse("canonicalize")

    def is_canonical(self, model, atol=1e-5):
        self._refuse("is_canonical")

    def blocks(self, model):
        self._refuse("blocks")

    def activation_sites(self, model, spec):
        self._refuse("activation_sites")

    def attention_logit_scale(self, model, layer):
        self._refuse("attention_logit_scale")

    def to_circuit(self, model, form="circuit"):
        self._refuse("to_circuit")

    def build(self, config):
        self._refuse("build")

    # ----------------------------------------------------------------- hooks with defaults

    def untie(self, model):
        return model

    def describe(self, config):
        return f"{self.name} {config.model}"

    def config_defaults(self, config):
        return config


# The registry, in detection order: "module.Class" of this package, one line per family (a new
# family: its module here plus one line, e.g. "llama.Llama" after "gpt2.GPT2"). Circuit comes last:
# it also claims any model that names its own kind (``glmc_kind``).
_REGISTERED = (
    "mlp.MLP",
    "vit.ViT",
    "gpt2.GPT2",
    "llama.Llama",
    "circuit.Circuit",
)


def _instance(path):
    module, cls = path.rsplit(".", 1)
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)()


FAMILIES = tuple(_instance(path) for path in _REGISTERED)


def _supported():
    return ", ".join(f.name for f in FAMILIES)


def _described():
    return "; ".join(f"{f.name}: {f.what}" for f in FAMILIES if f.what)


def detect(model):
    """The :class:`Family` of ``model``: the first in :data:`FAMILIES` that claims it.

    Raises UnsupportedModelError (a TypeError) naming the model's type and the supported families,
    or the reason a family gives for refusing a model it would otherwise claim (an nn.Sequential
    holding a LayerNorm)."""
    for family in FAMILIES:
        if family.claims(model):
            return family
    raise UnsupportedModelError(f"{type(model).__name__} is not a supported model: glmc_mini handles the "
                                f"families {_described()}")


def by_name(name):
    """The registered :class:`Family` called ``name`` (``TaskConfig.family``, ``Spec.family``)."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; registered: {_supported()}")
