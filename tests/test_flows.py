"""Flows: the pipeline resumes only what is missing; a sweep nests its variants in MLflow,
survives a failing variant, and reports the paper's table."""

from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from flows.pipeline import run_pipeline
from flows.plan import plan_of
from flows.report import report_flow
from flows.sweep import run_sweep
from flows.sweep_config import load_sweep, variant_configs
from imf_core import METHOD_VERSION
from tasks.config import CONFIG_DIR

FAST = [
    "train.steps=20",
    "train.checkpoint_every=20",
    "eval.n_samples=100",
    "eval.shard_size=100",
    "eval.batch_size=100",
    "eval.grid_per_class=2",
]


def test_every_sweep_file_resolves_at_every_scale():
    for path in sorted((CONFIG_DIR / "sweep").glob("*.yaml")):
        sweep = load_sweep(path.stem)
        assert sweep.variants and sweep.columns and "smoke" in sweep.scales
        for scale in sweep.scales:
            configs = variant_configs(sweep, scale, [], [])
            assert set(configs) == {v.name for v in sweep.variants}
        if sweep.study:  # ours (the omega study): its cells claim no paper number
            assert all(c.paper is None for v in sweep.variants for c in v.cells.values())
            continue
        assert "paper" in sweep.scales, path  # every paper table runs at the paper's scale
        for v in sweep.variants:  # the paper's number sits beside every cell
            assert all(cell.paper is not None for cell in v.cells.values()), (path, v.name)
    studies = [p.stem for p in (CONFIG_DIR / "sweep").glob("*.yaml") if load_sweep(p.stem).study]
    assert studies == ["omega_study"]


def release_point(cfg):
    """The release's operating point for this config's model size and NFE (None: no size)."""
    from imf_core.models.official import RELEASED_POINTS

    m = cfg.model_config()
    sizes = {(12, 768): "imf_b2", (24, 768): "imf_m2", (32, 1024): "imf_l2", (48, 1024): "imf_xl2"}
    size = sizes.get((m.depth, m.width))
    points = [p for p in RELEASED_POINTS.get(size, ()) if p.nfe == cfg.eval.nfe]
    return points[0] if points else None


def assert_grid_holds_release_point(cfg, where):
    point = release_point(cfg)
    assert point is not None, f"{where}: no released point for this size and NFE"
    assert point.omega in cfg.eval.omegas, where
    if cfg.guidance.mode == "omega_interval":
        assert [point.t_min, point.t_max] in cfg.eval.intervals, where
    # ... and a neighbourhood that can find a better point: omegas on both sides.
    assert min(cfg.eval.omegas[1:]) < point.omega < max(cfg.eval.omegas), where


def test_every_paper_scale_grid_holds_its_sizes_release_point():
    from tasks.config import load_config

    assert_grid_holds_release_point(load_config("imagenet_b2"), "imagenet_b2")
    checked = 0
    for path in sorted((CONFIG_DIR / "sweep").glob("*.yaml")):
        sweep = load_sweep(path.stem)
        if sweep.study:  # no paper scale
            continue
        for name, cfg in variant_configs(sweep, "paper", [], []).items():
            if cfg.guidance.conditions_on_omega:  # fixed-omega models take no omega input
                assert_grid_holds_release_point(cfg, f"{path.stem}/{name}")
                checked += 1
    assert checked == 2 + 4 + 5  # Tab. 1b's two, Tab. 1c's four, Tab. 2's five


def test_every_comparison_changes_one_factor():
    """Each variant differs from the row it is compared with only in the factor the paper
    ablates there (its `factor` list), at every scale; every sweep compares its rows."""
    from flows.sweep_config import comparisons, config_diff

    for path in sorted((CONFIG_DIR / "sweep").glob("*.yaml")):
        sweep = load_sweep(path.stem)
        assert sum(bool(v.compare_with) for v in sweep.variants) == len(sweep.variants) - 1
        pairs = {(v.name, other.name) for v, other, _, _ in comparisons(sweep)}
        for scale in sweep.scales:
            configs = variant_configs(sweep, scale, [], [])
            for name, other in pairs:  # compare_with, and its row's other training where used
                diff = config_diff(configs[name], configs[other])
                assert diff, f"{path.stem}/{scale}: {name} equals {other}"
                extra = diff - set(next(v.factor for v in sweep.variants if v.name == name))
                assert not extra, f"{path.stem}/{scale}: {name} vs {other}: {extra}"


def test_a_row_of_two_trainings_is_compared_column_by_column():
    """Tab. 1b: the omega row is compared with the fixed-omega row in both columns; that row
    is two trainings (w/o CFG: imf_aux, w/ CFG: imf_aux_cfg)."""
    from flows.sweep_config import comparisons

    pairs = [(v.name, o.name, c) for v, o, c, _ in comparisons(load_sweep("table1b"))]
    assert ("omega", "imf_aux", "FID w/o CFG") in pairs
    assert ("omega", "imf_aux_cfg", "FID w/ CFG") in pairs
    assert ("imf_aux_cfg", "imf_aux", "FID w/ CFG") in pairs  # CFG against its own no-CFG twin
    assert len(pairs) == len(set(pairs)) == 5


