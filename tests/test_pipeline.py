"""ideal_ray.pipeline: the stage runner's skip-if-done and resume rules, on stages that write real files;
the chain's tiny-vs-paper settings and the report table.

(The real chain runs end to end in `make demo` and the cluster integration test, which also runs the demo on the
job's run folder.)"""

import json
import os

import pytest

from conftest import report_rows
from ideal_ray.pipeline import STATE_FILE, Stage, run_stages


def _chain(tmp_path, calls, fail_at=None):
    def make(name, inputs):
        def run(state):
            calls.append(name)
            if name == fail_at:
                raise RuntimeError(f"{name} crashed")
            for dep in inputs:  # a stage reads what the earlier ones recorded
                assert os.path.isfile(state["stages"][dep]["outputs"]["file"])
            path = str(tmp_path / f"{name}.out")
            with open(path, "w") as f:
                f.write(name)
            return {"file": path}

        return Stage(name, run, lambda out: os.path.isfile(out["file"]))

    return [make("a", []), make("b", ["a"]), make("c", ["a", "b"])]


def test_rerun_skips_finished_stages_and_redoes_only_lost_outputs(tmp_path):
    calls = []
    run_dir = str(tmp_path / "run")
    state = run_stages(run_dir, _chain(tmp_path, calls), log=lambda m: None)
    assert calls == ["a", "b", "c"] and not any(r["skipped"] for r in state["stages"].values())
    saved = json.load(open(os.path.join(run_dir, STATE_FILE)))
    assert list(saved["stages"]) == ["a", "b", "c"] and saved["stages"]["c"]["outputs"]["file"].endswith("c.out")

    calls.clear()
    state = run_stages(run_dir, _chain(tmp_path, calls), log=lambda m: None)
    assert calls == [] and all(r["skipped"] for r in state["stages"].values())

    os.remove(tmp_path / "b.out")  # an output lost: that stage runs again, the others stay skipped
    calls.clear()
    run_stages(run_dir, _chain(tmp_path, calls), log=lambda m: None)
    assert calls == ["b"]


def test_a_crash_keeps_the_finished_stages_and_the_rerun_resumes_there(tmp_path):
    calls = []
    run_dir = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match="b crashed"):
        run_stages(run_dir, _chain(tmp_path, calls, fail_at="b"), log=lambda m: None)
    assert list(json.load(open(os.path.join(run_dir, STATE_FILE)))["stages"]) == ["a"]
    calls.clear()
    run_stages(run_dir, _chain(tmp_path, calls), log=lambda m: None)
    assert calls == ["b", "c"]


def test_only_and_bad_state_are_clear_errors(tmp_path):
    run_dir = str(tmp_path / "run")
    with pytest.raises(ValueError, match="unknown stage"):
        run_stages(run_dir, _chain(tmp_path, []), only=["z"], log=lambda m: None)
    with pytest.raises(RuntimeError, match="has not run yet"):
        run_stages(run_dir, _chain(tmp_path, []), only=["b"], log=lambda m: None)
    calls = []
    run_stages(run_dir, _chain(tmp_path, calls), only=["a"], log=lambda m: None)
    assert calls == ["a"]  # stops before b: b was not asked for and is not done
    with open(os.path.join(run_dir, STATE_FILE), "w") as f:
        f.write('["not a state"]')
    with pytest.raises(ValueError, match="not a pipeline state file"):
        run_stages(run_dir, _chain(tmp_path, []), log=lambda m: None)


# ------------------------------------------------------------------------------ the chain's settings and report
def _recorded_run(tmp_path):
    """pipeline.json's ``stages`` after a rerun that skipped the tokenizer and ran the rest."""
    run = tmp_path / "run"

    def rec(seconds, skipped=False, **outputs):
        return {"outputs": outputs, "seconds": seconds, "skipped": skipped}

    return {"stages": {
        "tokenizer": rec(118.4, True, export=str(run / "tokenizer_step300.pt"), steps=300, rec_mse=0.0301,
                         usage=0.484),
        "extract": rec(10.7, shards=str(run / "tokens"), images=320, rows=640, skipped=0, images_per_s=29.9),
        "ar": rec(60.2, export=str(run / "gpt_step60.pt"), steps=60, loss=4.125),
        "sample": rec(20.0, samples=str(run / "samples" / "samples.npz"), grid=str(run / "samples" / "grid.png"),
                      num_images=80, images_per_s=4.04),
        "evaluate": rec(30.0, recon=str(run / "eval-recon" / "result.json"), gen=str(run / "eval-gen" / "result.json"),
                        rfid=210.5, psnr=18.25, usage=0.5, gfid=301.0, class_accuracy=0.85, class_chance=0.1),
        "sweep": rec(40.1, best=str(run / "sweeps" / "cfg" / "report" / "best.json"), best_cfg_scale=1.75,
                     gfid_by_cfg_scale={"1.75": 299.5, "1.0": 310.3},
                     class_accuracy_by_cfg_scale={"1.75": 0.9, "1.0": 0.4}, class_chance=0.1),
    }}


