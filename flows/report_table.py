"""The report's markdown (flows.report): the sweep's table in the paper's shape with the paper's
numbers beside ours, the comparisons it makes (Welch's t-test over seeds), the calibration of
each variant's FID, and FID during training."""

from __future__ import annotations

from flows.report_runs import (
    VariantRuns,
    cell_value,
    curve_mean,
    group_by_variant,
    ignores_omega,
    learned,
    sensitivity_of,
    spread,
)
from flows.sweep_config import MODEL_PROPERTIES, SweepConfig, comparisons
from imf_core import METHOD_VERSION
from imf_core.guidance import IGNORES_OMEGA_BELOW
from tasks.eval_tracking import TRAINING_METHODS_TAG
from tasks.provenance import METHOD_TAG
from tasks.tracking import STALE_TAG


def best_point(runs: VariantRuns, best: dict) -> str:
    """The CFG point that gave the best FID; for a fixed-omega model (MF-style, the network
    ignores omega at sampling) the omega it was trained with."""
    params = runs.train.data.params if runs.train is not None else {}
    if params.get("guidance.mode") == "fixed":
        return f"trained with ω {float(params['guidance.omega']):g}"
    if params.get("guidance.mode") == "none":
        return "no CFG"
    return f"ω {best['omega']:g} [{best['t_min']:g}, {best['t_max']:g}]"


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    mean, sd = spread(values)
    return f"{mean:.2f} ± {sd:.2f}"


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Welch's t-test of two samples (unequal variances): (t, two-sided p)."""
    from scipy import stats

    result = stats.ttest_ind(a, b, equal_var=False)
    return float(result.statistic), float(result.pvalue)


def verdict(ours: tuple[list[float], list[float]], paper: tuple[float, float]) -> str:
    """Does our difference go the paper's way? Welch's t-test at 5 %, both sides >= 2 seeds."""
    a, b = ours
    if len(a) < 2 or len(b) < 2:
        return "not resolved at this n (one seed)"
    t, p = welch(a, b)
    if not p < 0.05:
        return f"not resolved at this n (p = {p:.2f})"
    same = (sum(a) / len(a) - sum(b) / len(b)) * (paper[0] - paper[1]) > 0
    shown = "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
    return f"{'same direction as the paper' if same else 'opposite'} ({shown})"


def cell_values(runs: list[VariantRuns], metric: str) -> list[float]:
    return [x for r in runs if r.status == "ok" and (x := cell_value(r, metric)) is not None]


def made_by(runs: VariantRuns) -> str:
    """Which imf_core method versions made a run's numbers ("training 2, evaluation 3"), from
    its runs' tags; "unrecorded" for runs older than the record."""
    evaluation = runs.evaluation.data.tags if runs.evaluation is not None else {}
    training = runs.train.data.tags if runs.train is not None else {}
    trained_by = evaluation.get(TRAINING_METHODS_TAG) or training.get(METHOD_TAG, "unrecorded")
    return f"training {trained_by}, evaluation {evaluation.get(METHOD_TAG, 'unrecorded')}"


def versions_of(runs: list[VariantRuns]) -> str:
    """A row's method versions: one entry, or each seed's when its trainings differ."""
    return "; ".join(sorted({made_by(r) for r in runs}))


def is_current(runs: list[VariantRuns]) -> bool:
    """Every number of the row made by this code's method version, none tagged stale."""
    now = f"training {METHOD_VERSION}, evaluation {METHOD_VERSION}"
    tagged = any(STALE_TAG in (r.evaluation.data.tags if r.evaluation else {}) for r in runs)
    return versions_of(runs) == now and not tagged