def test_the_two_step_row_is_compared_with_the_one_step_fid_not_the_parameter_count():
    from flows.sweep_config import comparisons

    pairs = [(v.name, o.name, c, d) for v, o, c, d in comparisons(load_sweep("table2_sizes"))]
    assert [p for p in pairs if p[0] == "xl2_nfe2"] == [
        ("xl2_nfe2", "xl2", "FID 2-NFE", "FID 1-NFE")
    ]


def test_table1b_reuses_table1a_trainings():
    from tasks.train import train_key_of

    a = variant_configs(load_sweep("table1a"), "smoke", [], ["imf_aux_cfg"])["imf_aux_cfg"]
    b = variant_configs(load_sweep("table1b"), "smoke", [], ["imf_aux_cfg"])["imf_aux_cfg"]
    assert train_key_of(a, "p") == train_key_of(b, "p")


def test_a_setting_added_later_keeps_existing_trainings_found():
    from tasks.config import load_config
    from tasks.train import train_key_of

    # The smoke training's key since the tiny preset's one-token conditions (2026-12-03): a
    # setting added later with a default that changes nothing (as optim.decay_fraction was)
    # must leave it the same, so trainings made now are reused; setting the value makes a new one.
    assert train_key_of(load_config("smoke"), "0" * 16) == "0b2e09661207a95b"
    for setting in (
        "optim.decay_fraction=0.3",
        "optim.embedder_lr_scale=10.0",
        "model.omega_input_scale=1000.0",
    ):
        assert train_key_of(load_config("smoke", [setting]), "0" * 16) != "0b2e09661207a95b"


