"""The evaluation's FID-vs-omega plots (`imf evaluate` writes one per CFG interval beside its
results.json; its sample grids come from tasks.grids).

    >>> names = plot_fid_vs_omega(results, out)   # results.json's rows -> fid_vs_omega_t*.png
"""

from __future__ import annotations

from tasks.grids import save_figure
from tasks.storage import Output


def plot_fid_vs_omega(results: list[dict], out: Output) -> list[str]:
    """One FID-vs-omega plot per CFG interval, the best point marked, with the calibration a
    reader needs beside the curve: the real-data floor, the same network's many-step points
    and the class-mean ceiling (in the legend; drawn, it would flatten the curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    intervals = sorted({(r["t_min"], r["t_max"]) for r in results})
    for t_min, t_max in intervals:
        rows = sorted(
            (r for r in results if (r["t_min"], r["t_max"]) == (t_min, t_max)),
            key=lambda r: r["omega"],
        )
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["omega"] for r in rows], [r["fid"] for r in rows], "o-")
        for r in rows:
            if r["best"]:
                ax.plot(
                    [r["omega"]], [r["fid"]], "r*", markersize=14, label=f"best: FID {r['fid']:.2f}"
                )
        many = [r for r in rows if "many_step" in r]
        if many:
            steps = many[0]["many_step"]["steps"]
            ax.plot(
                [r["omega"] for r in many],
                [r["many_step"]["fid"] for r in many],
                "kx",
                markersize=9,
                label=f"same network, {steps} Euler steps",
            )
        if "real_data_floor" in rows[0]:
            floor = rows[0]["real_data_floor"]["fid"]
            ax.axhline(floor, color="g", ls="--", label=f"real data: {floor:.2f}")
            ax.set_ylim(bottom=0)
        if "class_mean_ceiling" in rows[0]:
            ceiling = rows[0]["class_mean_ceiling"]["fid"]
            ax.plot([], [], " ", label=f"class means: {ceiling:.1f}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.set(
            xlabel="CFG scale omega",
            ylabel="FID",
            title=f"interval [{t_min:g}, {t_max:g}], NFE {rows[0]['nfe']}",
        )
        ax.grid(alpha=0.3)
        names.append(save_figure(fig, out, f"fid_vs_omega_t{t_min:g}-{t_max:g}.png"))
    return names
