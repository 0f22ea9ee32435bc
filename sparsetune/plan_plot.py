"""The PNG of `sparsetune plan`: predicted loss against density, the dense point and the chosen density marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_plan(plan: Any, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    densities = [p.density for p in plan.curve]
    losses = [p.loss for p in plan.curve]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    ax.plot(densities, losses, color="tab:blue", lw=1.8, label="predicted loss")
    dense = plan.curve[-1]
    ax.scatter([dense.density], [dense.loss], s=60, color="black", zorder=5, label=f"dense {dense.loss:.3f}")
    chosen = plan.recommended
    kind = "compute-optimal" if plan.compute_optimal is not None else "loss-optimal"
    ax.scatter([chosen.density], [chosen.loss], s=140, marker="*", color="red", edgecolors="black", zorder=6,
               label=f"{kind} {chosen.density:.3g} ({chosen.loss:.3f})")  # fmt: skip
    if plan.requested is not None:
        r = plan.requested
        ax.scatter([r.density], [r.loss], s=50, marker="s", color="tab:orange", zorder=6,
                   label=f"density {r.density:g} ({r.loss:.3f})")  # fmt: skip
    budget = f"{plan.tokens:.3g} tokens" if plan.tokens is not None else f"{plan.flops:.3g} FLOPs"
    ax.set_title(f"{plan.params:.3g} params, {plan.unique_tokens:.3g} unique tokens, {budget}", fontsize=10)
    ax.set_xlabel("density (1 = dense)")
    ax.set_ylabel("predicted C4 loss")
    ax.grid(alpha=0.3, linestyle=":")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