def test_report_is_one_table_a_row_per_stage_with_its_time_numbers_and_artifacts(tmp_path):
    from ideal_ray.pipeline import pipeline_report

    text = pipeline_report(_recorded_run(tmp_path), "sqlite:////x/mlflow.db")
    rows = report_rows(text)
    assert list(rows) == ["tokenizer", "extract", "ar", "sample", "evaluate", "sweep", "total"]
    assert rows["tokenizer"][0] == "skipped (118 s then)" and rows["extract"][0] == "11"
    assert rows["total"][0] == "161"  # the stages run now: 10.7 + 60.2 + 20.0 + 30.0 + 40.1
    assert "usage 48.4%" in rows["tokenizer"][1] and rows["tokenizer"][2].endswith("tokenizer_step300.pt")
    assert "640 rows" in rows["extract"][1] and "29.9 images/s" in rows["extract"][1]
    assert "final loss 4.125" in rows["ar"][1] and rows["sample"][1] == "80 images, 4.0 images/s"
    assert rows["evaluate"][1] == ("rFID 210.50, PSNR 18.25 dB, usage 50.0%, gFID 301.00, class accuracy 85% "
                                   "(chance 10%)")
    assert rows["sweep"][1] == ("CFG scale: gFID / class accuracy (chance 10%): 1.0: 310.3 / 40%, 1.75: 299.5 / 90%; "
                                "best gFID at 1.75")
    assert rows["sweep"][2].endswith(os.path.join("sweeps", "cfg", "report"))
    assert text.splitlines()[-1].endswith("mlflow ui --backend-store-uri sqlite:////x/mlflow.db")
    assert pipeline_report(_recorded_run(tmp_path), "http://mlflow:5000").splitlines()[-1].startswith(
        "MLflow: http://mlflow:5000")


def test_report_reads_a_state_written_before_the_headline_numbers(tmp_path):
    from ideal_ray.pipeline import pipeline_report

    state = _recorded_run(tmp_path)
    for rec in state["stages"].values():  # only the paths, as an older pipeline.json has them
        rec["outputs"] = {k: v for k, v in rec["outputs"].items() if isinstance(v, str)}
    rows = report_rows(pipeline_report(state, "sqlite:////x/mlflow.db"))
    assert "final loss n/a" in rows["ar"][1] and "gFID per CFG scale: n/a" in rows["sweep"][1]


def test_tiny_and_paper_settings_are_presets_and_the_job_overrides_route_by_stage(tmp_path, monkeypatch, capsys):
    import sys

    from ideal_ray.config import load_config
    from ideal_ray import pipeline

    tiny = pipeline.pipeline_config(load_config("tiny"))
    paper = pipeline.pipeline_config(load_config("paper+fusion-none"))  # a variant has the scale of its base
    assert (tiny.preset, tiny.ar_preset, tiny.extract.views, tiny.extract.run.device, tiny.sweep.cfg_scales) == (
        "tiny", "ar-tiny", "release", "cpu", (1.0, 1.75))
    assert tiny.sampling.sample.per_class == 8 and tiny.sampling.run.num_actors == 1
    assert (paper.preset, paper.ar_preset, paper.extract.views, paper.extract.run.device, paper.ar_overrides) == (
        "paper", "ar-B", "llamagen", "auto", ())
    assert len(paper.sweep.cfg_scales) == 9 and paper.sampling.sample.per_class == 50
    # class accuracy: the convnet on every real train image for the synthetic shapes, the Inception probe on 50 per
    # class for natural images; the sweep's trials score their samples the same way as the evaluation
    for cfg, kind, per_class in ((tiny, "cnn", 0), (paper, "probe", 50)):
        assert (cfg.gen.classifier.kind, cfg.gen.classifier.per_class) == (kind, per_class)
        assert cfg.sweep.classifier == cfg.gen.classifier
    # the tiny GPT's classes are the synthetic set's
    stages = pipeline.tokenizer_to_eval_stages(load_config("tiny", ["data.synthetic_classes=7"]), str(tmp_path), tiny)
    assert [s.name for s in stages] == ["tokenizer", "extract", "ar", "sample", "evaluate", "sweep"]

    got = {}

    def fake_run_pipeline(cfg, pcfg, **kw):
        got.update(tok=cfg, pcfg=pcfg)
        return _recorded_run(tmp_path), "sqlite:////x/mlflow.db"

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run_pipeline)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "jobs"))
    from pipeline import main  # jobs/pipeline.py

    assert main(["sampling.sample.per_class=2", "ar.schedule.steps=40", "ar.optim.betas=0.9,0.95",
                 "sweep.cfg_scales=", "schedule.steps=7"]) == 0
    pcfg = got["pcfg"]
    assert pcfg.sampling.sample.per_class == 2 and pcfg.sampling.sample.cfg_scale == 1.75
    assert pcfg.ar_overrides == ("schedule.steps=40", "optim.betas=0.9,0.95")  # a value's commas are kept
    assert pcfg.sweep.cfg_scales == () and pcfg.extract.views == "release"  # no values: no sweep stage
    assert got["tok"].schedule.steps == 7  # the rest: the tokenizer's
    assert [s.name for s in pipeline.tokenizer_to_eval_stages(got["tok"], str(tmp_path), pcfg)][-1] == "evaluate"
    assert list(report_rows(capsys.readouterr().out)) == list(_recorded_run(tmp_path)["stages"]) + ["total"]
    with pytest.raises(SystemExit) as e:  # a wrong stage value: one sentence naming the stage's key, exit code 2
        main(["sampling.sample.top_p=0"])
    assert e.value.code == 2 and "sampling.sample.top_p=0.0 must be in (0, 1]" in capsys.readouterr().err


