"""The tokenizer stage in one process (no Ray): the demo and quick experiments on a laptop.

``train_tokenizer_local(cfg)`` makes the synthetic set when ``data.root`` does not exist and the preset is ``tiny``,
measures an untrained model, trains with :class:`~ideal_ray.train.tokenizer_step.LocalTrainer`, measures again
(raw and EMA weights), and writes a single-file inference checkpoint and a reconstruction grid under
``output_dir/name``.
"""
from __future__ import annotations

import copy
import os
import time
from typing import Callable, Dict, Optional

import torch
from torch.utils.data import DataLoader

from ideal_ray.checkpoint import save_inference_checkpoint
from ideal_ray.config import TokenizerTrainConfig
from ideal_ray.data.folder import ImageFolderDataset
from ideal_ray.data.synthetic import make_synthetic_imagenet
from ideal_ray.data.transforms import eval_transform, make_grid_png, train_transform
from ideal_ray.train.tokenizer_step import (LocalTrainer, Throughput, evaluate_reconstruction, infinite,
                                            metrics_to_floats)


def ensure_dataset(cfg: TokenizerTrainConfig) -> str:
    """Return the data root; generate the synthetic set there when it is missing (synthetic roots only)."""
    d = cfg.data
    if not os.path.isdir(os.path.join(d.root, "train")):
        if cfg.preset.split("+")[0] != "tiny":
            raise FileNotFoundError(f"No ImageNet-layout folder at data.root={d.root} (expected {d.root}/train/<wnid>/"
                                    f"*.JPEG); point data.root at your ImageNet copy.")
        make_synthetic_imagenet(d.root, num_classes=d.synthetic_classes, train_per_class=d.synthetic_train_per_class,
                                val_per_class=d.synthetic_val_per_class, size=d.synthetic_size, seed=cfg.optim.seed)
    return d.root


def loaders(cfg: TokenizerTrainConfig):
    d = cfg.data
    train = ImageFolderDataset(d.root, "train", train_transform(d.image_size, d.resize_min, d.resize_max,
                                                                d.hflip_prob), class_index=d.class_index)
    val = ImageFolderDataset(d.root, "val", eval_transform(d.image_size), class_index=d.class_index)
    g = torch.Generator().manual_seed(cfg.optim.seed)
    train_loader = DataLoader(train, batch_size=d.global_batch, shuffle=True, drop_last=True, generator=g,
                              num_workers=d.loader_workers, persistent_workers=d.loader_workers > 0)
    val_loader = DataLoader(val, batch_size=d.global_batch, shuffle=False, num_workers=d.loader_workers)
    return train_loader, val_loader


def _one_per_class(dataset: ImageFolderDataset, n: int) -> torch.Tensor:
    """Up to ``n`` validation images from different classes, for the reconstruction grid."""
    picked, seen = [], set()
    for i, (_, label) in enumerate(dataset.samples):
        if label not in seen:
            seen.add(label)
            picked.append(dataset[i][0])
        if len(picked) == n:
            break
    return torch.stack(picked)


def train_tokenizer_local(cfg: TokenizerTrainConfig, device: Optional[str] = None,
                          log: Callable[[str], None] = print) -> Dict[str, object]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ensure_dataset(cfg)
    train_loader, val_loader = loaders(cfg)
    trainer = LocalTrainer(cfg, device=device)
    tok = trainer.system.tokenizer
    total = trainer.total_steps
    log(f"[ideal-ray] preset={cfg.preset} device={device} steps={total} batch={cfg.data.global_batch} "
        f"train_images={len(train_loader.dataset)} val_images={len(val_loader.dataset)}")

    before = evaluate_reconstruction(tok, val_loader, device)
    log(f"[ideal-ray] untrained: PSNR {before['psnr']:.2f} dB, codebook usage {before['usage']:.1%}")

    tput = Throughput()
    t_start = time.perf_counter()
    batches = infinite(train_loader)
    last: Dict[str, float] = {}
    while trainer.step < total:
        images, _ = next(batches)
        metrics = trainer.train_step(images)
        tput.add(images.shape[0])
        if trainer.step % cfg.schedule.log_every == 0 or trainer.step == total:
            last = metrics_to_floats(metrics)
            log(f"[ideal-ray] step {trainer.step}/{total} g_loss {last['g_loss']:.4f} "
                f"mse {last['rec_mse']:.4f} deep_cos {last['deep_cos']:.3f} "
                f"usage {tok.quantizer.usage():.1%} lr {last['lr']:.2e} {tput.rate():.1f} img/s")
    train_s = time.perf_counter() - t_start

    after = evaluate_reconstruction(tok, val_loader, device)
    ema_tok = copy.deepcopy(tok)
    trainer.ema.copy_to(ema_tok)
    after_ema = evaluate_reconstruction(ema_tok, val_loader, device)

    out_dir = os.path.join(cfg.output_dir, cfg.name)
    os.makedirs(out_dir, exist_ok=True)
    ckpt = save_inference_checkpoint(os.path.join(out_dir, "tokenizer.pt"), ema_tok, cfg, step=trainer.step)
    images = _one_per_class(val_loader.dataset, 8)
    with torch.no_grad():
        ema_tok.eval()
        recon = ema_tok.decode(ema_tok.encode(images.to(device))).cpu()
    grid = make_grid_png(images, recon, os.path.join(out_dir, "reconstructions.png"), nrow=4)
    log(f"[ideal-ray] trained {trainer.step} steps in {train_s:.0f} s")
    log(f"[ideal-ray] {'':14s} {'PSNR (dB)':>10s} {'usage':>8s} {'entropy':>8s}")
    for name, r in (("untrained", before), ("trained", after), ("trained (EMA)", after_ema)):
        log(f"[ideal-ray] {name:14s} {r['psnr']:10.2f} {r['usage']:8.1%} {r['entropy']:8.2f}")
    log(f"[ideal-ray] checkpoint: {ckpt}\n[ideal-ray] reconstructions (each input beside its output): {grid}")
    return {"before": before, "after": after, "after_ema": after_ema, "checkpoint": ckpt, "grid": grid,
            "train_seconds": train_s, "last_metrics": last, "steps": trainer.step}
