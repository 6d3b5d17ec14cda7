"""glmc_mini: the helper package of the book *Generalized Linear Mode Connectivity*.

Chapters import it as ``import glmc_mini as gm`` and call every helper as ``gm.<name>``.
Layout (one module per idea):

- ``profiles``   the ``GLMC_PROFILE`` switch and the task presets (quick / standard / paper)
- ``device``     device choice and seeding
- ``data``       embedded tasks (digits, pydoc text) and the paper profile's online sets
- ``families``   one adapter per model family (MLP, ViT, GPT-2, Llama-style decoders, circuit): ``detect``
- ``models``     stock endpoints of the presets (built by their family) and their logits
- ``train``      seeded training with a safetensors checkpoint cache
- ``barrier``    interpolation, evaluation and the loss barrier along lambda
- ``spaces``     the space table (``Spec``) of a model: which symmetry acts on which parameter axis
- ``symmetries`` the four classes: permutation, semi-permutation, orthogonal, invertible (and its
                 rotary-commuting restriction)
- ``canonical``  the function-preserving canonical form that stays the stock class
- ``circuit``    the canonical transformer module (circuit form, split heads)
- ``matching``   weight and activation matching
- ``learned``    learned matching
- ``distributed`` learned matching data-parallel over a ``torch.distributed`` group
- ``align``      ``gm.align``: one entry point for all methods
- ``many``       several models: universe matching, interpolation over the simplex
- ``widths``     embedding a narrow model into a wider one's spaces
- ``gap``        comparing two alignment solutions space by space
- ``plots``      the book's figures
- ``reproduce``  the main job, ``python -m glmc_mini reproduce``
- ``checkpoints`` one's own checkpoints: ``python -m glmc_mini align DIR_A DIR_B``

Names are loaded on first use, so ``import glmc_mini`` stays fast.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "profiles": ["PROFILE", "get_profile", "task_config", "TaskConfig", "TASKS", "describe_profile"],
    "device": ["get_device", "seed_everything", "to_model_device"],
    "data": ["load_task", "TaskData", "digits", "pydoc_text", "cifar10", "tiny_shakespeare"],
    "families": ["detect", "Family"],
    "models": ["build_model", "model_family", "forward_logits"],
    "train": ["train_model", "get_trained", "cache_dir", "checkpoint_key", "seed_offset"],
    "barrier": ["interpolate", "evaluate", "barrier", "BarrierCurve"],
    "spaces": ["Spec", "Space", "Segment", "build_spec", "UnsupportedModelError"],
    "symmetries": ["Permutation", "SemiPermutation", "Orthogonal", "Invertible", "Rotary", "Transform",
                   "apply_transforms", "random_transforms", "identity_transforms",
                   "compose_transforms", "invert_transforms"],
    "canonical": ["canonicalize", "is_canonical"],
    "circuit": ["CircuitTransformer", "to_circuit", "split_heads"],
    "matching": ["weight_matching", "activation_matching"],
    "learned": ["learned_matching"],
    "align": ["align", "AlignResult"],
    "checkpoints": ["load_checkpoint", "save_checkpoint", "align_checkpoints"],
    "many": ["align_many", "interpolate_many", "simplex_grid", "simplex_losses", "ManyResult"],
    "widths": ["embed_wider"],
    "gap": ["compare_solutions", "eigen_angles"],
    "plots": ["plot_curves", "plot_matrix", "plot_simplex"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


# ``align`` and ``barrier`` are both modules and functions. Python binds a submodule to the
# package attribute of the same name when it is first imported, which would shadow the lazy
# function; importing these two here binds the functions once and for all.
from .align import align  # noqa: E402
from .barrier import barrier  # noqa: E402


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    if name in _EXPORTS:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'glmc_mini' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