def test_one_local_cluster_is_sized_for_every_training_stage(monkeypatch):
    from ideal_ray.config import load_ar_config, load_config
    from ideal_ray import cluster
    from ideal_ray.train.ray_trainer import init_ray, local_cluster_cpus

    calls = []
    monkeypatch.setattr(cluster, "init_ray", lambda *a: calls.append(a) or False)  # an existing cluster: joined
    tok, ar = load_config("tiny"), load_ar_config("ar-tiny", ["dist.num_workers=4", "data.global_batch=8"])
    init_ray(tok, ar)
    assert calls == [(local_cluster_cpus(ar), "", {"env_vars": {"DS_ACCELERATOR": "cpu"}})]
    assert local_cluster_cpus(ar) > local_cluster_cpus(tok)


def test_the_gen_reference_is_found_before_the_first_stage(tmp_path, monkeypatch):
    """A reference that is not there is refused when the chain is built, in one sentence, not after the training
    stages: a given path, or the default <data.root>/val (a split without images included); the default of a
    synthetic set the tokenizer stage is still to make is made with it."""
    from ideal_ray.config import ConfigError, load_config
    from ideal_ray.data.synthetic import make_synthetic_imagenet
    from ideal_ray import pipeline

    root = tmp_path / "data"
    make_synthetic_imagenet(str(root), num_classes=2, train_per_class=2, val_per_class=1, size=16, seed=0)
    tok = load_config("tiny", [f"data.root={root}"])
    pcfg = pipeline.pipeline_config(tok)
    assert [s.name for s in pipeline.tokenizer_to_eval_stages(tok, str(tmp_path / "run"), pcfg)][-2:] == [
        "evaluate", "sweep"]  # <data.root>/val holds images
    nope = str(tmp_path / "VIRTUAL_imagenet256_labeled.npz")
    with pytest.raises(ConfigError, match=f"^gen.reference={nope}: nothing is there; set gen.reference to ADM's"):
        pipeline.tokenizer_to_eval_stages(tok, str(tmp_path / "run"), pipeline.pipeline_config(tok, [
            f"gen.reference={nope}"]))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not an archive")
    with pytest.raises(ConfigError, match=f"^gen.reference={junk}: the file is not an ADM reference npz"):
        pipeline.tokenizer_to_eval_stages(tok, str(tmp_path / "run"), pipeline.pipeline_config(tok, [
            f"gen.reference={junk}"]))
    for val in (root / "val").iterdir():  # a val split of Parquet shards, say: no images
        for f in val.iterdir():
            f.unlink()
    with pytest.raises(ConfigError, match=f"^data.root={root} has no val folder of images to be the generation "
                                          f"evaluation's FID reference \\(gen.reference defaults to <data.root>/val\\)"):
        pipeline.tokenizer_to_eval_stages(tok, str(tmp_path / "run"), pcfg)

    monkeypatch.chdir(tmp_path)  # the tiny preset's own root, data/synthetic, not made yet: made by the first stage
    tiny = load_config("tiny")
    assert not os.path.exists(tiny.data.root)
    assert len(pipeline.tokenizer_to_eval_stages(tiny, str(tmp_path / "run2"), pipeline.pipeline_config(tiny))) == 6


def test_a_rerun_of_the_evaluate_stage_goes_on_after_its_finished_reconstruction_part(tmp_path):
    """The evaluate stage's reconstruction evaluation finished, then its generation evaluation failed: the rerun
    takes the finished part of the same tokenizer file as it is (the evaluation refuses to write over a result);
    one of another file is not taken."""
    from ideal_ray.pipeline import _finished_recon

    out, tok = tmp_path / "eval-recon", tmp_path / "tokenizer_step4.pt"
    assert _finished_recon(str(out), str(tok)) is None
    out.mkdir()
    (out / "result.json").write_text(json.dumps({"rfid": 1.5, "psnr": 20.0, "usage": 0.5,
                                                 "protocol": {"tokenizer": str(tok)}}))
    assert _finished_recon(str(out), str(tok)) == {"rfid": 1.5, "psnr": 20.0, "usage": 0.5, "out_dir": str(out),
                                                   "protocol": {"tokenizer": str(tok)}}
    assert _finished_recon(str(out), str(tmp_path / "tokenizer_step8.pt")) is None
