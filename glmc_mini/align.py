"""``gm.align``: one entry point for every alignment method, on stock or circuit form.

    res = gm.align(model_a, model_b, method="weight", symmetries=("perm", "orth", "inv"))
    res.model_a   # A in canonical form (a stock model; untouched copy for method="none")
    res.model_b   # B moved onto A: the same function as B
    gm.interpolate(res.model_a, res.model_b, 0.5)

Methods: "none" (plain averaging), "weight" (data-free, ``matching.weight_matching``),
"activation" (``matching.activation_matching``, needs ``data``), "learned" (weight matching, then
``learned.learned_matching`` on ``data``). Forms: "stock" merges the factors of stock-class models;
"circuit" converts both aligned models to the paper's circuit form (``circuit.to_circuit``), where
per-head invertible maps vanish and the merge interpolates QK and OV circuits.
Introduced in chapter 1; learned matching in chapter 5.
"""
import time
from dataclasses import dataclass, field

from .canonical import canonicalize
from .checks import (check_batch, check_data, choice, first_batch, optional_positive_int, real, seed_value,
                     check_pair as _check_pair)
from .spaces import build_spec
from .symmetries import apply_transforms

METHODS = ("none", "activation", "weight", "learned")
CLASSES = ("perm", "semi", "orth", "inv")
FORMS = ("stock", "circuit")


@dataclass
class AlignResult:
    """What ``align`` found: the two models to merge, the transforms per space, and the cost."""
    model_a: object          # canonical A (or circuit form of it)
    model_b: object          # B moved onto A, same function as B
    transforms: dict         # {space name: Transform} taking canonical B to model_b
    method: str
    symmetries: tuple
    form: str
    seconds: float
    history: list = field(default_factory=list)   # weight matching: ||A - T(B)||^2 per sweep
    losses: list = field(default_factory=list)    # learned matching: merged loss per step


def _validate(method, symmetries, data, form, steps=None, seed=0, lr=None, schedule="constant"):
    """The arguments of ``align`` checked up front; returns the symmetry classes as a tuple."""
    choice(method, "method", METHODS)
    choice(form, "form", FORMS)
    if symmetries is None:
        raise ValueError(f"symmetries=None: give one or more symmetry classes from {CLASSES}")
    if isinstance(symmetries, str):
        symmetries = (symmetries,)
    try:
        symmetries = tuple(symmetries)
    except TypeError:
        raise TypeError(f"symmetries must be a class name or a sequence of them from {CLASSES}, got "
                        f"{type(symmetries).__name__}") from None
    unknown = [s for s in symmetries if not isinstance(s, str) or s not in CLASSES]
    if unknown or not symmetries:
        raise ValueError(f"unknown symmetry class {unknown or '(none given)'}; choose from {CLASSES}")
    if method in ("activation", "learned") and data is None:
        raise ValueError(f"method={method!r} needs data: an iterable of batches, e.g. a DataLoader")
    check_data(data)
    optional_positive_int(steps, "steps")
    seed_value(seed)
    if lr is not None:
        real(lr, "lr", low=0.0, open_low=True)
    from .learned import SCHEDULES
    choice(schedule, "schedule", SCHEDULES)
    return symmetries


def check_symmetries(spec, symmetries):
    """ValueError if none of ``symmetries`` acts on any space of the model (e.g. "orth" on an MLP):
    aligning would silently do nothing."""
    from .matching import _updatable
    if not _updatable(spec, symmetries):
        acting = sorted({c for s in spec.spaces.values() for c in s.classes})
        raise ValueError(f"none of the symmetry classes {tuple(symmetries)} acts on this {spec.family} model "
                         f"(its spaces admit {tuple(acting)}): the alignment would leave model_b unchanged")


