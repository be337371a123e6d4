"""What a finished evaluation prints, and the end of `imf run` and the demo.

>>> print_results(result.evaluate.results, result.evaluate.stale)  # grid, calibration, verdicts
>>> print_where_to_look(result.config, result)  # MLflow runs, the UIs, the output files
"""

from __future__ import annotations


def print_results(results: list[dict], stale: str = "") -> None:
    """The grid, then the calibration every number needs beside it, then the verdicts: did
    not learn, ignores omega, and `stale` (tasks.artifacts.stale: not this code's numbers)."""
    from imf_core.guidance import IGNORES_OMEGA_BELOW

    for r in results:
        extra = f"  accuracy {r['accuracy']:.3f}" if "accuracy" in r else ""
        if "precision" in r:
            extra += f"  precision {r['precision']:.2f}  recall {r['recall']:.2f}"
        star = "  <- best" if r["best"] else ""
        point = f"omega {r['omega']:<5g} [{r['t_min']:g}, {r['t_max']:g}]"
        print(f"  {point}  FID {r['fid']:8.3f}  IS {r['is']:6.3f}{extra}{star}")
    best = next(r for r in results if r["best"])
    print("  calibration (same features, same reference):")
    if "real_data_floor" in best:
        floor, ceiling = best["real_data_floor"], best["class_mean_ceiling"]
        print(f"    real data        FID {floor['fid']:8.3f}   ({floor['rows']})")
        print(f"    class means      FID {ceiling['fid']:8.3f}   (every sample its class's mean)")
    else:
        print("    real data / class means: not computed (no precompute output, or calibrate off)")
    for r in results:
        if "many_step" in r:
            m = r["many_step"]
            point = f"omega {r['omega']:g} [{r['t_min']:g}, {r['t_max']:g}]"
            print(
                f"    {m['steps']}-step Euler   FID {m['fid']:8.3f}   (boundary velocity, {point})"
            )
    if "sensitivity" in best:
        print("  input sensitivity (relative change of u; imf_core.guidance.input_sensitivity):")
        for name, points in best["sensitivity"].items():
            at = "   ".join(f"{point} {value:7.2%}" for point, value in points.items())
            print(f"    {name:<9} {at}")
    if best["did_not_learn"]:
        print(
            "  DID NOT LEARN: accuracy near chance or FID above half the class-mean ceiling; "
            "these numbers say nothing about the method"
        )
    if best.get("ignores_omega"):
        print(
            f"  IGNORES OMEGA: its output moves less with omega than {IGNORES_OMEGA_BELOW:.0%} "
            "of what it moves with the class; its CFG numbers say nothing about CFG-conditioning"
        )
    if stale:
        print(f"  STALE: {stale}; --recompute-stale recomputes it")


def experiment_of(uri: str, run_id: str) -> str | None:
    """The experiment id of the run `run_id` in `uri` ("" without a run; None when the store
    does not hold it: outputs reused from a launch tracked elsewhere)."""
    from mlflow.exceptions import MlflowException

    from tasks.tracking_client import client as tracking_client

    if not run_id:
        return ""
    try:
        return tracking_client(uri).get_run(run_id).info.experiment_id
    except MlflowException:
        return None


def print_where_to_look(cfg, result) -> None:
    """The end of `imf run` and the demo: the MLflow runs, the UI commands, absolute paths."""
    from tasks.tracking import tracking_uri

    uri, ev = tracking_uri(cfg), result.evaluate
    best = next(r for r in ev.results if r["best"])
    grid = f"w{best['omega']:g}_t{best['t_min']:g}-{best['t_max']:g}.png"
    path = ev.out.uri
    train_run = result.train.mlflow_run_id
    print("\nwhere to look:")
    print(f"  MLflow runs     training {train_run}, evaluation {ev.mlflow_run_id}")
    web = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    experiment = experiment_of(uri, train_run)
    if experiment is None:  # reused outputs, tracked by another server or store
        print(f"  MLflow UI       the training run is not in {uri}: its outputs were made with")
        print(f"  {'':<15} another tracking.uri (the run id above is that server's)")
    else:
        if web != uri:
            print(f"  MLflow UI       mlflow ui --backend-store-uri {uri}, then")
        # MLflow 3's UI opens in its GenAI mode unless the URL asks for the model-training view.
        print(
            f"  {'' if web != uri else 'MLflow UI':<15} {web.rstrip('/')}/#/experiments/"
            f"{experiment}/runs/{train_run}?workflowType=machine_learning"
        )
    print("  Prefect UI      prefect server start                    # http://127.0.0.1:4200")
    print(f"  FID vs omega    {path}/fid_vs_omega_t*.png")
    print(f"  sample grids    {path}/grids/ (best: {grid})")
    print(f"  results         {path}/results.json")
    training = result.train.out
    during = training.list("during/*/step*/results.json")
    if during:  # tasks.inrun_eval: eval/fid over steps on the training run
        folder = during[0].rsplit("/", 2)[0]
        print(f"  FID in training {training.uri}/{folder}/step*/results.json ({len(during)} steps)")