def paper_table(sweep: SweepConfig, variants: list[VariantRuns]) -> dict[str, list[str]]:
    """The table in the paper's shape, by column: one entry per row, each cell 'ours (paper)',
    ours the mean ± sd over seeds when there are several, and each row's best CFG point."""
    by_name = group_by_variant(variants)
    rows: dict[str, dict[str, str]] = {}
    notes = {}
    for v in sweep.variants:
        if v.name not in by_name:
            continue
        runs = by_name[v.name]
        cells = rows.setdefault(v.row, {})
        flagged = sum(learned(r) is False for r in runs)
        blind = sum(bool(ignores_omega(r)) for r in runs)
        for column, cell in v.cells.items():
            values = cell_values(runs, cell.metric)
            prop = cell.metric in MODEL_PROPERTIES
            if values:
                text = f"{values[0]:.2f}" if prop else mean_sd(values)
            else:
                text = "failed" if any(r.status == "failed" for r in runs) else "—"
            if values and flagged and not prop:
                text += " **did not learn**" + (
                    f" ({flagged} of {len(runs)})" if len(runs) > 1 else ""
                )
            if values and blind and cell.metric.endswith("_best"):  # its CFG number
                text += " *ignores ω*" + (f" ({blind} of {len(runs)})" if len(runs) > 1 else "")
            paper = "—" if cell.paper is None else f"{cell.paper:g}"
            cells[column] = f"{text} ({paper})"
        best = [r for r in runs[0].results if r.get("best")]
        if best:
            notes[v.row] = notes.get(v.row, "") + f"{v.name}: {best_point(runs[0], best[0])}; "
        if any(sensitivity_of(r) for r in runs):
            cells["ω / class sensitivity"] = sensitivity_cell(runs)
    table = {"row": list(rows)}
    columns = list(sweep.columns)
    if any("ω / class sensitivity" in cells for cells in rows.values()):
        columns.append("ω / class sensitivity")
    table |= {c: [cells.get(c, "") for cells in rows.values()] for c in columns}
    table["best point"] = [notes.get(row, "").rstrip("; ") for row in rows]
    # Rows made by different code, or not by this code: their differences mix code changes
    # with the factor compared (tasks.artifacts.stale), so each row says which code made it.
    versions = {v.row: versions_of(by_name[v.name]) for v in sweep.variants if v.name in by_name}
    current = all(is_current(by_name[v.name]) for v in sweep.variants if v.name in by_name)
    if len(set(versions.values())) > 1 or not current:
        table["method version"] = [versions.get(row, "") for row in rows]
    return table


