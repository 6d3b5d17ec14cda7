"""What the LayerNorm pre-norm transformers (ViT, GPT-2) share: the canonical form of
``canonical`` (centre the residual writers, fold each norm's gain into its readers) and the
activation sites (FFN activations, the residual stream entering every LayerNorm).

A family of this kind names its blocks, its (norm, readers) pairs and what must happen before
centring (:meth:`PreNormTransformer.prepare`: GPT-2 unties, ViT folds LayerScale).
Introduced in chapter 3.
"""
import torch.nn as nn

from . import Family


class PreNormTransformer(Family):
    """A :class:`Family` whose blocks read the residual stream through LayerNorms (subclass it)."""

    def norm_readers(self, model):
        """[(LayerNorm module name, [names of the Linear / Conv1D modules reading its output])]."""
        raise NotImplementedError

    def prepare(self, model):
        """In place, before centring: make every residual writer a plain parameter (default: nothing)."""

    def canonicalize(self, model):
        """prepare (untie, fold LayerScale), centre every residual writer, fold every norm gain into
        its readers (``canonical`` module docstring)."""
        from ..canonical import _centre_writers, _fold_gains
        self.prepare(model)
        _centre_writers(model, self.spec(model))
        _fold_gains(model, self.norm_readers(model))

    def is_canonical(self, model, atol=1e-5):
        """Writers centred and norm gains 1 (``canonical.centred_with_unit_gains``)."""
        from ..canonical import centred_with_unit_gains
        return centred_with_unit_gains(model, self.spec(model), atol)

    def activation_sites(self, model, spec):
        """ffn.l: the output of block l's FFN activation; the residual stream: the input of every
        LayerNorm of width d."""
        sites = {f"ffn.{l}": (blk.mlp.act, "output") for l, blk in enumerate(self.blocks(model))}
        d = spec.spaces["residual"].size
        norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm) and m.normalized_shape == (d,)]
        return sites, norms
