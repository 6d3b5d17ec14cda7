"""The book's figures: barrier curves, matrices (permutations, orthogonal maps), simplex heatmaps."""
import numpy as np


def _axes(ax):
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=(5, 3.5))[1] if ax is None else ax


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
    ax.legend(fontsize="small")
    return ax


def plot_matrix(M, ax=None, title=None):
    """A matrix as an image (e.g. a permutation, a semi-permutation or an orthogonal map).

    Inputs: M [n, m] (tensor or array). Diverging colours centred at 0.
    """
    ax = _axes(ax)
    M = np.asarray(M.detach().cpu() if hasattr(M, "detach") else M, dtype=float)
    vmax = max(np.abs(M).max(), 1e-12)
    image = ax.imshow(M, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title or "")
    return ax


def plot_simplex(points, values, ax=None, title=None):
    """Heatmap of ``values`` over the triangle of mixtures of three models A, B, C.

    Inputs: points [N, 3] barycentric weights (rows sum to 1), values [N]. Corner A is at (0, 0),
    B at (1, 0), C at (1/2, sqrt(3)/2); a point w maps to w_B B + w_C C.
    """
    import matplotlib.tri as mtri
    ax = _axes(ax)
    W, v = np.asarray(points, dtype=float), np.asarray(values, dtype=float)
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])  # A, B, C
    xy = W @ corners  # (N, 2)
    filled = ax.tricontourf(mtri.Triangulation(xy[:, 0], xy[:, 1]), v, levels=20, cmap="viridis")
    ax.figure.colorbar(filled, ax=ax, label="loss")
    for name, (x, y), dy in zip("ABC", corners, (-0.06, -0.06, 0.03)):
        ax.annotate(name, (x, y + dy), ha="center", fontweight="bold")
    ax.set_xlim(-0.08, 1.08), ax.set_ylim(-0.1, 0.95)
    ax.set_aspect("equal"), ax.axis("off")
    ax.set_title(title or "")
    return ax
