"""The demo, end to end at tiny scale on a local Ray cluster (2 CPU workers), everything tracked in MLflow:

1. synthetic ImageNet-layout set -> tiny Ideal tokenizer on Ray Train + DeepSpeed -> reconstruction PSNR and codebook
   usage of the trained model against an untrained one;
2. token extraction on Ray Data (center + flip views; CPU decode actors -> encoder actor pool -> Parquet shards)
   -> tiny class-conditional GPT on Ray Train + DeepSpeed -> a
   class-conditional sample grid (PNG + ADM-format npz), logged to MLflow;
3. the evaluation table (pinned protocol), then a tiny CFG sweep on Ray Tune (one MLflow child run per CFG scale)
   and its comparison table.

    python jobs/demo.py                       # both parts (a few minutes on 2 cores)
    python jobs/demo.py --tokenizer-only      # part 1 only
    python jobs/demo.py --in-process          # part 1 in this process, no Ray (the same stage, loop and export)
    python jobs/demo.py --in-process dist.engine=torch   # ... on plain torch AdamW: the quick CPU option
    python jobs/demo.py schedule.steps=100    # a.b=c overrides of the tokenizer config
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ideal_ray.checkpoint import unique_dir  # noqa: E402
from ideal_ray.cli import add_config_args, config_from_args  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, default_preset="tiny")
    parser.add_argument("--in-process", action="store_true",
                        help="part 1 only, trained in this process (no Ray): one rank of the same stage and loop, "
                             "checkpoints, MLflow and export (dist.use_gpu=true for a GPU, dist.engine=torch for "
                             "plain torch AdamW)")
    parser.add_argument("--tokenizer-only", action="store_true", help="stop after the tokenizer (part 1)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, in_process=args.in_process)
    # a fresh run folder each time: a demo never resumes or overwrites an earlier one
    run_dir = unique_dir(os.path.join(cfg.output_dir, cfg.name))
    cfg.name = os.path.basename(run_dir)
    # one MLflow database for the whole demo (tokenizer, AR and sampling runs), unless the user points elsewhere
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{os.path.abspath(run_dir)}/mlflow.db")

    before, after, export = _tokenizer_demo(cfg, in_process=args.in_process)
    better = after["psnr"] > before["psnr"] and after["usage"] >= before["usage"]
    print(f"[ideal-ray] trained tokenizer beats the untrained one: {'yes' if better else 'NO'}")
    if not better:
        return 1
    if not (args.in_process or args.tokenizer_only):
        samples, gpt = _ar_demo(cfg, export)
        _eval_demo(cfg, export, samples)
        _sweep_demo(cfg, export, gpt)
    return 0


def _tokenizer_demo(cfg, in_process: bool):
    """Part 1: train the tokenizer (Ray Train, or this process), then PSNR / usage on the val split of the untrained
    model and of the export (EMA weights)."""
    import torch
    from torch.utils.data import DataLoader

    from ideal_ray.checkpoint import load_tokenizer
    from ideal_ray.config import ConfigError
    from ideal_ray.data.folder import ImageFolderDataset
    from ideal_ray.data.transforms import eval_transform
    from ideal_ray.models.tokenizer import IdealTokenizer
    from ideal_ray.train.ray_trainer import train_tokenizer
    from ideal_ray.train.tokenizer_step import evaluate_reconstruction

    try:
        result = train_tokenizer(cfg, in_process=in_process)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    d = cfg.data
    val_loader = DataLoader(ImageFolderDataset(d.root, "val", eval_transform(d.image_size), class_index=d.class_index),
                            batch_size=d.global_batch)
    torch.manual_seed(cfg.optim.seed)  # the trained run's initial weights
    before = evaluate_reconstruction(IdealTokenizer(cfg.model), val_loader)
    after = evaluate_reconstruction(load_tokenizer(result["export"]), val_loader)
    print(f"[ideal-ray] {'':14s} {'PSNR (dB)':>10s} {'usage':>8s} {'entropy':>8s}")
    for name, r in (("untrained", before), ("trained (EMA)", after)):
        print(f"[ideal-ray] {name:14s} {r['psnr']:10.2f} {r['usage']:8.1%} {r['entropy']:8.2f}")
    print(f"[ideal-ray] checkpoints and MLflow run: {result['run_path']} ({result['tracking_uri']})\n"
          f"[ideal-ray] inference export: {result['export']}\n"
          f"[ideal-ray] compare runs: mlflow ui --backend-store-uri {result['tracking_uri']}")
    return before, after, result["export"]


def _ar_demo(tok_cfg, tokenizer_export: str) -> tuple:
    """Part 2: codes of the synthetic set -> tiny GPT on Ray -> a class-conditional sample grid in MLflow."""
    from ideal_ray.config import SampleConfig, load_ar_config
    from ideal_ray.pipelines.extract_ray import extract_tokens_ray
    from ideal_ray.pipelines.sample_ray import sample_images_ray
    from ideal_ray.tracking import default_tracking_uri
    from ideal_ray.train.ar_stage import train_ar

    run_dir = os.path.join(os.path.abspath(tok_cfg.output_dir), tok_cfg.name)
    shards = os.path.join(run_dir, "tokens")
    tracking_uri = default_tracking_uri(run_dir)
    summary = extract_tokens_ray(tokenizer_export, tok_cfg.data.root, shards, views="release", batch_size=64,
                                 device="cpu", num_encoders=1, decode_actors=2, tracking_uri=tracking_uri)
    print(f"[ideal-ray] token shards (Ray Data actor pools): {summary['rows']} rows ({summary['images']} images x 2 "
          f"views, {len(summary['skipped'])} undecodable files skipped) in {shards}, "
          f"{summary['images_per_s']:.1f} images/s")
    ar_cfg = load_ar_config("ar-tiny", [f"data.shards={shards}", f"model.num_classes={tok_cfg.data.synthetic_classes}",
                                        f"model.vocab_size={tok_cfg.model.quantizer.codebook_size}",
                                        f"model.grid={tok_cfg.model.vfm.grid}", f"name={tok_cfg.name}-ar",
                                        f"output_dir={tok_cfg.output_dir}"])
    ar = train_ar(ar_cfg, tracking_uri=tracking_uri)  # the demo's one MLflow database
    samples = sample_images_ray(ar["export"], tokenizer_export, SampleConfig(cfg_scale=1.75, per_class=8, batch_size=40),
                                None, os.path.join(run_dir, "samples"), device="cpu", num_samplers=1,
                                tracking_uri=tracking_uri, log=lambda line: None)
    print(f"[ideal-ray] class-conditional samples (one row per class): {samples['grid']}\n"
          f"[ideal-ray] ADM-format npz: {samples['samples']} ({samples['images_per_s']:.1f} images/s); "
          f"MLflow experiment 'ideal-sample' at {tracking_uri}")
    return samples["samples"], ar["export"]


def _eval_demo(tok_cfg, tokenizer_export: str, samples_npz: str) -> None:
    """Part 3: the pinned evaluation protocol on the tiny run -> one table, each row with its protocol line."""
    from ideal_ray.pipelines.evaluate import evaluate_gen, evaluate_recon, protocol_line
    from ideal_ray.tracking import default_tracking_uri

    run_dir = os.path.join(os.path.abspath(tok_cfg.output_dir), tok_cfg.name)
    uri = default_tracking_uri(run_dir)
    quiet = lambda line: None  # noqa: E731
    rec = evaluate_recon(tokenizer_export, tok_cfg.data.root, os.path.join(run_dir, "eval-recon"), split="val",
                         device="cpu", num_actors=1, decode_actors=2, probe_train_images=160, tracking_uri=uri,
                         log_fn=quiet)
    gen = evaluate_gen(samples_npz, os.path.join(tok_cfg.data.root, "val"), os.path.join(run_dir, "eval-gen"),
                       tracking_uri=uri, log_fn=quiet)
    is_text = f"{gen['is']:.2f}" if "is" in gen else "n/a (no Inception logits)"
    print("[ideal-ray] evaluation of the tiny run (MLflow experiment 'ideal-eval'):")
    print("| what | value | protocol |\n|---|---|---|")
    print(f"| rFID | {rec['rfid']:.2f} | {protocol_line(rec)} |")
    print(f"| PSNR / SSIM | {rec['psnr']:.2f} dB / {rec['ssim']:.3f} | {rec['n']} val images: ADM center crop to "
          f"{tok_cfg.model.image_size}, both resized to 256 (PIL bicubic), per-image mean |")
    print(f"| codebook usage / entropy | {rec['usage']:.1%} / {rec['entropy']:.2f} nats | codes of the {rec['n']} "
          f"val images |")
    print(f"| gFID / IS | {gen['gfid']:.2f} / {is_text} | {protocol_line(gen)} |")
    print(f"| zero-shot top-1 / top-5 (reconstructed) | {rec['zeroshot_recon_top1']:.1%} / "
          f"{rec['zeroshot_recon_top5']:.1%} | MAP head of the decoded deep features vs the text tower (random "
          f"tiny towers: chance level expected) |")
    print(f"| zero-shot top-1 / top-5 (frozen VFM) | {rec['zeroshot_vfm_top1']:.1%} / "
          f"{rec['zeroshot_vfm_top5']:.1%} | the same head on the frozen VFM's own deep features |")
    print(f"| linear probe top-1 (reconstructed / frozen VFM) | {rec['probe_recon_top1']:.1%} / "
          f"{rec['probe_vfm_top1']:.1%} | logistic regression on MAP-pooled deep features of 160 train images, "
          f"scored on the {rec['n']} val images |")


def _sweep_demo(tok_cfg, tokenizer_export: str, gpt_export: str) -> None:
    """Part 4: a tiny CFG sweep on Ray Tune (2 scales, CPU trials, the val folder as reference) -> its comparison
    table, read back from the sweep's MLflow child runs."""
    import contextlib

    from ideal_ray.tracking import default_tracking_uri
    from ideal_ray.tune.cfg_sweep import sweep_cfg
    from ideal_ray.tune.compare import compare_runs

    run_dir = os.path.join(os.path.abspath(tok_cfg.output_dir), tok_cfg.name)
    uri = default_tracking_uri(run_dir)
    with contextlib.redirect_stdout(sys.stderr):  # Tune's progress lines; the table below is what the demo shows
        sweep = sweep_cfg(gpt_export, tokenizer_export, os.path.join(tok_cfg.data.root, "val"), "cfg",
                          os.path.join(run_dir, "sweeps"), [1.0, 1.75], per_class=4, batch_size=40,
                          gpus_per_trial=0, tracking_uri=uri, verbose=0, log=lambda line: None)
    table = compare_runs(uri, os.path.join(sweep["path"], "compare"), parent_run_id=sweep["parent_run_id"],
                         metrics=["gfid", "sfid", "precision", "recall", "images_per_s"], sort_by="gfid")
    print(f"[ideal-ray] CFG sweep on Ray Tune: {table['rows']} trials = MLflow child runs of parent "
          f"{sweep['parent_run_id']} (jobs/compare.py --sweep {sweep['path']}):")
    print(table["markdown"], end="")
    if len({r.metrics.get("gfid") for r in table["table"].rows}) == 1:
        print("[ideal-ray] every scale gave the same gFID: after the demo's few steps the tiny GPT's logits barely "
              "depend on the class, so guidance changes no sampled token (a trained GPT's gFID moves with the scale)")
    elif sweep["best"] is not None:
        print(f"[ideal-ray] best CFG scale by gFID: {sweep['best']['config']['cfg_scale']}")
    print(f"[ideal-ray] sweep report (table, FID-vs-CFG plot, best.json): {os.path.join(sweep['path'], 'report')}")


if __name__ == "__main__":
    sys.exit(main())
