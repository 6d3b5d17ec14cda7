"""The circuit family: models that carry their own space table, chiefly ``circuit.CircuitTransformer``
(``glmc_family = "circuit"``), and any model that names its own kind (``glmc_kind``).

Such a model is already in canonical form (LayerNorms without gain, centred writers) and provides
``spec()``; head counts and FFN widths change through its own ``resize_to``
(``circuit.apply_transforms``). Introduced in chapter 4.
"""
from ..spaces import UnsupportedModelError
from . import KINDS, Family


class Circuit(Family):
    """Models with ``glmc_family = "circuit"`` (or, without ``glmc_family``, a ``glmc_kind``)."""
    name, kind = "circuit", "classification"  # a model's own glmc_kind overrides kind (models.model_kind)
    what = "circuit.CircuitTransformer (to_circuit)"
    resizable = None  # any kind: circuit.apply_transforms resizes through the model's own resize_to

    def claims(self, model):
        family = getattr(model, "glmc_family", None)
        return family == "circuit" or (family is None and getattr(model, "glmc_kind", None) in KINDS)

    def spec(self, model):
        """The model's own ``spec()`` (``circuit.circuit_spec`` for a CircuitTransformer)."""
        own = getattr(model, "spec", None)
        if not callable(own):
            raise UnsupportedModelError(f"{type(model).__name__} declares glmc_family / glmc_kind but has no spec() "
                                        "method giving its space table")
        return own()

    def canonicalize(self, model):
        """Nothing to do: circuit models are built in canonical form."""

    def is_canonical(self, model, atol=1e-5):
        return True

    def blocks(self, model):
        return list(getattr(model, "blocks", ()))
