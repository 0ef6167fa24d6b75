"""Every stage in one job, resumable: tokenizer -> token extraction -> AR -> sampling -> evaluation -> CFG sweep.

    python jobs/pipeline.py --preset tiny                      # what `make demo` runs, on a local Ray cluster (CPU)
    ray job submit --working-dir . -- python jobs/pipeline.py --preset paper --ar-preset ar-XXL \\
        --views llamagen --per-class 50 --cfg-scale 1.25 --reference /shared/refs/VIRTUAL_imagenet256_labeled.npz \\
        --fid-cache /shared/fid_refs --ar-set dist.num_workers=64 data.root=/shared/imagenet dist.num_workers=64 \\
        dist.use_gpu=true output_dir=/shared/runs name=ideal-paper

The run folder ``<output_dir>/<name>/`` holds ``pipeline.json`` (each finished stage's outputs and seconds, and every
invocation under ``runs`` with the Ray job it was, if any). The job ends with one table: per stage its seconds, its
headline numbers and where its artifacts are (``pipeline.pipeline_report``). Rerun the
same command to resume: finished stages are skipped, an interrupted one resumes from its own checkpoints / shards.
``--only STAGE`` runs one stage (the earlier ones must be done). Stages: tokenizer, extract, ar, sample, evaluate,
sweep (CFG scales ``--sweep-cfg-scales``, default 1.0 1.75 for tiny and the paper's 1.0..3.0 step 0.25 otherwise;
give the flag no values to leave the sweep out). Under ``ray job submit --working-dir`` every output path must be
absolute (on shared storage): relative ones would land in the job's temporary copy of the working dir.
Overrides (``a.b=c``) apply to the tokenizer config; ``--ar-set a.b=c`` to the AR config.
"""
import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ideal_ray.cli import add_config_args, config_from_args  # noqa: E402
from ideal_ray.console import job_console, say  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, default_preset="tiny")
    parser.add_argument("--ar-preset", default=None, help="AR preset (default: ar-tiny for tiny, else ar-B)")
    parser.add_argument("--ar-set", action="append", default=[], metavar="KEY=VALUE", help="AR config override")
    parser.add_argument("--views", default=None, choices=["llamagen", "release"],
                        help="extraction views (default: release for tiny, llamagen otherwise)")
    parser.add_argument("--per-class", type=int, default=None, help="samples per class (default 8 tiny, 50 else)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="CFG scale of the samples (default 1.75)")
    parser.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                        help="extraction/sampling/evaluation actors (default: cpu for tiny, auto otherwise)")
    parser.add_argument("--eval-images", type=int, default=None, help="val images for the reconstruction metrics")
    parser.add_argument("--probe-train-images", type=int, default=0)
    parser.add_argument("--reference", default=None,
                        help="FID reference: ADM's VIRTUAL_imagenet256_labeled.npz or an image folder "
                             "(default: <data.root>/val)")
    parser.add_argument("--fid-cache", default=None, help="reference statistics cache (default <run>/fid_refs)")
    parser.add_argument("--sweep-cfg-scales", type=float, nargs="*", default=None, metavar="S",
                        help="CFG scales of the sweep stage (no values: no sweep stage)")
    parser.add_argument("--sweep-per-class", type=int, default=None, help="images per class per sweep trial "
                                                                          "(default 4 tiny, 50 else)")
    parser.add_argument("--only", action="append", default=None, help="run only this stage (repeatable)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, needs_data=True)

    from ideal_ray.cli import outcome, ray_job, require_durable_paths
    from ideal_ray.pipeline import pipeline_defaults, pipeline_report, run_pipeline

    require_durable_paths(**{"--fid-cache": args.fid_cache, "--reference": args.reference})
    settings = pipeline_defaults(cfg)  # the tiny-vs-paper choices; the flags given replace them
    settings["ar_overrides"] += args.ar_set
    sample = settings["sample_cfg"]
    settings["sample_cfg"] = dataclasses.replace(
        sample, cfg_scale=sample.cfg_scale if args.cfg_scale is None else args.cfg_scale,
        per_class=args.per_class or sample.per_class)
    settings.update({key: getattr(args, key) for key in ("ar_preset", "views", "device", "sweep_cfg_scales",
                                                         "sweep_per_class") if getattr(args, key) is not None})
    settings.update(eval_images=args.eval_images, probe_train_images=args.probe_train_images,
                    reference=args.reference, fid_cache=args.fid_cache)
    resume = "rerun the same command: finished stages are kept and skipped, the current one resumes"
    with job_console(os.path.join(cfg.output_dir, cfg.name)), outcome(resume):  # console: stage lines; log: the rest
        state, tracking_uri = run_pipeline(cfg, settings, only=args.only,
                                           meta={"ray_job": ray_job(), "argv": sys.argv[1:]})
        say(pipeline_report(state, tracking_uri))
    return 0


if __name__ == "__main__":
    sys.exit(main())
