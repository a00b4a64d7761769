"""``fastopt demo``: the optimizer-trajectory figure of Stanford's CS231n notes
(the section on parameter updates), made by fastopt's own rules.

Every rule starts from the same point on three classic 2-D surfaces and takes the
same number of steps; each path is one coloured line on the surface's contour plot.

* the saddle f = x² − y², started just off the ridge (y = 1e-3): plain SGD barely
  breaks the symmetry, the adaptive rules (RMSprop, Adam, …) divide the tiny y
  gradient by its own size and escape at once;
* Rosenbrock's valley f = (1 − x)² + 100(y − x²)², minimum (1, 1);
* Beale's function, minimum (3, 0.5), with flat plateaus and steep walls.

The element-wise rules run through the registry's classes (``fastopt.Adam`` …) on a
2-element float64 array, one ``step(grad)`` per point. L-BFGS runs through
``fastopt.LBFGS(param, lr=1, max_iter=1, max_eval=25, line_search_fn="strong_wolfe")``:
one ``step(closure)`` per point, i.e. one quasi-Newton iteration with its line search
(which may evaluate the closure several times: those trial points are not drawn), so
every path has one point per step.

A path that leaves the plotting box (the saddle has no minimum) stops there: the
step count is what was asked, the line ends at the box.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

import fastopt

__all__ = ["SURFACES", "PATHS", "Surface", "trajectories", "render",
           "main"]


@dataclass(frozen=True)
class Surface:
    name: str
    title: str
    f: Callable[[float, float], float]          # also takes arrays (the contour grid)
    grad: Callable[[np.ndarray], np.ndarray]
    start: tuple[float, float]
    box: tuple[float, float, float, float]       # xmin, xmax, ymin, ymax
    minimum: tuple[float, float] | None
    log_levels: bool
    # the learning rate of each path on this surface (the other hyperparameters are
    # the path's own, see PATHS): chosen so that each path shows its rule's character
    # within the default 300 steps rather than to win
    lr: dict = field(default_factory=dict)


def _saddle(x, y):
    return x * x - y * y


def _saddle_grad(p):
    return np.array([2.0 * p[0], -2.0 * p[1]])


def _rosenbrock(x, y):
    return (1.0 - x) ** 2 + 100.0 * (y - x * x) ** 2


def _rosenbrock_grad(p):
    x, y = p
    return np.array([-2.0 * (1.0 - x) - 400.0 * x * (y - x * x), 200.0 * (y - x * x)])


_BEALE_C = (1.5, 2.25, 2.625)


def _beale(x, y):
    return sum((c - x + x * y ** (k + 1)) ** 2 for k, c in enumerate(_BEALE_C))


def _beale_grad(p):
    x, y = p
    gx = gy = 0.0
    for k, c in enumerate(_BEALE_C):
        r = c - x + x * y ** (k + 1)
        gx += 2.0 * r * (y ** (k + 1) - 1.0)
        gy += 2.0 * r * x * (k + 1) * y ** k
    return np.array([gx, gy])


# The paths: (label, class name, fixed hyperparameters). The learning rate comes
# from the surface. Momentum 0.9 and the registry's defaults otherwise.
PATHS = (
    ("SGD", "SGD", {}),
    ("Momentum", "SGD", {"momentum": 0.9}),
    ("Nesterov", "SGD", {"momentum": 0.9, "nesterov": True}),
    ("Adagrad", "Adagrad", {}),
    ("RMSprop", "RMSprop", {"alpha": 0.9}),
    ("Adadelta", "Adadelta", {}),
    ("Adam", "Adam", {}),
    ("AdamW", "AdamW", {"weight_decay": 0.1}),
    ("AMSGrad", "Adam", {"amsgrad": True}),
    ("Adamax", "Adamax", {}),
    ("NAdam", "NAdam", {}),
    ("RAdam", "RAdam", {}),
    ("Lion", "Lion", {}),
    # one iteration per step; max_eval must be raised with it: its default
    # ⌊max_iter·5/4⌋ = 1 ends every step after the first evaluation, before the line
    # search may move (torch stalls at the start of Rosenbrock the same way). 25 is
    # the line search's own cap.
    ("L-BFGS", "LBFGS", {"max_iter": 1, "max_eval": 25, "line_search_fn": "strong_wolfe"}),
)

# Learning rates per surface, chosen by a sweep over 1e-4 … 1 at the default 300
# steps: for each rule the rate whose path shows its character without leaving the
# box. Gradients on the saddle are O(1), so the sign-like rules (Adam family, RMSprop,
# Lion) move about lr per step while plain SGD's step is lr·|g| (tiny near the
# ridge). Rosenbrock's walls reach |g| ≈ 1e3: SGD, momentum and RAdam (whose first
# steps are un-rectified, SGD-like) blow up above lr ≈ 3e-3, while the adaptive rules
# take lr-sized steps and need 0.01–0.3 to get along the valley. Beale's gradients
# reach 1e2 near the start. Adadelta's lr is its multiplier (1, the paper's): it is
# slow by design, its first steps are √ε-sized. AdamW's weight decay (0.1) pulls it
# toward the origin, away from the minimum, on purpose. L-BFGS: lr = 1 and its line
# search.
SURFACES = {
    "saddle": Surface(
        "saddle", "saddle  x² − y²", _saddle, _saddle_grad, start=(1.0, 1e-3),
        box=(-1.5, 1.5, -1.5, 1.5), minimum=None, log_levels=False,
        lr={"SGD": 0.01, "Momentum": 0.01, "Nesterov": 0.01, "Adagrad": 0.1,
            "RMSprop": 0.01, "Adadelta": 1.0, "Adam": 0.01, "AdamW": 0.01,
            "AMSGrad": 0.01, "Adamax": 0.01, "NAdam": 0.01, "RAdam": 0.01,
            "Lion": 0.01, "L-BFGS": 1.0}),
    "rosenbrock": Surface(
        "rosenbrock", "Rosenbrock  (1 − x)² + 100(y − x²)²", _rosenbrock,
        _rosenbrock_grad, start=(-1.2, 1.0), box=(-2.0, 2.0, -1.0, 3.0),
        minimum=(1.0, 1.0), log_levels=True,
        lr={"SGD": 1e-3, "Momentum": 1e-3, "Nesterov": 1e-3, "Adagrad": 1.0,
            "RMSprop": 0.01, "Adadelta": 1.0, "Adam": 0.1, "AdamW": 0.1,
            "AMSGrad": 0.1, "Adamax": 0.3, "NAdam": 0.1, "RAdam": 3e-3,
            "Lion": 0.01, "L-BFGS": 1.0}),
    "beale": Surface(
        "beale", "Beale", _beale, _beale_grad, start=(1.0, 1.5),
        box=(-1.0, 4.5, -1.5, 2.0), minimum=(3.0, 0.5), log_levels=True,
        lr={"SGD": 1e-3, "Momentum": 1e-3, "Nesterov": 1e-3, "Adagrad": 0.3,
            "RMSprop": 0.01, "Adadelta": 1.0, "Adam": 0.05, "AdamW": 0.05,
            "AMSGrad": 0.05, "Adamax": 0.1, "NAdam": 0.05, "RAdam": 3e-3,
            "Lion": 0.01, "L-BFGS": 1.0}),
}

# One distinct colour per path (tab20's pairs are too alike to tell apart)
COLOURS = {"SGD": "#1f77b4", "Momentum": "#ff7f0e", "Nesterov": "#8c564b",
           "Adagrad": "#2ca02c", "RMSprop": "#d62728", "Adadelta": "#9467bd",
           "Adam": "#e377c2", "AdamW": "#7f7f7f", "AMSGrad": "#bcbd22",
           "Adamax": "#17becf", "NAdam": "#000080", "RAdam": "#ffb000",
           "Lion": "#ff00ff", "L-BFGS": "#000000"}


def _inside(p, box):
    return box[0] <= p[0] <= box[1] and box[2] <= p[1] <= box[3]


def trajectories(surface: Surface, steps: int) -> dict[str, np.ndarray]:
    """label → array (k + 1, 2) of the points visited, k ≤ ``steps`` (fewer only when
    the path left the box)."""
    out = {}
    for label, cls_name, fixed in PATHS:
        hp = {"lr": surface.lr[label], **fixed}
        p = np.array(surface.start, dtype=np.float64)
        points = [p.copy()]
        if cls_name == "LBFGS":
            opt = fastopt.LBFGS(p, **hp)

            def closure(p=p):
                return float(surface.f(p[0], p[1])), surface.grad(p)
            advance = lambda: opt.step(closure)  # noqa: E731
        else:
            opt = getattr(fastopt, cls_name)(p, **hp)
            advance = lambda: opt.step(surface.grad(p))  # noqa: E731
        with np.errstate(over="ignore", invalid="ignore"):
            for _ in range(steps):
                advance()
                points.append(p.copy())
                if not (np.isfinite(p).all() and _inside(p, surface.box)):
                    break
        out[label] = np.array(points)
    return out


def _draw_surface(ax, surface: Surface):
    x0, x1, y0, y1 = surface.box
    X, Y = np.meshgrid(np.linspace(x0, x1, 300), np.linspace(y0, y1, 300))
    Z = surface.f(X, Y)
    # log-spaced levels where the surface spans decades (valleys, plateaus)
    levels = (np.logspace(-1.5, math.log10(max(float(Z.max()), 1.0)), 30)
              if surface.log_levels else 25)
    ax.contour(X, Y, Z, levels=levels, colors="0.72", linewidths=0.6)
    ax.plot(*surface.start, "ko", ms=6, zorder=5)
    if surface.minimum is not None:
        ax.plot(*surface.minimum, "k*", ms=14, zorder=5)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal" if surface.name != "beale" else "auto")


def render(out_dir: Path, steps: int = 300, gif: bool = False) -> list[Path]:
    """Write demo.png (and demo.gif) under ``out_dir``; returns the files written."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("fastopt demo draws with matplotlib: "
                          "pip install 'fastopt[demo]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: trajectories(s, steps) for name, s in SURFACES.items()}
    labels = [label for label, _, _ in PATHS]
    colour = COLOURS

    fig, axes = plt.subplots(1, 3, figsize=(19, 6.6), dpi=100)
    lines = {}
    for ax, (name, surface) in zip(axes, SURFACES.items()):
        _draw_surface(ax, surface)
        for label in labels:
            pts = paths[name].get(label)
            if pts is None:
                continue
            lbfgs = label == "L-BFGS"
            (ln,) = ax.plot(pts[:, 0], pts[:, 1], "--" if lbfgs else "-",
                            color=colour[label], lw=2.2 if lbfgs else 1.6,
                            marker="." if lbfgs else None, label=label)
            lines[name, label] = ln
        ax.set_title(f"{surface.title} — {steps} steps", fontsize=12)
    handles = [plt.Line2D([], [], color=colour[lb], lw=3, ls="--" if lb == "L-BFGS" else "-")
               for lb in labels]
    fig.legend(handles, labels, loc="lower center", ncol=len(labels) // 2, fontsize=11,
               frameon=False)
    fig.suptitle(f"fastopt: {len(labels)} optimizers from the same start, {steps} steps "
                 "(● start, ★ minimum)", fontsize=14)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    written = [out_dir / "demo.png"]
    fig.savefig(written[0])

    if gif:
        from matplotlib.animation import FuncAnimation, PillowWriter
        frames = np.unique(np.linspace(1, steps + 1, min(steps, 40)).astype(int))

        def draw(k):
            for (name, label), ln in lines.items():
                pts = paths[name][label][:k]
                ln.set_data(pts[:, 0], pts[:, 1])
            fig.suptitle(f"fastopt: {len(labels)} optimizers from the same start, "
                         f"step {k - 1} of {steps}", fontsize=14)
            return list(lines.values())
        anim = FuncAnimation(fig, draw, frames=frames, blit=False)
        written.append(out_dir / "demo.gif")
        anim.save(written[1], writer=PillowWriter(fps=12), dpi=55)
    plt.close(fig)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastopt demo",
        description="Draw every rule's path on the saddle, Rosenbrock and Beale surfaces.")
    parser.add_argument("--out", required=True, type=Path, help="directory for demo.png")
    parser.add_argument("--steps", type=int, default=300, help="steps per path (300)")
    parser.add_argument("--gif", action="store_true", help="also write demo.gif")
    args = parser.parse_args(argv)
    if not 1 <= args.steps <= 100_000:
        parser.error(f"--steps must be in [1, 100000], got {args.steps}")
    for path in render(args.out, args.steps, args.gif):
        print(path)
    return 0
