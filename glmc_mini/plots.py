"""The book's figures (barrier curves, matrices, simplex heatmaps) and its glued numbers.

Figures are sized for the rendered book: at most ``WIDTH`` inches wide, so the page never scales
them down, with text of at least ``FONT`` points and legends outside the axes, never over a curve.
"""
import numpy as np

FONT = 10          # points: tick labels and legends; labels and titles get one more
WIDTH = 7.5        # inches: the widest figure the rendered page shows at full size
GLUE_PREFIX = "application/papermill.record/"   # myst-nb's mime prefix for hidden glue


def glue(name, value):
    """Record ``value`` under ``name`` for the book's text (myst-nb's ``glue``, hidden output).

    The Markdown then quotes it as ``{glue:text}`name:.2f```, so the prose always shows the
    number the committed output computed. Tensors and NumPy scalars are stored as Python floats
    (their text form is what myst-nb formats). Works without myst-nb installed (e.g. on Colab):
    it writes the same output that ``myst_nb.glue(name, value, display=False)`` writes.
    Returns None, so a glue call ending a cell prints nothing. Introduced in chapter 0.
    """
    from IPython.core.formatters import format_display_data
    from IPython.display import display
    stored = float(value) if np.ndim(value) == 0 and not isinstance(value, (str, int)) else value
    bundle, metadata = format_display_data(stored)
    metadata["scrapbook"] = dict(name=name, mime_prefix=GLUE_PREFIX)
    display({GLUE_PREFIX + k: v for k, v in bundle.items()}, raw=True, metadata=metadata)


def figure(ncols=1, nrows=1, height=3.2, width=None, **kwargs):
    """``plt.subplots`` at the book's width: one panel 5.5 inches wide, more panels share ``WIDTH``.

    Returns (fig, axes) like ``plt.subplots``. Introduced in chapter 0.
    """
    import matplotlib.pyplot as plt
    width = width or (5.5 if ncols == 1 else WIDTH)
    return plt.subplots(nrows, ncols, figsize=(width, height * nrows), **kwargs)


def style(ax, legend=True):
    """Book fonts on ``ax``; the legend, if any, goes below the axes (outside, never on a curve)."""
    ax.tick_params(labelsize=FONT)
    ax.xaxis.label.set_fontsize(FONT + 1), ax.yaxis.label.set_fontsize(FONT + 1)
    ax.title.set_fontsize(FONT + 1)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=FONT, frameon=False)
    return ax


def _axes(ax):
    return figure()[1] if ax is None else ax


def plot_curves(curves, ax=None, metric="loss", title=None):
    """Loss (or accuracy) along lambda, one line per label, the barrier in the legend.

    Inputs: curves, dict label -> BarrierCurve; metric, "loss" | "acc".
    Introduced in chapter 0.
    """
    ax = _axes(ax)
    for label, curve in curves.items():
        if metric == "loss":
            values, text = curve.losses, f"{label} (barrier {curve.barrier:.2f})"
        elif curve.accs is not None:
            values, text = curve.accs, f"{label} (acc. barrier {curve.barrier_acc:.2f})"
        else:
            raise ValueError(f"curve {label!r} has no accuracies (a language model?)")
        ax.plot(curve.lambdas, values, marker="o", markersize=3, label=text)
    ax.set_xlabel(r"$\lambda$")
    ax.set_ylabel("test loss (nats)" if metric == "loss" else "test accuracy")
    ax.set_title(title or "")
    return style(ax)


def plot_matrix(M, ax=None, title=None):
    """A matrix as an image (e.g. a permutation, a semi-permutation or an orthogonal map).

    Inputs: M [n, m] (tensor or array). Diverging colours centred at 0.
    """
    ax = _axes(ax)
    M = np.asarray(M.detach().cpu() if hasattr(M, "detach") else M, dtype=float)
    vmax = max(np.abs(M).max(), 1e-12)
    image = ax.imshow(M, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=FONT)
    ax.set_title(title or "")
    return style(ax, legend=False)


def plot_simplex(points, values, ax=None, title=None):
    """Heatmap of ``values`` over the triangle of mixtures of three models A, B, C.

    Inputs: points [N, 3] barycentric weights (rows sum to 1), values [N]. Corner A is at (0, 0),
    B at (1, 0), C at (1/2, sqrt(3)/2); a point w maps to w_B B + w_C C.
    """
    import matplotlib.ticker as mticker
    import matplotlib.tri as mtri
    ax = _axes(ax)
    W, v = np.asarray(points, dtype=float), np.asarray(values, dtype=float)
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])  # A, B, C
    xy = W @ corners  # (N, 2)
    filled = ax.tricontourf(mtri.Triangulation(xy[:, 0], xy[:, 1]), v, levels=20, cmap="viridis")
    bar = ax.figure.colorbar(filled, ax=ax, label="loss", orientation="horizontal", pad=0.02)
    bar.ax.tick_params(labelsize=FONT - 1), bar.ax.xaxis.label.set_fontsize(FONT)
    bar.ax.xaxis.set_major_locator(mticker.MaxNLocator(4))
    for name, (x, y), dy in zip("ABC", corners, (-0.06, -0.06, 0.03)):
        ax.annotate(name, (x, y + dy), ha="center", fontweight="bold", fontsize=FONT + 1)
    ax.set_xlim(-0.08, 1.08), ax.set_ylim(-0.1, 0.95)
    ax.set_aspect("equal"), ax.axis("off")
    ax.set_title(title or "")
    return style(ax, legend=False)
