"""ideal_ray.tune.compare and jobs/compare.py on a real MLflow SQLite store (no Ray needed to read runs).

The store holds what the sweeps write: a parent run per sweep (``common.parent_run``) and child runs shaped like
Ray's MLflow logger's (``trial_name`` tag, the trial's config as params, reports plus Tune's bookkeeping as
metrics), here an ablation with fusion and layer-study variants and a trial that failed once and was rerun.
"""

from __future__ import annotations

import csv
import io
import os
import sys

import pytest

from ideal_ray.tune import common
from ideal_ray.tune import compare as cmp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = "ideal-sweep-ablation"
# variant -> (rfid, ris, probe top-1 or None): the shape of the paper's Tables 1 and 7
ABLATION = {"fusion-attention": (0.61, 230.4, None), "fusion-none": (0.85, 231.1, None),
            "layer-8": (0.69, 180.0, 0.2866), "layer-12": (0.66, 190.0, 0.5140), "layer-24": (0.85, 200.0, 0.8343)}
TUNE_BOOKKEEPING = {"time_total_s": 12.0, "training_iteration": 1.0, "timestamp": 1.7e9, "done": 1.0}


def _child(client, exp_id: str, parent: str, trial: str, params: dict, metrics: dict, status: str = "FINISHED"):
    from mlflow.entities import Metric, Param

    run = client.create_run(exp_id, run_name=trial, tags={"mlflow.parentRunId": parent, "trial_name": trial})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=[Metric(k, float(v), 0, 1) for k, v in metrics.items()])
    client.set_terminated(run.info.run_id, status=status)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow import MlflowClient

    d = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    path = common.sweep_path(str(d / "sweeps"), "ablation-tiny")
    parent = common.parent_run(uri, EXPERIMENT, path, "ablation", {"steps": 100})
    client = MlflowClient(uri)
    exp_id = client.get_run(parent).info.experiment_id
    # layer-12 failed first (no metrics), then its rerun finished: the table keeps the finished one
    failed = _child(client, exp_id, parent, "trial_00003", {"variant": "layer-12", "budget": 100},
                    {"training_iteration": 1.0}, status="FAILED")
    ids = {}
    for i, (variant, (rfid, ris, probe)) in enumerate(ABLATION.items()):
        metrics = {"rfid": rfid, "ris": ris, **TUNE_BOOKKEEPING, "config/budget": 100.0}
        if probe is not None:
            metrics["probe_recon_top1"] = probe
        ids[variant] = _child(client, exp_id, parent, f"trial_{i:05d}", {"variant": variant, "budget": 100}, metrics)
    return {"uri": uri, "path": path, "parent": parent, "ids": ids, "failed": failed, "dir": d}


def test_one_row_per_trial_swept_params_and_shared_metrics(store):
    title, rows = cmp.load_runs(store["uri"], sweep="ablation-tiny")
    assert store["parent"] in title
    assert sorted(r.run_id for r in rows) == sorted(store["ids"].values())  # the failed first attempt is gone
    table = cmp.build_comparison(rows, title)
    assert table.params == ["variant"]  # budget is the same in every trial
    assert table.metrics == ["rfid", "ris"]  # probe top-1 only in some rows; Tune's fields never
    md = table.markdown()
    assert md.splitlines()[0] == "| run | variant | rfid ↓ | ris ↑ |"
    assert len(md.splitlines()) == 2 + len(ABLATION)
    got = {r["variant"]: (float(r["rfid"]), float(r["ris"])) for r in csv.DictReader(io.StringIO(table.csv()))}
    assert got == {k: v[:2] for k, v in ABLATION.items()}