@pytest.mark.slow
def test_pipeline_reruns_only_what_failed(tmp_path, prefect_server, local_ray, capsys, monkeypatch):
    root = [f"paths.artifacts={tmp_path}/a", f"tracking.uri=sqlite:///{tmp_path}/m.db"] + FAST
    missing = ["eval.features=inception", "eval.inception_weights=/no/such/weights.pth"]
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        run_pipeline("smoke", root + missing)
    assert not (tmp_path / "a").exists()  # refused before any stage started
    import numpy as np

    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))  # no mu / sigma
    bad = [f"eval.reference={tmp_path / 'bad.npz'}"]
    # refused by the preflight (tasks.inputs) before any stage, whether FID during training
    # (smoke's default) reads it or only the evaluation does
    for during in ([], ["train.eval_every=0"]):
        with pytest.raises(ValueError, match=r"FID reference .*has no mu and sigma"):
            run_pipeline("smoke", root + bad + during)
        assert not (tmp_path / "a").exists()

    def unreadable(path):  # a failure inside evaluation, that no check before it can see
        raise ValueError(f"FID reference {path} could not be read")

    with monkeypatch.context() as patch:
        patch.setattr("tasks.evaluate.load_reference", unreadable)
        with pytest.raises(ValueError, match="could not be read"):
            run_pipeline("smoke", root + ["train.eval_every=0"])
    (train_dir,) = (tmp_path / "a" / "train").iterdir()
    weights = train_dir / "ema.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert not list((tmp_path / "a" / "evaluate").glob("*/units/*"))  # failed before any unit

    rerun = run_pipeline("smoke", root)
    assert rerun.stages["precompute"] in ("reused", "cached")
    assert rerun.stages["train"] in ("reused", "cached")
    assert rerun.stages["evaluate"] == "computed"
    assert weights.stat().st_mtime_ns == stamp  # training was not redone
    # Reused stages end in a Prefect state named for it ("Reused"; "Cached" on a cache hit)
    # -- the stage outcome is read off the state's name.
    assert rerun.stages["train"] == "reused" or rerun.stages["train"] == "cached"
    from flows.cli import main

    assert main(["run", "-e", "smoke", *root]) == 0  # the third run, as a user types it
    out = capsys.readouterr().out
    for stage in ("precompute", "train", "evaluate"):
        line = next(x for x in out.splitlines() if x.startswith(f"{stage}: "))
        assert line.split()[1] in ("reused", "cached") and str(tmp_path) in line  # absolute
    assert f"training {rerun.train.mlflow_run_id}, evaluation {rerun.evaluate.mlflow_run_id}" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/m.db" in out
    assert f"/runs/{rerun.train.mlflow_run_id}?workflowType=machine_learning" in out  # classic UI
    assert f"{rerun.evaluate.path.resolve()}/results.json" in out


# Two variants that train and evaluate (tests/test_s3_pipeline.py runs them on object storage)
TWO_VARIANTS = """
title: "test table"
columns: ["FID w/o CFG", "FID w/ CFG"]
scales:
  smoke: {experiment: smoke, overrides: []}
variants:
  - name: plain
    row: iMF
    overrides: [guidance.mode=none, "eval.omegas=[1.0]"]
    cells: {"FID w/o CFG": {metric: fid_best, paper: 30.0}}
  - name: cfg
    row: iMF
    overrides: ["eval.omegas=[1.0,2.0]"]
    cells: {"FID w/ CFG": {metric: fid_best, paper: 5.0}}
"""
SWEEP = (
    TWO_VARIANTS
    + """  - name: diverges
    row: broken
    overrides: [optim.lr=1.0e30, guidance.mode=none, train.checkpoint_every=1]
    cells: {"FID w/o CFG": {metric: fid_best, paper: 1.0}}
  # Tab. 2's XL/2 at 1 and 2 NFE in small: plain's training, evaluated at 2 NFE
  - name: plain_nfe2
    row: iMF 2-NFE
    overrides: [guidance.mode=none, "eval.omegas=[1.0]", eval.nfe=2]
    cells: {"FID w/o CFG": {metric: fid_best}}
"""
)


@pytest.fixture(scope="module")
def mini_sweep(tmp_path_factory, prefect_server, local_ray):
    """One sweep that several tests read: two variants that train and evaluate, one whose loss
    blows up, and one that shares a training with another and evaluates it at 2 NFE; FID
    during training at steps 10 and 20."""
    root = tmp_path_factory.mktemp("mini_sweep")
    sweep_file = root / "mini.yaml"
    sweep_file.write_text(SWEEP)
    uri = f"sqlite:///{root}/m.db"
    # FAST but the checkpoint interval: the variant that blows up checkpoints every step
    fast = [o for o in FAST if not o.startswith("train.checkpoint_every=")]
    overrides = [f"paths.artifacts={root}/a", f"tracking.uri={uri}", *fast]
    overrides.append("train.eval_every=10")  # FID during training at steps 10 and 20
    result = run_sweep(str(sweep_file), "smoke", overrides, concurrency=2)
    return SimpleNamespace(root=root, file=sweep_file, uri=uri, overrides=overrides, result=result)


@pytest.mark.slow
def test_sweep_nests_variants_survives_a_failure_and_reports(mini_sweep):
    tmp_path, sweep_file, uri = mini_sweep.root, mini_sweep.file, mini_sweep.uri
    overrides, result = mini_sweep.overrides, mini_sweep.result
    status = {v.name: v.status for v in result.variants}
    assert status == {"plain": "ok", "cfg": "ok", "diverges": "failed", "plain_nfe2": "ok"}
    assert "not finite" in next(v for v in result.variants if v.name == "diverges").error

    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FAILED" and parent.data.tags["sweep"] == "mini"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_variant = {r.data.tags["variant"]: r for r in children}
    assert set(by_variant) == {"plain", "cfg", "diverges"}  # plain_nfe2 evaluates plain's run
    for name in ("plain", "cfg"):
        run = by_variant[name]
        assert run.info.status == "FINISHED" and run.data.tags["row"] == "iMF"
        assert run.data.params["train.steps"] == "20" and "model.params_m" in run.data.params
        assert run.data.metrics["eval/fid_best"] > 0
        assert run.info.run_name == name  # named for what it is, not a hash
        assert not [k for k, v in run.data.params.items() if v == "None"]
        assert run.data.params["model.depth"] == "4"  # the preset's resolved values
    assert by_variant["diverges"].info.status == "FAILED"
    assert not parent.data.metrics  # the variants' FIDs live on their runs, the table here
    evaluations = client.search_runs([parent.info.experiment_id], "tags.stage = 'evaluate'")
    assert len(evaluations) == 3  # one per variant that trained, the shared training's two
    for run in evaluations:  # where each came from, and what it read
        assert run.data.tags["imf.device"] == "cpu" and run.data.tags["mlflow.source.git.commit"]
        (dataset,) = run.inputs.dataset_inputs
        assert dataset.dataset.digest and '"num_rows": 1797' in dataset.dataset.profile

    # A rerun of the finished variants: same parent run, every stage reused, nothing retrained.
    again = run_sweep(str(sweep_file), "smoke", overrides, only=["plain", "cfg"])
    assert again.parent_run_id == result.parent_run_id and not again.failed
    assert {v.train_run_id for v in again.variants} == {
        by_variant["plain"].info.run_id,
        by_variant["cfg"].info.run_id,
    }

    # The plan of that sweep now: every stage is there, nothing would run.
    sweep = load_sweep(str(sweep_file))
    configs = variant_configs(sweep, "smoke", overrides, ["plain", "cfg"])
    plan = plan_of("mini", configs, gpu="h200")
    assert {s.status for s in plan.stages} == {"reused"} and len(plan.stages) == 5
    assert "to run: 0 precompute, 0 trainings, 0 evaluations" in plan.text()

    report = report_flow(result.parent_run_id, tracking=uri, artifacts=str(tmp_path / "a"))
    lines = report.markdown.splitlines()
    assert "by imf-pipeline 0.1.0 (commit " in report.markdown  # which code wrote it
    assert f"method version {METHOD_VERSION})." in report.markdown
    imf_row = next(line for line in lines if line.startswith("| iMF |"))
    plain_fid = by_variant["plain"].data.metrics["eval/fid_best"]
    # 20 training steps learn nothing: the number stands beside the paper's only with the flag.
    assert f"{plain_fid:.2f} **did not learn** (30)" in imf_row and "(5)" in imf_row
    assert "| plain | " in report.markdown and "**did not learn** |" in report.markdown
    assert "failed (1)" in next(line for line in lines if line.startswith("| broken |"))
    assert "plain: no CFG" in imf_row and "cfg: ω " in imf_row  # the best point per variant
    assert "![plain](grids/plain.png)" in (report.directory / "report.md").read_text()
    names = {Path(p).name for p in report.files}
    assert {"report.md", "fid_vs_omega.png", "fid_vs_step.png", "plain.png", "cfg.png"} <= names
    logged = {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    assert {"report/report.md", "report/table.json", "report/fid_vs_step.png"} <= logged
    # FID during training, read back from each training run's eval/fid history
    text = (report.directory / "report.md").read_text()
    assert "### FID during training" in text and "![FID vs step](fid_vs_step.png)" in text
    for name in ("plain", "cfg"):
        curve = client.get_metric_history(by_variant[name].info.run_id, "eval/fid")
        assert sorted(m.step for m in curve) == [10, 20]
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} | 10: "))
        assert f"20: {max(curve, key=lambda m: m.step).value:.2f}" in row


def test_welch_t_test_and_verdicts_on_known_inputs():
    from flows.report_table import verdict, welch

    a, b = [1.0, 2.0, 3.0, 4.0], [6.0, 7.0, 8.0, 9.0, 10.0]
    # By hand: means 2.5 and 8, variances 5/3 and 5/2, Welch-Satterthwaite df = 6.98.
    va, vb = 5 / 3 / 4, 5 / 2 / 5
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 4)
    t, p = welch(a, b)
    assert t == pytest.approx((2.5 - 8) / (va + vb) ** 0.5) and df == pytest.approx(6.98, abs=0.01)
    from scipy.stats import t as student

    assert p == pytest.approx(2 * student.sf(abs(t), df)) and p == pytest.approx(7.09e-4, rel=0.01)
    # Paper: the second row lower (better) than the first, like ours here -> same direction.
    assert verdict((b, a), (32.69, 29.42)) == "same direction as the paper (p < 0.001)"
    assert verdict((a, b), (32.69, 29.42)).startswith("opposite")
    assert verdict(([1.0, 5.0], [2.0, 4.0]), (1, 2)).startswith("not resolved at this n")
    assert verdict(([1.0], [2.0]), (1, 2)) == "not resolved at this n (one seed)"


SEEDED = """
title: "seeded"
columns: ["FID"]
scales:
  smoke: {experiment: smoke, overrides: []}
variants:
  - name: base
    row: base
    overrides: [guidance.mode=none, "eval.omegas=[1.0]"]
    cells: {"FID": {metric: fid_best, paper: 30.0}}
  - name: faster
    row: faster
    overrides: [guidance.mode=none, "eval.omegas=[1.0]", optim.lr=6.0e-3]
    compare_with: base
    factor: [optim.lr]
    cells: {"FID": {metric: fid_best, paper: 20.0}}
"""


@pytest.mark.slow
def test_the_fid_plot_draws_one_series_per_variant_with_its_seed_spread():
    from flows.report_plots import fid_figure
    from flows.report_runs import VariantRuns

    def runs(name, seed, fids, omegas):
        pairs = zip(omegas, fids, strict=True)
        results = [{"omega": w, "t_min": 0.0, "t_max": 1.0, "fid": f} for w, f in pairs]
        return VariantRuns(name, "ok", None, None, results, f"{name}.s{seed}")

    one_omega = [runs("a", s, [10.0 + s], [1.0]) for s in range(3)]
    one_omega += [runs("b", s, [20.0 + 2 * s], [1.0]) for s in range(3)]
    ax = fid_figure(one_omega).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]  # by variant, not seed
    assert "3 seeds" in ax.get_title()
    means = [c.lines[0].get_ydata().tolist() for c in ax.containers]
    assert means == [[11.0], [22.0]]
    sds = [c.lines[2][0].get_segments()[0][:, 1].tolist() for c in ax.containers]
    assert sds == [[10.0, 12.0], [20.0, 24.0]]  # mean -+ sd (1 and 2)

    curves = [runs("a", s, [30.0, 20.0 + s], [1.0, 2.0]) for s in range(2)]
    ax = fid_figure(curves).axes[0]
    assert ax.get_xlabel() == "CFG scale omega"
    assert [c.lines[0].get_xdata().tolist() for c in ax.containers] == [[1.0, 2.0]]
    assert [c.lines[0].get_ydata().tolist() for c in ax.containers] == [[30.0, 20.5]]


SIZES = """
title: "sizes"
columns: ["params (M)", "FID"]
scales: {smoke: {experiment: smoke, overrides: []}}
variants:
  - name: big
    row: big
    cells: {"params (M)": {metric: params_m, paper: 133}, "FID": {metric: fid_best, paper: 4.57}}
  - name: small
    row: small
    compare_with: big
    factor: [model.conditioning]
    cells: {"params (M)": {metric: params_m, paper: 89}, "FID": {metric: fid_best, paper: 4.09}}
"""


def test_a_model_property_is_shown_once_never_flagged_or_t_tested(tmp_path):
    from types import SimpleNamespace

    from flows.report_runs import VariantRuns, group_by_variant
    from flows.report_table import comparisons_markdown, paper_table

    (tmp_path / "sizes.yaml").write_text(SIZES)
    sweep = load_sweep(str(tmp_path / "sizes.yaml"))

    def runs(name, seed, size, fid, flagged):
        data = SimpleNamespace(
            metrics={"eval/fid_best": fid}, params={"model.params_m": size}, tags={}
        )
        best = {"best": True, "omega": 1.0, "t_min": 0.0, "t_max": 1.0, "fid": fid}
        best["did_not_learn"] = flagged
        return VariantRuns(name, "ok", SimpleNamespace(data=data), None, [best], f"{name}.s{seed}")

    variants = [runs("big", s, "0.39", 40.0 + s, False) for s in range(3)]
    variants += [runs("small", s, "0.28", 60.0 + s, s == 2) for s in range(3)]
    table = paper_table(sweep, variants)
    assert table["params (M)"] == ["0.39 (133)", "0.28 (89)"]  # once: no "± 0.00", no flag
    assert table["FID"][1] == "61.00 ± 1.00 **did not learn** (1 of 3) (4.09)"
    rows = [line for line in comparisons_markdown(sweep, group_by_variant(variants)).splitlines()]
    compared = [line.split(" | ")[3] for line in rows if line.startswith("| small")]
    assert compared == ["FID"]  # the parameter counts are not t-tested


def test_a_network_that_ignores_omega_is_marked_beside_its_cfg_number(tmp_path):
    from types import SimpleNamespace

    from flows.report_runs import VariantRuns
    from flows.report_table import calibration_markdown, paper_table

    (tmp_path / "sizes.yaml").write_text(SIZES)
    sweep = load_sweep(str(tmp_path / "sizes.yaml"))

    def runs(name, seed, omega, blind):
        data = SimpleNamespace(metrics={}, params={"model.params_m": "0.3"}, tags={})
        best = {"best": True, "omega": 1.5, "t_min": 0.0, "t_max": 1.0, "fid": 30.0 + seed}
        best["did_not_learn"] = False
        best["sensitivity"] = {"class": {"one_step": 0.4}, "omega": {"one_step": omega}}
        best["ignores_omega"] = blind
        return VariantRuns(name, "ok", SimpleNamespace(data=data), None, [best], f"{name}.s{seed}")

    variants = [runs("big", s, 0.15, False) for s in range(2)]
    variants += [runs("small", 0, 0.004, True), runs("small", 1, 0.05, False)]
    table = paper_table(sweep, variants)
    assert table["FID"] == ["30.50 ± 0.71 (4.57)", "30.50 ± 0.71 *ignores ω* (1 of 2) (4.09)"]
    assert table["ω / class sensitivity"] == ["ω 15 % / class 40 %", "ω 2.7 % / class 40 %"]
    calibration = calibration_markdown(variants)
    assert "| ω 0.4 % / class 40 % | learned, *ignores ω* |" in calibration
    assert calibration.count("*ignores ω*") == 2  # the flagged seed, and the legend


def test_the_report_marks_rows_of_different_code(tmp_path, monkeypatch):
    from flows import report_table
    from flows.report_runs import VariantRuns, group_by_variant
    from flows.report_table import comparisons_markdown, table_markdown

    NOW = METHOD_VERSION
    (tmp_path / "sizes.yaml").write_text(SIZES)
    sweep = load_sweep(str(tmp_path / "sizes.yaml"))

    def runs(name, seed, fid, trained_by):
        run = SimpleNamespace(data=SimpleNamespace(metrics={}, params={}, tags={}))
        tags = {"imf.method_version": str(NOW), "imf.training_method_versions": trained_by}
        metrics = {"eval/fid_best": fid}
        evaluation = SimpleNamespace(data=SimpleNamespace(metrics=metrics, params={}, tags=tags))
        best = {"best": True, "omega": 1.0, "t_min": 0.0, "t_max": 1.0, "fid": fid}
        best["did_not_learn"] = False
        return VariantRuns(name, "ok", run, evaluation, [best], f"{name}.s{seed}")

    current = [runs(n, s, 40.0 + s, str(NOW)) for n in ("big", "small") for s in range(3)]
    assert "method version" not in table_markdown(sweep, "smoke", current)
    mixed = [runs("big", s, 40.0 + s, str(NOW - 1)) for s in range(3)] + current[3:]
    text = table_markdown(sweep, "smoke", mixed)
    assert "**Rows made by different code.**" in text and "--recompute-stale" in text
    assert f"training {NOW - 1}, evaluation {NOW}" in text and f"training {NOW}, eva" in text
    compared = comparisons_markdown(sweep, group_by_variant(mixed))
    assert "(rows of different code)" in compared
    monkeypatch.setattr(report_table, "METHOD_VERSION", NOW + 1)  # the same table, by a later code
    assert "**Not this code's numbers.**" in table_markdown(sweep, "smoke", current)


def test_the_longer_training_row_reads_off_its_own_curve():
    """Tab. 1c's "longer training": the report reads the longer variant's FID-during-training
    curve at the length of the row it is compared with, and at its own end."""
    from types import SimpleNamespace

    from flows.report_runs import VariantRuns
    from flows.report_table import progress_markdown

    sweep = load_sweep("table1c")
    data = SimpleNamespace(params={"eval.during_samples": "250"}, metrics={})

    def runs(name, curve):
        return VariantRuns(name, "ok", SimpleNamespace(data=data), None, [], name, curve)

    advanced = runs("advanced", {500: 60.0, 1000: 40.0})
    longer = runs("longer", {500: 62.0, 1000: 45.0, 1500: 33.0})
    text = progress_markdown(sweep, [runs("adaln", {}), advanced, longer])
    assert "FID of 250 samples" in text
    assert "| longer | 500: 62.00 · 1000: 45.00 · 1500: 33.00 |" in text
    assert "at step 1000, the length of `advanced`, `longer`'s own curve reads FID 45.00" in text
    assert "(`advanced` ended at 40.00); trained on to step 1500, 33.00" in text
    assert progress_markdown(sweep, [runs("adaln", {})]) == ""  # no curves: no section


def test_a_cell_is_read_from_the_variants_own_evaluation_not_a_shared_training_run():
    """Tab. 2's 1- and 2-NFE rows share one training: its run's eval/ metrics are whichever
    evaluation logged last, so each row's number comes from its own results.json."""
    from types import SimpleNamespace

    from flows.report_runs import VariantRuns, cell_value

    shared = SimpleNamespace(
        data=SimpleNamespace(metrics={"eval/fid_best": 27.8}, params={"guidance.mode": "none"})
    )
    one_step = {"best": False, "omega": 1.0, "fid": 30.0}
    two_step = {"best": True, "omega": 1.5, "fid": 22.2}
    runs = VariantRuns("xl2_nfe2", "ok", shared, None, [one_step, two_step])
    assert cell_value(runs, "fid_best") == 22.2
    assert cell_value(runs, "fid_no_cfg") == 30.0
    fixed = SimpleNamespace(data=SimpleNamespace(metrics={}, params={"guidance.mode": "fixed"}))
    assert cell_value(VariantRuns("cfg", "ok", fixed, None, [two_step]), "fid_no_cfg") is None


def test_the_progress_figure_adds_omega_sensitivity_over_steps_where_measured(tmp_path):
    from PIL import Image

    from flows.report_plots import plot_progress
    from flows.report_runs import VariantRuns, curve_mean
    from tasks.storage import Output

    def runs(seed, omega_curve):
        curve = {100: 90.0 + seed, 200: 40.0 + seed}
        return VariantRuns("v", "ok", None, None, [], f"v.s{seed}", curve, omega_curve)

    seeds = [runs(0, {100: 0.001, 200: 0.10}), runs(1, {100: 0.003})]
    assert curve_mean(seeds, "omega_curve") == {100: 0.002, 200: 0.10}  # the seeds that got there
    assert curve_mean(seeds) == {100: 90.5, 200: 40.5}
    out = Output.at(tmp_path / "reports" / "r")
    both = plot_progress(seeds, out, "both.png")
    fid_only = plot_progress([runs(0, {}), runs(1, {})], out, "fid.png")
    widths = [Image.open(out.local_path(name)).width for name in (both, fid_only)]
    assert widths[0] > 1.5 * widths[1]  # a second panel


@pytest.mark.slow
def test_seeds_group_under_their_variant_and_the_report_compares(
    tmp_path, prefect_server, local_ray
):
    sweep_file = tmp_path / "seeded.yaml"
    sweep_file.write_text(SEEDED)
    uri = f"sqlite:///{tmp_path}/m.db"
    overrides = [f"paths.artifacts={tmp_path}/a", f"tracking.uri={uri}"] + FAST
    # two trainings at a time, as the small-scale study runs (docs/sweeps.md)
    result = run_sweep(str(sweep_file), "smoke", overrides, seeds=2, concurrency=2)
    assert sorted(v.name for v in result.variants) == [
        "base.s0",
        "base.s1",
        "faster.s0",
        "faster.s1",
    ]
    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["seeds"] == "2" and parent.info.run_name == "seeded/smoke"
    groups = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert {g.info.run_name for g in groups} == {"base", "faster"}
    for group in groups:
        seeds = client.search_runs(
            [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{group.info.run_id}'"
        )
        name = group.info.run_name
        assert {r.info.run_name for r in seeds} >= {f"{name} seed 0", f"{name} seed 1"}
        assert {
            r.data.params.get("train.seed") for r in seeds if "train.seed" in r.data.params
        } == {"0", "1"}
    report = report_flow(result.parent_run_id, tracking=uri, artifacts=str(tmp_path / "a"))
    assert "mean ± sd over 2 training seeds" in report.markdown
    row = next(
        line for line in report.markdown.splitlines() if line.startswith("| faster | base |")
    )
    assert "optim.lr" in row and ("direction" in row or "not resolved" in row or "opposite" in row)
    assert "### Calibration" in report.markdown and "real data" in report.markdown


def test_a_paper_scale_plan_prints_the_costs_and_starts_nothing(tmp_path, monkeypatch, capsys):
    import threading

    import mlflow
    import ray

    from flows.cli import main
    from flows.sweep import sweep_flow

    def guarded(original):
        """`original` refused to the plan's thread; the session's background scenarios (other
        threads of this process, tests/conftest.py) go on using it meanwhile."""

        def call(*args, **kwargs):
            if threading.current_thread() is threading.main_thread():
                raise AssertionError("a plan started something")
            return original(*args, **kwargs)

        return call

    monkeypatch.setattr(ray, "init", guarded(ray.init))
    monkeypatch.setattr(mlflow.MlflowClient, "__init__", guarded(mlflow.MlflowClient.__init__))
    monkeypatch.setattr("flows.sweep.sweep_flow", guarded(sweep_flow))
    monkeypatch.chdir(tmp_path)  # the default artifact root and MLflow file would land here
    args = ["sweep", "table1a", "--scale", "paper", "--plan", "--gpu", "h200"]
    assert main(args + [f"paths.artifacts={tmp_path}/a"]) == 0
    text = capsys.readouterr().out
    assert "nothing started, nothing written" in text and "NVIDIA H200" in text
    # The paper's 240 ImageNet epochs of 1,281,167 images (a stored flip is an orientation, not
    # an image: issue 36) at batch 256: 5,005 steps an epoch, its last one of 143 images.
    epochs = "240 epochs of 1,281,167 images, each in one of its 2 stored orientations"
    assert text.count(f"1,201,200 steps of 256 = 307,480,080 images ({epochs})") == 6
    assert "to run: 1 precompute, 6 trainings, 6 evaluations" in text
    assert "GPU-hours" in text and "GB of new disk" in text
    imf_aux = next(line for line in text.splitlines() if line.strip().startswith("imf_aux "))
    assert "92.3 EFLOP" in imf_aux and "33.6 % MFU" in imf_aux  # 300 GFLOP an image, measured MFU
    assert "MFU x 989.4 TFLOP/s, the H200 SXM datasheet dense bf16 peak" in text
    assert list(tmp_path.iterdir()) == []  # no artifact folder, no mlflow.db


def test_the_plan_restates_a_recorded_mfu_as_useful_flops_over_the_datasheet_peak():
    """The 2026-12-04 checks wrote MFU over their measured matmul rate and over FLOPs that held
    the JVP's GEMMs by zero tangents (run 1 also counted twice): restated when read, the compiled
    B/2 imf_aux step of run 2 is 33.6 %, not the 47.1 % it printed, and both runs' eager steps,
    whose printed MFUs differ 2x, agree."""
    import json

    from flows.gpu_rates import GPU_CHECKS, restated_mfu, useful_flops_per_image

    runs = {
        p.name: json.loads(p.read_text()) for p in sorted(GPU_CHECKS.glob("2026-12-04-h200-*.json"))
    }
    run1, run2 = runs["2026-12-04-h200-run1.json"], runs["2026-12-04-h200-run2.json"]

    def entry(record, compile, objective="imf_aux"):
        return next(
            e
            for e in record["speed"]["entries"]
            if (e["model"], e["objective"], e["compile"], e["jvp_attention"])
            == ("B/2", objective, compile, "math")
            and "images_per_s" in e
        )

    compiled = entry(run2, "step")
    assert (compiled["mfu"], compiled["gflop_per_image"]) == (0.471, 424.9)  # as printed
    useful = useful_flops_per_image("2026-12-04-h200-run2.json", run2, compiled)
    assert useful / 1e9 == pytest.approx(424.9 - 23.45, abs=0.02)  # 23.45: the zero GEMMs
    restated = restated_mfu("2026-12-04-h200-run2.json", run2, compiled)
    assert restated == pytest.approx(0.336, abs=5e-4)
    # The same as the record's MFU x measured matmul / datasheet peak x useful / counted.
    assert restated == pytest.approx(compiled["mfu"] * 746.3 / 989.4 * useful / 424.9e9, rel=3e-3)
    assert not any(  # run 1 never timed a compiled imf_aux step (a graph break then)
        e["compile"] == "step" and "images_per_s" in e
        for e in run1["speed"]["entries"]
        if e["objective"] == "imf_aux"
    )
    eager = [restated_mfu(name, r, entry(r, "none")) for name, r in runs.items()]
    assert entry(run1, "none")["mfu"] > 1.9 * entry(run2, "none")["mfu"]  # as printed
    assert eager[0] == pytest.approx(eager[1], rel=0.02)  # 11.3 % and 11.2 %
    fm = entry(run2, "none", "fm")  # no JVP, no GEMMs by zero: only the denominator changes
    assert restated_mfu("2026-12-04-h200-run2.json", run2, fm) == pytest.approx(
        fm["images_per_s"] * 250.0e9 / 989.4e12
    )
    from benchmarks.__main__ import MFU_NOTE  # RESULTS.md's note on these records

    fm_compiled = entry(run1, "step", "fm")
    for name, record, e in [
        ("2026-12-04-h200-run2.json", run2, compiled),
        ("2026-12-04-h200-run2.json", run2, entry(run2, "none")),
        ("2026-12-04-h200-run1.json", run1, entry(run1, "none")),
        ("2026-12-04-h200-run1.json", run1, fm_compiled),
    ]:
        assert f"{100 * restated_mfu(name, record, e):.1f} %" in MFU_NOTE
    unknown = run2 | {"machine": run2["machine"] | {"gpu": "NVIDIA Tesla V100"}}
    with pytest.raises(LookupError, match="no datasheet peak for NVIDIA Tesla V100"):
        restated_mfu("x.json", unknown, compiled)


def test_the_plans_zero_tangent_gemms_are_those_torch_func_jvp_runs():
    """zero_tangent_gemm_flops (counted on the meta device) equals the FLOPs of the GEMMs with
    an all-zero operand that torch.func.jvp of u runs on real tensors (random weights, so that
    no zero-initialised layer counts), on the rows with r != t."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils._python_dispatch import TorchDispatchMode

    from flows.gpu_rates import zero_tangent_gemm_flops
    from imf_core.guidance import GuidanceConfig
    from imf_core.models import build, preset
    from imf_core.objectives import LossSpec, ObjectiveConfig, draw

    aten = torch.ops.aten

    class ZeroGemms(TorchDispatchMode):
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (aten.mm.default, aten.addmm.default):
                a, b = args[-2:]
                if not a.any() or not b.any():
                    self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
            return func(*args, **(kwargs or {}))

    cfg, objective = preset("tiny"), ObjectiveConfig(name="imf_aux")
    torch.manual_seed(0)
    model = build(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    batch = 4
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size)
    y = torch.zeros(batch, dtype=torch.long)
    d = draw(x, y, LossSpec(objective, GuidanceConfig(), cfg.num_classes))
    rows = slice(d.jvp_from, None)
    cond = d.cond.select(rows)
    z, r, t = x[rows], d.r[rows], d.t[rows]
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), ZeroGemms() as zero:
        torch.func.jvp(
            lambda z_, r_, t_: model(z_, t_, t_ - r_, cond),
            (z, r, t),
            (torch.randn_like(z), torch.zeros_like(r), torch.ones_like(t)),
        )
    assert zero.flops > 0
    assert zero_tangent_gemm_flops(cfg, objective) * batch == pytest.approx(zero.flops, rel=0.01)
    assert zero_tangent_gemm_flops(cfg, ObjectiveConfig(name="fm")) == 0.0


def test_a_gpu_without_a_check_is_costed_at_its_datasheet_peak_and_an_assumed_mfu():
    from flows.gpu_rates import Rates
    from tasks.train_loop import flops_per_image

    configs = variant_configs(load_sweep("table1a"), "paper", [], ["imf_aux"])
    plan = plan_of("table1a", configs, gpu="a100", mfu=0.35, images=1_281_167)
    (train,) = [s for s in plan.stages if s.stage == "train"]
    cfg = configs["imf_aux"]
    images = 240 * 1_281_167  # the paper's 240 epochs of ImageNet's images (issue 36)
    flops = images * flops_per_image(cfg.model_config(), cfg.objective, cfg.guidance)
    assert train.gpu_hours == pytest.approx(flops / (0.35 * 312e12) / 3600)
    assert plan.rates.peak_basis == "A100" and "assumed" in plan.rates.source
    assert "MFU x 312 TFLOP/s, the A100 datasheet dense bf16 peak" in plan.text()
    h200 = Rates.of("h200")  # evaluation: the measured rate, scaled by the two datasheet peaks
    assert plan.rates.eval_images_per_s == pytest.approx(h200.eval_images_per_s * 312 / 989.4)
    with pytest.raises(LookupError, match="no datasheet peak for 'v100'.*--gpu NAME --mfu X"):
        Rates.of("v100", 0.35)  # no datasheet peak known here either
    with pytest.raises(LookupError, match="no GPU check of a 'a100'"):
        Rates.of("a100")  # no check, no assumed MFU: nothing to cost with


@pytest.mark.slow
def test_variants_sharing_a_training_each_show_their_own_fid(mini_sweep):
    """Read as MLflow's compare view reads it (the REST API, through the client): one
    evaluation run per variant with its own FID, and the shared training run showing its own
    variant's number, never the other's (Tab. 2's XL/2 at 1 and 2 NFE: plain and plain_nfe2)."""
    uri, result = mini_sweep.uri, mini_sweep.result
    shared = [v for v in result.variants if v.name in ("plain", "plain_nfe2")]
    assert {v.status for v in shared} == {"ok"}
    own = {v.name: v.fid_best for v in shared}  # from each one's results.json
    assert own["plain"] != own["plain_nfe2"]
    assert len({v.train_run_id for v in shared}) == 1  # one training for both
    client = MlflowClient(uri)
    experiment = client.get_run(result.parent_run_id).info.experiment_id
    rows = client.search_runs([experiment], "tags.stage = 'evaluate'")
    rows = [r for r in rows if r.data.tags["variant"] in own]
    shown = {r.data.tags["variant"]: r.data.metrics["eval/fid_best"] for r in rows}
    assert shown == pytest.approx(own)
    for r in rows:  # each row carries the training's settings beside its own evaluation's
        assert r.data.params["model.depth"] == "4" and "eval.nfe" in r.data.params
    nfe = {r.data.tags["variant"]: r.data.params["eval.nfe"] for r in rows}
    assert nfe == {"plain": "1", "plain_nfe2": "2"}
    training = client.get_run(shared[0].train_run_id).data
    assert training.metrics["eval/fid_best"] == pytest.approx(own[training.tags["variant"]])


@pytest.mark.slow
def test_a_non_finite_loss_stops_with_a_clear_message(mini_sweep):
    diverges = next(v for v in mini_sweep.result.variants if v.name == "diverges")
    assert diverges.error.startswith("RuntimeError") and "not finite at step" in diverges.error
    trainings = mini_sweep.root / "a" / "train"
    (directory,) = [d for d in trainings.iterdir() if (d / "NAN").is_file()]
    assert list((directory / "ray" / "run").glob("checkpoint_*"))  # the last good one is kept
