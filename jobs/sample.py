"""Sample class-conditional images from a trained GPT: a Ray actor pool over every GPU (default) or one process.

    python jobs/sample.py --preset tiny --gpt runs/ar-tiny/gpt_step600.pt \\
        --tokenizer runs/tiny/tokenizer_step600.pt --out runs/samples-tiny --mlflow      # local Ray cluster, CPU
    ray job submit --working-dir . -- python jobs/sample.py --gpt /shared/runs/ar-B/gpt.pt \\
        --tokenizer /shared/ideal.pt --out /shared/samples-B-cfg1.75     # 50 x 1000 images for FID, every GPU
    python jobs/sample.py ... --in-process run.device=cuda sample.cfg_scale=2.0     # one process, one device

The settings are a ``SampleJobConfig`` (``ideal_ray.config``): ``--preset paper`` (default: every GPU, 50 images
per class, batch 256) or ``tiny`` (the demo's: CPU, 8 per class), the flags below, then ``a.b=c`` overrides of any
field, e.g. ``sample.cfg_scale=2.0``, ``sample.cfg_interval=0.5,1``, ``sample.per_class=8``,
``sample.batch_size=64``, ``sample.temperature=0.9``, ``sample.top_k=100``, ``sample.seed=1``,
``sample.out_size=256``, ``classes=0,1,2`` (default: every class), ``run.device=cpu``, ``run.num_actors=2``,
``run.precision=fp32``, ``tracking_uri=sqlite:///runs/mlflow.db``.
Writes ``<out>/samples.npz`` (ADM format: ``arr_0`` uint8 (N, 256, 256, 3), ``labels``) and ``<out>/grid.png``
(rows = classes, the first 8 samples of each); refuses an --out that already holds them. Sample i of class c
always uses the same seed, so a (class, seed) pair gives the same image in any run. Prints a JSON summary.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ideal_ray.cli import add_stage_args, check_checkpoints, outcome, stage_config_from_args  # noqa: E402
from ideal_ray.console import job_console, say  # noqa: E402

SHORTHANDS = [
    ("--gpt", "gpt", "GPT: our export (gpt_step<N>.pt), a LlamaGen c2i file or the authors' release GPT checkpoint"),
    ("--tokenizer", "tokenizer", "tokenizer: our export (tokenizer_step<N>.pt) or the authors' release file"),
    ("--out", "out", "output folder of samples.npz and grid.png (must not hold them)"),
    ("--in-process", "run.in_process", "no Ray: sample in this process on run.device", {"action": "store_true"}),
    ("--mlflow", "tracking_uri", "log params, speed and the grid to MLflow ($MLFLOW_TRACKING_URI or "
     "<out>/mlflow.db)", {"action": "store_const", "const": "none", "metavar": None}),
]


def main(argv=None) -> int:
    import argparse

    from ideal_ray.config import SampleJobConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stage_args(parser, SampleJobConfig, SHORTHANDS)
    cfg = stage_config_from_args(SampleJobConfig, parser.parse_args(argv), SHORTHANDS)
    check_checkpoints(gpt=cfg.gpt, tokenizer=cfg.tokenizer, classes=list(cfg.classes) or None)  # before torch, Ray
    with job_console(cfg.out):  # the console: the image bar and the summary; the rest: <out>/console.log
        return _sample(cfg)


def _sample(cfg) -> int:
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    with outcome(f"nothing was written to {cfg.out} (samples are written at the end); run the same command again"):
        if cfg.run.in_process:
            from ideal_ray.pipelines.sample_local import sample_images

            summary = sample_images(cfg, log=log)
        else:
            from ideal_ray.pipelines.sample_ray import sample_images_ray

            summary = sample_images_ray(cfg, log=log)
    say(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
