"""The report's figures (flows.report): FID against omega (or by variant), and FID and the
omega sensitivity during training against the step."""

from __future__ import annotations

import statistics

from flows.report_runs import VariantRuns, curve_mean, group_by_variant, spread
from tasks.grids import save_figure
from tasks.storage import Output


def plot_curves(variants: list[VariantRuns], out: Output, name: str) -> str:
    """Saves fid_figure(variants) as the PNG `name` of `out`."""
    return save_figure(fid_figure(variants), out, name)


def fid_figure(variants: list[VariantRuns]):
    """FID against omega, one line per variant (x interval): the mean over its seeds, +- one
    sd, and each seed as a faint dot. When every variant has the one omega (the fixed-omega
    tables), FID by variant instead: an omega axis with a single tick says nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: list[tuple[str, dict[float, list[float]]]] = []
    for name, runs in group_by_variant(variants).items():
        intervals = sorted({(r["t_min"], r["t_max"]) for v in runs for r in v.results})
        for interval in intervals:
            fids: dict[float, list[float]] = {}
            for v in runs:
                for r in v.results:
                    if (r["t_min"], r["t_max"]) == interval:
                        fids.setdefault(r["omega"], []).append(r["fid"])
            label = name if len(intervals) == 1 else f"{name} [{interval[0]:g}, {interval[1]:g}]"
            series.append((label, fids))
    seeds = max((len(f) for _, fids in series for f in fids.values()), default=1)

    colors = plt.get_cmap("tab10" if len(series) <= 10 else "tab20").colors
    omegas = sorted({w for _, fids in series for w in fids})
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, fids) in enumerate(series):
        color = colors[i % len(colors)]
        if len(omegas) == 1:
            xs, ys = [i], [fids[omegas[0]]]
        else:
            xs = sorted(fids)
            ys = [fids[w] for w in xs]
        stats = [spread(y) for y in ys]
        ax.errorbar(
            xs,
            [m for m, _ in stats],
            yerr=[sd for _, sd in stats] if seeds > 1 else None,
            fmt="o" if len(omegas) == 1 else "o-",
            capsize=3,
            color=color,
            label=label,
        )
        if seeds > 1:
            dots = [(x, y) for x, values in zip(xs, ys, strict=True) for y in values]
            ax.scatter(*zip(*dots, strict=True), s=9, alpha=0.35, color=color)
    seeds_note = f"mean ± sd over {seeds} seeds" if seeds > 1 else "one seed"
    if len(omegas) == 1:
        ax.set_xticks(range(len(series)), [label for label, _ in series], rotation=25, ha="right")
        ax.set(ylabel="FID", title=f"FID by variant, sampled at omega {omegas[0]:g} ({seeds_note})")
    else:
        ax.set(xlabel="CFG scale omega", ylabel="FID", title=f"FID vs omega ({seeds_note})")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3)
    return fig


def plot_progress(variants: list[VariantRuns], out: Output, name: str) -> str | None:
    """FID during training against the step, one line per variant (mean over seeds), with
    the real-data floor at the same n as a dashed line, and beside it, where measured, the
    omega sensitivity over the same steps (when a network starts to use its omega input);
    None without curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {k: v for k, v in group_by_variant(variants).items() if any(r.curve for r in v)}
    if not by_name:
        return None
    sensitive = any(r.omega_curve for runs in by_name.values() for r in runs)
    fig, axes = plt.subplots(1, 2 if sensitive else 1, figsize=(12 if sensitive else 7, 4))
    ax = axes[0] if sensitive else axes
    for variant, runs in by_name.items():
        curve = curve_mean(runs)
        ax.plot(list(curve), list(curve.values()), "o-", markersize=3, label=variant)
    floors = [
        r.train.data.metrics["eval/fid_real_data_floor"]
        for r in variants
        if r.train is not None and "eval/fid_real_data_floor" in r.train.data.metrics
    ]
    if floors:
        ax.axhline(statistics.mean(floors), color="g", ls="--", label="real data (same n)")
    ax.set(xlabel="training step", ylabel="FID", title="FID during training", yscale="log")
    ax.grid(alpha=0.3, which="both")
    if sensitive:
        for runs in by_name.values():
            curve = curve_mean(runs, "omega_curve")
            axes[1].plot(list(curve), [100 * v for v in curve.values()], "o-", markersize=3)
        axes[1].set(
            xlabel="training step",
            ylabel="% change of u, omega 1 -> 2",
            title="omega sensitivity at the 1-NFE point",
            yscale="log",
        )
        axes[1].grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(2.25 if sensitive else 1.01, 1))
    return save_figure(fig, out, name)
