"""Every stage in one job, resumable: tokenizer -> token extraction -> AR -> sampling -> evaluation -> CFG sweep.

    python jobs/pipeline.py --preset tiny                      # the demo's chain on a local Ray cluster (CPU)
    ray job submit --working-dir . -- python jobs/pipeline.py --preset paper --ar-preset ar-XXL \\
        --views llamagen --per-class 50 --cfg-scale 1.25 --reference /shared/refs/VIRTUAL_imagenet256_labeled.npz \\
        --fid-cache /shared/fid_refs --ar-set dist.num_workers=64 data.root=/shared/imagenet dist.num_workers=64 \\
        dist.use_gpu=true output_dir=/shared/runs name=ideal-paper

The run folder ``<output_dir>/<name>/`` holds ``pipeline.json`` (each finished stage's outputs and seconds, and every
invocation under ``runs`` with the Ray job it was, if any). Rerun the
same command to resume: finished stages are skipped, an interrupted one resumes from its own checkpoints / shards.
``--only STAGE`` runs one stage (the earlier ones must be done). Stages: tokenizer, extract, ar, sample, evaluate,
sweep (CFG scales ``--sweep-cfg-scales``, default 1.0 1.75 for tiny and the paper's 1.0..3.0 step 0.25 otherwise;
give the flag no values to leave the sweep out). Under ``ray job submit --working-dir`` every output path must be
absolute (on shared storage): relative ones would land in the job's temporary copy of the working dir.
Overrides (``a.b=c``) apply to the tokenizer config; ``--ar-set a.b=c`` to the AR config.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ideal_ray.cli import add_config_args, config_from_args  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, default_preset="tiny")
    parser.add_argument("--ar-preset", default=None, help="AR preset (default: ar-tiny for tiny, else ar-B)")
    parser.add_argument("--ar-set", action="append", default=[], metavar="KEY=VALUE", help="AR config override")
    parser.add_argument("--views", default=None, choices=["llamagen", "release"],
                        help="extraction views (default: release for tiny, llamagen otherwise)")
    parser.add_argument("--per-class", type=int, default=None, help="samples per class (default 8 tiny, 50 else)")
    parser.add_argument("--cfg-scale", type=float, default=1.75)
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
    cfg = config_from_args(args)

    from ideal_ray.cli import ray_job, require_durable_paths
    from ideal_ray.config import SampleConfig
    from ideal_ray.pipelines.pipeline import run_stages, tokenizer_to_eval_stages
    from ideal_ray.tracking import default_tracking_uri

    tiny = cfg.preset.split("+")[0] == "tiny"
    require_durable_paths(**{"--fid-cache": args.fid_cache, "--reference": args.reference})
    scales = args.sweep_cfg_scales
    if scales is None:
        scales = [1.0, 1.75] if tiny else [1.0 + 0.25 * i for i in range(9)]
    run_dir = os.path.join(os.path.abspath(cfg.output_dir), cfg.name)
    ar_overrides = ([f"model.num_classes={cfg.data.synthetic_classes}"] if tiny else []) + args.ar_set
    sample_cfg = SampleConfig(cfg_scale=args.cfg_scale, per_class=args.per_class or (8 if tiny else 50),
                              batch_size=40 if tiny else 256)
    stages = tokenizer_to_eval_stages(
        cfg, run_dir, ar_preset=args.ar_preset or ("ar-tiny" if tiny else "ar-B"), ar_overrides=ar_overrides,
        views=args.views or ("release" if tiny else "llamagen"), sample_cfg=sample_cfg,
        device=args.device or ("cpu" if tiny else "auto"), eval_images=args.eval_images,
        probe_train_images=args.probe_train_images, sweep_cfg_scales=scales,
        sweep_per_class=args.sweep_per_class or (4 if tiny else 50), reference=args.reference,
        fid_cache=args.fid_cache, tracking_uri=default_tracking_uri(run_dir))
    try:
        state = run_stages(run_dir, stages, only=args.only, meta={"ray_job": ray_job(), "argv": sys.argv[1:]})
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({name: dict(rec["outputs"], seconds=rec["seconds"], skipped=rec["skipped"])
                      for name, rec in state["stages"].items()}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