def check_pair(model_a, model_b):
    """Both models supported and valid, and one architecture (``checks.check_pair``: configuration,
    modules, shapes, tying aside, device, dtype, finite values); ValueError / UnsupportedModelError
    naming the first problem. Returns model_a's spec."""
    spec_a, spec_b = build_spec(model_a), build_spec(model_b)
    if spec_a.family != spec_b.family:
        raise ValueError(f"models of different families: {spec_a.family} and {spec_b.family}")
    _check_pair(model_a, model_b, tying=False)  # canonicalize unties GPT-2's embeddings anyway
    return spec_a


def _check_first_batch(model, data):
    """The first batch fits the model (``checks.check_batch``); returns data that still yields it."""
    from .models import model_kind
    batch, data = first_batch(data)
    check_batch(model, batch, model_kind(model))
    return data


def align(model_a, model_b, method="weight", symmetries=("perm", "orth", "inv"), data=None, steps=None,
          seed=0, form="stock", progress=True, lr=None, schedule="constant"):
    """Bring ``model_b`` onto ``model_a`` modulo the chosen symmetry classes.

    Inputs: two models of one architecture (stock MLP / timm ViT / HF GPT-2), untouched;
    method in METHODS; symmetries, any of "perm" "semi" "orth" "inv"; data, an iterable of
    batches ((x, y) for classifiers, token ids [B, T] for language models); steps, learned-matching
    steps (default 200); form "stock" or "circuit". Returns an :class:`AlignResult`.
    Everything is checked before any solver runs (``checks``): arguments, that A and B are one
    supported architecture on one device and dtype with finite weights, and the first batch of
    ``data``. Learned matching iterates ``data`` once (a single-pass generator works): its first
    batches are held out to choose the returned iterate, the rest are trained on.
    """
    symmetries = _validate(method, symmetries, data, form, steps, seed, lr, schedule)
    seed, steps = seed_value(seed), optional_positive_int(steps, "steps")  # plain ints (numpy ints too)
    spec = check_pair(model_a, model_b)
    if method != "none":
        check_symmetries(spec, symmetries)
    if data is not None and method in ("activation", "learned"):
        data = _check_first_batch(model_a, data)
    start = time.perf_counter()
    if method == "none" and form == "stock":
        import copy
        return AlignResult(copy.deepcopy(model_a), copy.deepcopy(model_b), {}, method, symmetries, form,
                           time.perf_counter() - start)
    A, B = canonicalize(model_a), canonicalize(model_b)
    res = AlignResult(A, B, {}, method, symmetries, form, 0.0)
    learned = dict(steps=200 if steps is None else steps, lr=1e-2 if lr is None else lr, schedule=schedule,
                   seed=seed, progress=progress)
    if method != "none":
        _solve(res, spec, data, seed, progress, learned)
    if form == "circuit":
        _to_circuit_form(res, data, learned)
    else:
        res.model_b = apply_transforms(B, res.transforms)
    res.seconds = time.perf_counter() - start
    return res


def _solve(res, spec, data, seed, progress, learned):
    from .matching import activation_matching, weight_matching
    A, B = res.model_a, res.model_b
    if res.method == "activation":
        res.transforms = activation_matching(A, B, data, symmetries=res.symmetries, seed=seed)
        return
    res.transforms, res.history = weight_matching(A, B, symmetries=res.symmetries, seed=seed, progress=progress)
    if res.method == "learned" and res.form == "stock":
        from .learned import learned_matching
        res.transforms, res.losses = learned_matching(A, B, data, res.transforms, **learned)


def _to_circuit_form(res, data, learned):
    """Circuit form: per-head invertible maps vanish; learned matching refines perms and O there."""
    from .circuit import to_circuit
    T = {k: v for k, v in res.transforms.items() if not k.startswith(("qk.", "ov."))}
    A, B = to_circuit(res.model_a), to_circuit(res.model_b)
    if res.method == "learned":
        from .learned import learned_matching
        T, res.losses = learned_matching(A, B, data, T, **learned)
    res.transforms, res.model_a = T, A
    res.model_b = apply_transforms(B, T)
