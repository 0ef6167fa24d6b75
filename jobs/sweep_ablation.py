"""The paper's ablations as one Ray Tune sweep: each trial trains the tokenizer (Ray Train + DeepSpeed) for a step
budget and evaluates it (rFID, rIS, PSNR, SSIM, usage; + linear-probe top-1 for the layer study).

    # laptop: the fusion study (Table 7a) at tiny scale on a local Ray cluster, one trial at a time
    python jobs/sweep_ablation.py --study fusion --name fusion-tiny --steps 200
    # cluster: the layer study (Table 1), 8 GPUs per trial, ASHA on the training reconstruction MSE
    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/sweep_ablation.py --preset paper --study layer --name layers --storage /shared/sweeps \\
        --steps 20000 scheduler=asha workers_per_trial=8 gpus_per_worker=1 eval_images=10000 \\
        train.data.root=/datasets/imagenet
    # any combination of config.ABLATIONS variants
    python jobs/sweep_ablation.py --study custom --name mix --steps 200 \\
        variants=fusion-linear,fusion-linear+shallow-align-off

The settings are an ``AblationSweepConfig`` (``ideal_ray.config``): ``--preset tiny`` (default: every trial trains
the tiny preset, on the CPU) or ``paper`` (the paper's tokenizer), the flags below, then ``a.b=c`` overrides of any
field, e.g. ``scheduler=asha``, ``asha_metric=train_rec_mse``, ``asha_mode=min``, ``grace_period=100``,
``reduction_factor=3``, ``workers_per_trial=8``, ``gpus_per_worker=1``, ``max_concurrent_trials=2``,
``eval_images=1000``, ``probe_train_images=10000``, ``zero_shot=true``, ``tracking_uri=...``. An override whose
key starts with ``train.`` sets every trial's training config instead (the prefix dropped), e.g.
``train.data.root=/datasets/imagenet``, ``train.optim.lr=2e-4``, ``train.schedule.log_every=10``.

Studies: fusion {attention, linear, none}, shallow-align {on, off}, backbone {siglip2, dinov2, dinov3}, layer {8, 12,
16, 20, 24} (paper scale), custom (``variants=...``). Every variant, its pretrained files and the data are checked
before any trial starts. Rerunning the same --name with the same settings resumes the sweep: finished trials are not
rerun (other settings are refused: ``<storage>/<name>/sweep.json``).

Results: ``<storage>/<name>/`` (Tune state, ``train/<name>.<variant>`` runs and exports,
``eval/<variant>/result.json``), one MLflow parent run per sweep with a child run per trial (experiment
``ideal-ablation`` in $MLFLOW_TRACKING_URI, default ``<storage>/<name>/mlflow.db``), and the table printed at the end.
Exit code: 0 every trial finished, 1 a trial failed, 2 refused settings, 130 interrupted.
"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ideal_ray.cli import (INTERRUPTED, add_stage_args, outcome, refuse, stage_config_from_args,  # noqa: E402
                           take_overrides)
from ideal_ray.console import job_console, say  # noqa: E402

TRAIN = "train."  # the prefix of the overrides of every trial's training config (cli.take_overrides)
SHORTHANDS = [
    ("--study", "study", "fusion | shallow-align | backbone | layer | custom (with variants=v1,v2+v3)",
     {"metavar": "STUDY"}),
    ("--name", "name", "the sweep's folder under --storage; rerunning it resumes the sweep", {"metavar": "NAME"}),
    ("--storage", "storage_path", "folder of the sweeps (local disk or NFS)"),
    ("--steps", "steps", "every trial's step budget (default: the training preset's schedule)", {"metavar": "N"}),
]


def main(argv=None) -> int:
    import argparse

    from ideal_ray.config import AblationSweepConfig, ConfigError, check_data_root, load_config, validate_stage

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stage_args(parser, AblationSweepConfig, SHORTHANDS, default_preset="tiny")
    args = parser.parse_args(argv)
    # train.a.b=c goes to every trial's training config whole (its value may hold commas, e.g. a tuple)
    train, args.overrides = take_overrides(args.overrides, ["train"], strip=True)
    _refuse_training_keys(args.overrides, AblationSweepConfig)
    cfg = stage_config_from_args(AblationSweepConfig, args, SHORTHANDS)
    try:
        cfg = dataclasses.replace(cfg, train_overrides=(*cfg.train_overrides, *train))
        validate_stage(cfg)
    except ConfigError as e:
        refuse(f"config error: {e}")
    try:  # the trials' base training config: its values and data.root, before Ray starts
        check_data_root(load_config(cfg.train_preset, cfg.train_overrides))
    except ConfigError as e:
        refuse(f"config error: the trials' training config (the {TRAIN}* overrides): {e}")

    with job_console(os.path.join(cfg.storage_path, cfg.name)):  # the console: results; the rest: the log
        return _sweep(cfg)


def _refuse_training_keys(overrides, cls) -> None:
    """A training key given without ``train.`` (``data.root=...``): one sentence naming the form that works."""
    from ideal_ray.config import TokenizerTrainConfig

    sweep = {f.name for f in dataclasses.fields(cls)}
    training = {f.name for f in dataclasses.fields(TokenizerTrainConfig)}
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if "=" in o and key.split(".")[0] not in sweep and key.split(".")[0] in training:
            refuse(f"config error: {key} is a setting of the trials' training config, not of the sweep; pass it as "
                   f"{TRAIN}{o}.")


def _sweep(cfg) -> int:
    from ideal_ray.tune.ablation import format_table, sweep_ablation

    with outcome("rerun the same command to resume (finished trials are kept)"):
        summary = sweep_ablation(cfg)
    say(format_table(summary))
    say(f"sweep {summary['path']}, MLflow {summary['tracking_uri']} (parent run {summary['parent_run_id']})")
    if summary["interrupted"]:
        say("interrupted: rerun the same command to resume (finished trials are kept)", err=True)
        return INTERRUPTED
    return 1 if any(t["error"] for t in summary["trials"]) else 0


if __name__ == "__main__":
    sys.exit(main())
