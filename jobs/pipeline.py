"""Every stage in one job, resumable: tokenizer -> token extraction -> AR -> sampling -> evaluation -> CFG sweep.

    python jobs/pipeline.py --preset tiny                      # what `make demo` runs, on a local Ray cluster (CPU)
    ray job submit --working-dir . -- python jobs/pipeline.py --preset paper ar_preset=ar-XXL \\
        extract.views=llamagen sampling.sample.cfg_scale=1.25 \\
        gen.reference=/shared/refs/VIRTUAL_imagenet256_labeled.npz gen.fid.cache_dir=/shared/fid_refs \\
        ar.dist.num_workers=64 data.root=/shared/imagenet dist.num_workers=64 dist.use_gpu=true \\
        output_dir=/shared/runs name=ideal-paper

Settings: ``--preset`` is the tokenizer preset (``tiny``, ``paper``, ``paper+fusion-none`` ...); every other stage
takes the ``PipelineConfig`` preset of its scale (``tiny``: the demo's CPU run; otherwise ``paper``). Overrides go
by their first key: ``extract.*``, ``sampling.*``, ``recon.*``, ``gen.*``, ``sweep.*`` and ``ar_preset`` to that
stage's config (``ideal_ray.config``: ExtractConfig, SampleJobConfig, ReconEvalConfig, GenEvalConfig,
CfgSweepConfig), ``ar.*`` to the AR config, everything else to the tokenizer config. ``sweep.cfg_scales=`` (no
values) leaves the sweep stage out.

The run folder ``<output_dir>/<name>/`` holds ``pipeline.json`` (each finished stage's outputs and seconds, and every
invocation under ``runs`` with the Ray job it was, if any). The job ends with one table: per stage its seconds, its
headline numbers and where its artifacts are (``pipeline.pipeline_report``). Rerun the same command to resume:
finished stages are skipped, an interrupted one resumes from its own checkpoints / shards. ``--only STAGE`` runs one
stage (the earlier ones must be done). Stages: tokenizer, extract, ar, sample, evaluate, sweep. Under
``ray job submit --working-dir`` every output path must be absolute (on shared storage): relative ones would land
in the job's temporary copy of the working dir.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ideal_ray.cli import add_config_args, config_from_args, refuse, take_overrides  # noqa: E402
from ideal_ray.console import job_console, say  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, default_preset="tiny")
    parser.add_argument("--only", action="append", default=None, help="run only this stage (repeatable)")
    args = parser.parse_args(argv)
    from ideal_ray.config import PIPELINE_STAGES, ConfigError

    ar_overrides, rest = take_overrides(args.overrides, ["ar"], strip=True)  # the AR config's
    chain_overrides, args.overrides = take_overrides(rest, ["ar_preset", *PIPELINE_STAGES])  # the rest: tokenizer's
    cfg = config_from_args(args, needs_data=True)

    from ideal_ray.cli import outcome, ray_job, require_durable_paths
    from ideal_ray.pipeline import pipeline_config, pipeline_report, run_pipeline

    try:
        pcfg = pipeline_config(cfg, chain_overrides)
        pcfg.ar_overrides = (*pcfg.ar_overrides, *ar_overrides)  # (values of their own may hold commas)
    except ConfigError as e:
        refuse(f"config error: {e}")
    require_durable_paths(**{"gen.fid.cache_dir": pcfg.gen.fid.cache_dir, "gen.reference": pcfg.gen.reference})
    resume = "rerun the same command: finished stages are kept and skipped, the current one resumes"
    with job_console(os.path.join(cfg.output_dir, cfg.name)), outcome(resume):  # console: stage lines; log: the rest
        state, tracking_uri = run_pipeline(cfg, pcfg, only=args.only,
                                           meta={"ray_job": ray_job(), "argv": sys.argv[1:]})
        say(pipeline_report(state, tracking_uri))
    return 0


if __name__ == "__main__":
    sys.exit(main())