def table_markdown(sweep: SweepConfig, scale: str, variants: list[VariantRuns]) -> str:
    """The paper's table (paper_table), then the calibration and the comparisons."""
    by_name = group_by_variant(variants)
    table = paper_table(sweep, variants)
    seeds = max(len(r) for r in by_name.values()) if by_name else 1
    header = list(table)
    lines = [
        f"## {sweep.title} — scale `{scale}`",
        "",
        "Each cell: ours (paper)"
        + (f"; ours = mean ± sd over {seeds} training seeds" if seeds > 1 else "")
        + ". The paper's numbers are ImageNet 256 FID-50K; at other scales only the direction "
        "between rows compares.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for i in range(len(table["row"])):
        lines.append("| " + " | ".join(table[c][i] for c in header) + " |")
    if "method version" in table:
        mixed = len(set(table["method version"])) > 1
        lines += [
            "",
            ("**Rows made by different code.** " if mixed else "**Not this code's numbers.** ")
            + f"The method version column says which imf_core.METHOD_VERSION made each row "
            f"(this code: {METHOD_VERSION}; imf_core.METHOD_HISTORY says what changed)"
            + (
                ": a difference between such rows mixes the code's change with the factor. "
                if mixed
                else ". "
            )
            + f"`imf sweep {sweep.name} --recompute-stale` recomputes them.",
        ]
    return (
        "\n".join(lines)
        + "\n\n"
        + calibration_markdown(variants)
        + "\n"
        + comparisons_markdown(sweep, by_name)
    )


def comparisons_markdown(sweep: SweepConfig, by_name: dict[str, list[VariantRuns]]) -> str:
    """Each comparison the paper makes (a variant against the row it changes one factor of):
    our difference, the paper's, and whether ours goes the paper's way (Welch's t-test)."""
    lines = [
        "### Comparisons (one factor each)",
        "",
        "| variant | vs | factor | column | ours | paper | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, other, mine, theirs in comparisons(sweep):
        if v.name not in by_name or other.name not in by_name:
            continue
        if v.cells[mine].metric in MODEL_PROPERTIES:  # a design choice, not a measurement
            continue
        a = cell_values(by_name[v.name], v.cells[mine].metric)
        b = cell_values(by_name[other.name], other.cells[theirs].metric)
        pa, pb = v.cells[mine].paper, other.cells[theirs].paper
        if not a or not b or pa is None or pb is None:
            continue
        ours = f"{mean_sd(a).split(' ±')[0]} vs {mean_sd(b).split(' ±')[0]}"
        column = mine if mine == theirs else f"{mine} vs {theirs}"
        cells = [v.name, other.name, ", ".join(v.factor), column, ours, f"{pa:g} vs {pb:g}"]
        mixed = versions_of(by_name[v.name]) != versions_of(by_name[other.name])
        cells.append(verdict((a, b), (pa, pb)) + (" (rows of different code)" if mixed else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def progress_markdown(sweep: SweepConfig, variants: list[VariantRuns]) -> str:
    """FID during training per variant, and for a variant that trains longer than the row it
    compares with (Tab. 1c's "longer training"), the reading off its curve at that row's
    length: the same network family trained as long, then longer."""
    by_name = group_by_variant(variants)
    curves = {name: curve_mean(runs) for name, runs in by_name.items()}
    if not any(curves.values()):
        return ""
    n = {
        r.train.data.params.get("eval.during_samples")
        for r in variants
        if r.train is not None and r.curve
    }
    lines = [
        "### FID during training",
        "",
        f"FID of {' / '.join(sorted(n - {None})) or 'a few'} samples at each evaluated step "
        "(the best of each variant's `eval.during_points`): fewer samples than the table's, so "
        "these numbers compare along a curve and between curves, not with the cells above.",
        "",
        "| variant | FID at step |",
        "|---|---|",
    ]
    for name, curve in curves.items():
        points = " · ".join(f"{s}: {f:.2f}" for s, f in curve.items()) or "—"
        lines.append(f"| {name} | {points} |")
    for v in sweep.variants:
        longer = {"train.steps", "train.epochs"} & set(v.factor)
        mine, theirs = curves.get(v.name), curves.get(v.compare_with)
        if not (longer and mine and theirs):
            continue
        at = max(theirs)
        if at >= max(mine) or at not in mine:
            continue
        lines += [
            "",
            f"**{v.row}**: at step {at}, the length of `{v.compare_with}`, `{v.name}`'s own "
            f"curve reads FID {mine[at]:.2f} (`{v.compare_with}` ended at {theirs[at]:.2f}); "
            f"trained on to step {max(mine)}, {mine[max(mine)]:.2f}. The difference between "
            "the first two is the rest of the recipe (the learning-rate schedule follows the "
            "length), the step from the first to the last is the longer training.",
        ]
    return "\n".join(lines) + "\n"


def sensitivity_cell(runs: list[VariantRuns]) -> str:
    """Mean relative change of u at the 1-NFE point with omega (1 -> 2) and with the class
    (-> null), over the seeds: 'ω 0.9 % / class 41 %'; '—' for omega where it is no input."""

    def mean(name: str) -> float | None:
        values = [sensitivity_of(r)[name]["one_step"] for r in runs if name in sensitivity_of(r)]
        return sum(values) / len(values) if values else None

    omega, label = mean("omega"), mean("class")
    text = "—" if omega is None else f"ω {100 * omega:.2g} %"
    return text + ("" if label is None else f" / class {100 * label:.2g} %")


def calibration_markdown(variants: list[VariantRuns]) -> str:
    """What each variant's best FID means on these features: the real-data floor, the
    class-mean ceiling, the same network's many-step result, diversity, and the verdict."""

    def num(d: dict | None, key: str = "fid") -> str:
        return "—" if not d or key not in d else f"{d[key]:.2f}"

    lines = [
        "### Calibration (same features, same reference, same n)",
        "",
        "A variant whose samples' accuracy is near chance or whose FID is above half the "
        "class-mean ceiling is marked **did not learn**: its numbers say nothing about the "
        "method. One conditioned on omega whose output moves with omega (1 -> 2) less than "
        f"{IGNORES_OMEGA_BELOW:.0%} of what it moves with the class (-> the null class) at the "
        "1-NFE point is marked *ignores ω*: its CFG numbers say nothing about CFG-conditioning "
        "(sensitivities: relative change of u, imf_core.guidance.input_sensitivity).",
        "",
        "| variant | FID (best) | real data | class means | many-step | precision | recall "
        "| accuracy | ω / class sensitivity | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        best = next((r for r in v.results if r.get("best")), None)
        if best is None:
            lines.append(f"| {v.label or v.name} | {v.status} | | | | | | | | |")
            continue
        verdict = {None: "—", True: "learned", False: "**did not learn**"}[learned(v)]
        verdict += ", *ignores ω*" if ignores_omega(v) else ""
        many = best.get("many_step")
        cells = [
            v.label or v.name,
            num(best),
            num(best.get("real_data_floor")),
            num(best.get("class_mean_ceiling")),
            "—" if not many else f"{many['fid']:.2f} ({many['steps']} steps)",
            num(best, "precision"),
            num(best, "recall"),
            num(best, "accuracy"),
            sensitivity_cell([v]) if sensitivity_of(v) else "—",
            verdict,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    floors = {
        r["real_data_floor"]["rows"]
        for v in variants
        for r in v.results[:1]
        if "real_data_floor" in r
    }
    if floors:
        lines += ["", f"Real data: {'; '.join(sorted(floors))}."]
    return "\n".join(lines) + "\n"