def test_sorting_best_first_and_by_params(store):
    _, rows = cmp.load_runs(store["uri"], parent_run_id=store["parent"])
    by_rfid = cmp.build_comparison(rows, sort_by="rfid").rows
    assert [r.metrics["rfid"] for r in by_rfid] == sorted(v[0] for v in ABLATION.values())
    by_ris = cmp.build_comparison(rows, sort_by="ris").rows
    assert by_ris[0].params["variant"] == "fusion-none"  # higher IS is better: first
    by_param = [r.params["variant"] for r in cmp.build_comparison(rows).rows]
    assert by_param == sorted(ABLATION)
    explicit = cmp.build_comparison(rows, metrics=["probe_recon_top1"])
    assert explicit.metrics == ["probe_recon_top1"] and "-" in explicit.markdown()  # fusion rows have no probe
    with pytest.raises(ValueError, match="in none of the runs"):
        cmp.build_comparison(rows, metrics=["gfid"])


def test_layer_study_plot_is_the_tradeoff_curve(store, tmp_path):
    _, rows = cmp.load_runs(store["uri"], parent_run_id=store["parent"])
    table = cmp.build_comparison(rows)
    assert cmp.plot_comparison(table, str(tmp_path / "p.png")) == "layer-tradeoff"
    assert (tmp_path / "p.png").stat().st_size > 0
    assert sorted(cmp.layer_index(r) for r in rows if r.params["variant"].startswith("layer")) == [8, 12, 24]
    fusion_only = [r for r in rows if r.params["variant"].startswith("fusion")]
    assert cmp.plot_comparison(cmp.build_comparison(fusion_only), str(tmp_path / "b.png")) == "bars"


def test_cfg_rows_plot_fid_vs_cfg(tmp_path):
    rows = [cmp.RunRow(f"t{i}", f"id{i}", "FINISHED", {"cfg_scale": str(s), "top_k": str(k)},
                       {"gfid": 10 - s + k / 1000, "precision": 0.5})
            for i, (s, k) in enumerate([(1.0, 0), (2.0, 0), (1.0, 100), (2.0, 100)])]
    table = cmp.build_comparison(rows, "cfg", sort_by="gfid")
    assert table.params == ["cfg_scale", "top_k"] and table.metrics == ["gfid", "precision"]
    assert [r.name for r in table.rows] == ["t1", "t3", "t0", "t2"]
    assert cmp.plot_comparison(table, str(tmp_path / "c.png")) == "fid-vs-cfg"
    assert cmp.plot_is_vs_fid(rows, str(tmp_path / "pr.png")) and (tmp_path / "pr.png").stat().st_size > 0


def test_experiment_mode_leaves_out_sweep_parents(store):
    title, rows = cmp.load_runs(store["uri"], experiment=EXPERIMENT)
    assert store["parent"] not in {r.run_id for r in rows}
    assert len(rows) == len(ABLATION)  # the failed attempt shares its trial_name with the rerun
    with pytest.raises(ValueError, match="known"):
        cmp.load_runs(store["uri"], experiment="nope")


def test_ambiguous_or_unknown_sweep_names(store):
    paths = [common.sweep_path(str(store["dir"] / where), "dup") for where in ("here", "there")]
    ids = [common.parent_run(store["uri"], EXPERIMENT, p, "cfg", {}) for p in paths]
    with pytest.raises(ValueError, match="matches 2 sweeps"):
        cmp.find_sweep(store["uri"], "dup")
    assert [cmp.find_sweep(store["uri"], p) for p in paths] == ids  # a full path is unambiguous
    with pytest.raises(ValueError, match="no sweep 'missing'"):
        cmp.find_sweep(store["uri"], "missing")


def test_cli_prints_and_writes_every_trial(store, tmp_path, capsys):
    sys.path.insert(0, REPO)
    from jobs.compare import main

    out_dir = tmp_path / "out"
    assert main(["--parent-run-id", store["parent"], "--tracking-uri", store["uri"], "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    for variant in ABLATION:
        assert variant in out
        assert variant in (out_dir / "comparison.md").read_text()
        assert variant in (out_dir / "comparison.csv").read_text()
    assert (out_dir / "comparison.png").stat().st_size > 0
    with pytest.raises(SystemExit) as refused:
        main(["--sweep", "missing", "--tracking-uri", store["uri"], "--out", str(out_dir)])
    assert refused.value.code == 2
    assert "no sweep 'missing'" in capsys.readouterr().err
