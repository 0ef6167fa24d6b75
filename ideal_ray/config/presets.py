"""Named presets (``tiny``, ``paper``, ``ar-B`` ...) and ablation variants (``paper+fusion-none``): built by
:func:`load_config` / :func:`load_ar_config` with ``a.b=c`` overrides on top, then validated; and where a preset's
training images come from (:func:`check_data_root`)."""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Sequence, Tuple, Type, TypeVar

from ideal_ray.config.overrides import apply_overrides
from ideal_ray.config.schema import (AblationSweepConfig, ARTrainConfig, CfgSweepConfig, ConfigError, DataConfig,
                                     DiscriminatorConfig, DistributedConfig, ExtractConfig, FeatureDecoderConfig,
                                     FusionConfig, GenEvalConfig, GPTConfig, GPT_SIZES, LossConfig, OptimConfig,
                                     PipelineConfig, PixelDecoderConfig, QuantizerConfig, ReconEvalConfig,
                                     SampleJobConfig,
                                     ScheduleConfig, TokenizerConfig, TokenizerTrainConfig, VFMConfig)
from ideal_ray.config.validation import validate, validate_ar, validate_stage
from ideal_ray.storage import is_uri


def gpt_config(size: str, **overrides: Any) -> GPTConfig:
    """A GPT preset by name (B, L, XXL, 3B, tiny), optionally with field overrides."""
    if size not in GPT_SIZES:
        raise ConfigError(f"Unknown GPT size '{size}'; choose one of {sorted(GPT_SIZES)}.")
    fields = dict(GPT_SIZES[size], size=size)
    if size == "tiny":
        fields.update(vocab_size=256, num_classes=10, grid=8, multiple_of=32)
    fields.update(overrides)
    return GPTConfig(**fields)


def ar_preset(size: str) -> ARTrainConfig:
    """Spec section 7: global batch B/L 512, XXL 256, 3B 128; epochs B/L 300, XXL/3B 200; ZeRO-1 for B/L and
    ZeRO-2 for XXL/3B (architecture.md: an H200 never needs ZeRO-3 for these sizes)."""
    batch = {"B": 512, "L": 512, "XXL": 256, "3B": 128, "tiny": 8}[size]
    epochs = {"B": 300.0, "L": 300.0, "XXL": 200.0, "3B": 200.0, "tiny": 10.0}[size]
    cfg = ARTrainConfig(preset=f"ar-{size}", name=f"ideal-ar-{size}", model=gpt_config(size))
    cfg.data.global_batch = batch
    cfg.optim.epochs = epochs
    cfg.dist.zero_stage = 2 if size in ("XXL", "3B") else 1
    if size == "tiny":
        # The demo's GPT must learn the synthetic classes in ~50 s of CPU steps: twice the width (128: 0.47M
        # parameters, ~55 ms per micro-batch of 16 on one core), batch 32, 600 steps (300 left the shapes scattered:
        # 74% class accuracy at CFG 1.75, 86% with 600), and an EMA that follows the weights at that horizon (the
        # paper's 0.9999 would export weights ~94% at their random init after 600 steps).
        cfg.model.dim = 128
        cfg.data.global_batch = 32
        cfg.optim.lr = 1e-3
        cfg.optim.ema_decay = 0.99
        cfg.data.shards = "data/tokens-tiny"
        cfg.schedule = ScheduleConfig(steps=600, log_every=25, ckpt_every=300, vis_every=10**9)
        cfg.dist = DistributedConfig(num_workers=2, use_gpu=False, cpus_per_worker=1.0, zero_stage=1)
    return cfg


AR_PRESETS: Dict[str, Callable[[], ARTrainConfig]] = {
    f"ar-{s}": (lambda s=s: ar_preset(s)) for s in ("B", "L", "XXL", "3B", "tiny")}


def load_ar_config(preset: str = "ar-tiny", overrides: Sequence[str] = ()) -> ARTrainConfig:
    """An AR preset (ar-B, ar-L, ar-XXL, ar-3B, ar-tiny) with ``a.b=c`` overrides, validated."""
    if preset not in AR_PRESETS:
        raise ConfigError(f"Unknown AR preset '{preset}'; choose one of {sorted(AR_PRESETS)}.")
    cfg = apply_overrides(AR_PRESETS[preset](), overrides)
    validate_ar(cfg)
    return cfg


# ------------------------------------------------------------------------------------------- presets
def paper() -> TokenizerTrainConfig:
    return TokenizerTrainConfig(preset="paper")


def tiny() -> TokenizerTrainConfig:
    """Real architecture code with tiny widths: runs in seconds on a CPU, random weights, no downloads.

    32 px images as an 8x8 grid of 4 px patches (256 codes), 600 steps of 8 images: about a minute on 2 CPU cores, and
    enough for reconstructions whose class a classifier trained on real images gets right ~96% of the time (at 64 px
    and 300 steps, ~72%: the demo's GPT then had nothing recognizable to learn)."""
    cfg = TokenizerTrainConfig(preset="tiny", name="ideal-tokenizer-tiny")
    cfg.model = TokenizerConfig(
        vfm=VFMConfig(
            backbone="tiny",
            model_name="ideal-tiny-vit",  # registered open_clip config (see models/vfm.py)
            pretrained="",
            image_size=32,
            patch_size=4,
            width=64,
            depth=4,
            heads=4,
            shallow_layer=2,
            deep_layer=4,
        ),
        fusion=FusionConfig(heads=4),
        quantizer=QuantizerConfig(codebook_size=256, dim=8, usage_window=4096),
        feature_decoder=FeatureDecoderConfig(width=64, depth=2, heads=4, mlp_dim=128),
        pixel_decoder=PixelDecoderConfig(base_channels=32, ch_mult=(1, 2, 2), num_res_blocks=1),
        image_size=32,
    )
    cfg.discriminator = DiscriminatorConfig(
        model_name="ideal_tiny_dino",  # registered timm model (see models/discriminator.py)
        pretrained=False,
        image_size=32,
        patch_size=8,
        width=64,
        depth=4,
        heads=4,
        tap_blocks=(0, 1, 2, 3),
    )
    # No discriminator: the paper starts it after 20k of ~250k steps, and before that its step only costs time (on 2
    # CPU cores it doubles the tiny step). loss.use_discriminator=true turns it on from step 100.
    cfg.loss = LossConfig(lpips_net="alex", lpips_pretrained=False, use_discriminator=False, disc_start=100)
    cfg.optim = OptimConfig(lr=1e-3, base_batch=8, warmup_epochs=0.5, epochs=15, min_lr=1e-4,
                            warmup_start_lr=1e-4, ema_decay=0.99, precision="fp32", seed=0)
    cfg.data = DataConfig(root="data/synthetic", image_size=32, resize_min=32, resize_max=40,
                          global_batch=8, loader_workers=0, synthetic_classes=10,
                          synthetic_train_per_class=32, synthetic_val_per_class=8, synthetic_size=96)
    cfg.schedule = ScheduleConfig(steps=600, steps_per_epoch=40, log_every=25, ckpt_every=200, vis_every=200)
    cfg.dist = DistributedConfig(num_workers=2, use_gpu=False, cpus_per_worker=1.0, zero_stage=1)
    return cfg


PRESETS: Dict[str, Callable[[], TokenizerTrainConfig]] = {"paper": paper, "tiny": tiny}

# Ablation variants (paper Tables 1 and 7): override bundles applied on top of a base preset,
# named as "<base>+<variant>", e.g. "paper+fusion-linear" or "tiny+layer-probe".
_DINO_COMMON = ["model.vfm.mean=0.485,0.456,0.406", "model.vfm.std=0.229,0.224,0.225",
                "model.vfm.width=1024", "model.vfm.depth=24", "model.vfm.pretrained=default"]
ABLATIONS: Dict[str, List[str]] = {
    "fusion-attention": ["model.fusion.mode=attention"],
    "fusion-linear": ["model.fusion.mode=linear"],
    "fusion-none": ["model.fusion.mode=none"],
    "shallow-align-on": ["loss.shallow_align=true"],
    "shallow-align-off": ["loss.shallow_align=false"],
    # DINOv2 ViT-L/14 at 336 px and DINOv3 ViT-L/16 at 384 px both give 24 x 24 = 576 tokens.
    "backbone-siglip2": [],
    "backbone-dinov2": ["model.vfm.backbone=dinov2", "model.vfm.model_name=vit_large_patch14_dinov2.lvd142m",
                        "model.vfm.image_size=336", "model.vfm.patch_size=14"] + _DINO_COMMON,
    "backbone-dinov3": ["model.vfm.backbone=dinov3", "model.vfm.model_name=vit_large_patch16_dinov3.lvd1689m",
                        "model.vfm.image_size=384", "model.vfm.patch_size=16"] + _DINO_COMMON,
    # Single-layer tokenization for the layer probe: add model.vfm.deep_layer=L (paper: 8/12/16/20/24).
    "layer-probe": ["model.vfm.single_layer=true", "model.fusion.mode=none", "loss.shallow_align=false"],
}
for _layer in (8, 12, 16, 20, 24):
    ABLATIONS[f"layer-{_layer}"] = ABLATIONS["layer-probe"] + [f"model.vfm.deep_layer={_layer}"]


# Variants that make sense at tiny scale (the backbone and layer-number variants name paper-scale networks).
TINY_ABLATIONS = ("fusion-attention", "fusion-linear", "fusion-none", "shallow-align-on", "shallow-align-off",
                  "layer-probe")


def preset_names() -> List[str]:
    """Every meaningful preset name: the bases, paper with each variant, tiny with its tiny-scale variants."""
    return (list(PRESETS) + [f"paper+{a}" for a in ABLATIONS if a != "layer-probe"]
            + [f"tiny+{a}" for a in TINY_ABLATIONS])


def load_config(preset: str = "tiny", overrides: Sequence[str] = ()) -> TokenizerTrainConfig:
    """Build a preset (``base`` or ``base+variant[+variant]``), apply ``a.b=c`` overrides, validate."""
    base, *variants = preset.split("+")
    if base not in PRESETS:
        raise ConfigError(f"Unknown preset '{base}'; choose one of {sorted(PRESETS)}.")
    cfg = PRESETS[base]()
    for v in variants:
        if v not in ABLATIONS:
            raise ConfigError(f"Unknown ablation variant '{v}'; choose one of {sorted(ABLATIONS)}.")
        cfg = apply_overrides(cfg, ABLATIONS[v])
    cfg.preset = preset
    cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


# The paper's ablation studies (Table 7a-c, Table 1) as lists of ABLATIONS variants.
STUDIES: Dict[str, Tuple[str, ...]] = {
    "fusion": ("fusion-attention", "fusion-linear", "fusion-none"),  # Table 7a
    "shallow-align": ("shallow-align-on", "shallow-align-off"),  # Table 7b
    "backbone": ("backbone-siglip2", "backbone-dinov2", "backbone-dinov3"),  # Table 7c
    "layer": tuple(f"layer-{n}" for n in (8, 12, 16, 20, 24)),  # Table 1
}


# ------------------------------------------------------------------------------ the offline stages' presets
# Each offline stage has the presets ``paper`` (a GPU cluster at the paper's settings: the dataclass defaults plus
# these overrides) and ``tiny`` (the demo's CPU run on the synthetic set). The pipeline picks the preset of the
# tokenizer preset's scale for every stage.
_CPU_POOL = ("run.device=cpu", "run.num_actors=1")
STAGE_PRESETS: Dict[type, Dict[str, Tuple[str, ...]]] = {
    ExtractConfig: {"paper": (),
                    "tiny": ("views=release", *_CPU_POOL, "run.decode_actors=2")},
    SampleJobConfig: {"paper": ("sample.per_class=50", "sample.batch_size=256"),
                      "tiny": ("sample.per_class=8", "sample.batch_size=40", *_CPU_POOL)},
    ReconEvalConfig: {"paper": (),
                      "tiny": _CPU_POOL},
    # the tiny set's 32 px shapes are told apart by a convnet on the pixels, not by the Inception probe once
    # blurred (ideal_ray.eval.convnet); it trains on every real train image
    GenEvalConfig: {"paper": ("classifier.per_class=50",),
                    "tiny": ("classifier.kind=cnn", "classifier.per_class=0")},
    CfgSweepConfig: {"paper": ("sample.per_class=50", "sample.batch_size=256", "classifier.per_class=50"),
                     "tiny": ("cfg_scales=1.0,1.75", "sample.per_class=4", "sample.batch_size=40", "gpus_per_trial=0",
                              "classifier.kind=cnn", "classifier.per_class=0")},
    AblationSweepConfig: {"paper": ("train_preset=paper",),
                          "tiny": ("train_preset=tiny",)},
}
# the chain (ideal_ray.pipeline): every stage at the same scale, and the AR preset of that scale
PIPELINE_STAGES: Dict[str, type] = {"extract": ExtractConfig, "sampling": SampleJobConfig, "recon": ReconEvalConfig,
                                    "gen": GenEvalConfig, "sweep": CfgSweepConfig}
STAGE_PRESETS[PipelineConfig] = {
    scale: (f"ar_preset={'ar-tiny' if scale == 'tiny' else 'ar-B'}",
            *(o for key, cls in PIPELINE_STAGES.items() for o in (f"{key}.preset={scale}",
                                                                  *(f"{key}.{x}" for x in STAGE_PRESETS[cls][scale]))))
    for scale in ("paper", "tiny")}
STAGE_NAMES: Dict[type, str] = {PipelineConfig: "pipeline", ExtractConfig: "extraction", SampleJobConfig: "sampling",
                                ReconEvalConfig: "reconstruction evaluation", GenEvalConfig: "generation evaluation",
                                CfgSweepConfig: "CFG sweep", AblationSweepConfig: "ablation sweep"}
C = TypeVar("C")


def load_stage_config(cls: Type[C], preset: str = "paper", overrides: Sequence[str] = (),
                      complete: bool = True) -> C:
    """An offline stage's config (``cls``: :data:`STAGE_PRESETS`' keys) from its preset (``paper`` or ``tiny``)
    with ``a.b=c`` overrides on top, validated; with ``complete`` its required paths must be set too."""
    presets = STAGE_PRESETS[cls]
    if preset not in presets:
        raise ConfigError(f"Unknown {STAGE_NAMES[cls]} preset '{preset}'; choose one of {sorted(presets)}.")
    cfg = apply_overrides(cls(preset=preset), presets[preset])
    cfg = apply_overrides(cfg, overrides)
    validate_stage(cfg, complete=complete)
    return cfg


# --------------------------------------------------------------------------------------------- data
def check_data_root(cfg: TokenizerTrainConfig) -> bool:
    """Whether the training images are there: True when ``data.root`` holds a training split in a format the listing
    reads (``ideal_ray.data.sources.detect_format``'s rules: a ``train`` folder of class folders, of images (flat,
    labels from ``data.labels_file`` or a labels file in the root), of ``*.parquet`` or ``*.tar`` shards; or a
    ``train.parquet`` file), False when the synthetic set is to be made there (only where asked: the tiny preset's
    own root ``data/synthetic``, the demo's, or ``data.make_synthetic=true``); any other missing root is a
    ConfigError (a typo must not train on invented data). A file-system check, no imports: jobs run it before
    anything heavy; what the split holds is checked when it is listed. An object-store root (``s3://...``) is not
    probed here (that needs its file system): True, and its listing says in one sentence what is missing; the
    synthetic set is made in a local folder only."""
    d = cfg.data
    root = os.path.expanduser(d.root)
    split = os.path.join(root, "train")
    if is_uri(d.root) and d.make_synthetic:
        raise ConfigError(f"data.make_synthetic=true makes the synthetic set in a local folder, but data.root={d.root} "
                          f"is an object-store URI; pass a local data.root or drop data.make_synthetic.")
    if is_uri(d.root) or os.path.isdir(split) or (d.format in ("auto", "parquet")
                                                   and os.path.isfile(split + ".parquet")):
        if d.labels_file and not is_uri(d.labels_file) and not os.path.isfile(os.path.expanduser(d.labels_file)):
            raise ConfigError(f"data.labels_file={d.labels_file} does not exist; point it at the flat training "
                              f"folder's labels (LOC_train_solution.csv or '<file> <label>' lines), or clear it.")
        return True
    is_tiny = cfg.preset.split("+")[0] == "tiny"
    if d.make_synthetic or (is_tiny and os.path.abspath(root) == os.path.abspath(tiny().data.root)):
        return False
    hint = ("; or pass data.make_synthetic=true to generate the synthetic set there" if is_tiny
            else "; point data.root at your ImageNet copy")
    if os.path.isdir(root):  # the root is there, its training split is not
        raise ConfigError(f"No training split at data.root={d.root}: expected {d.root}/train/ holding class folders "
                          f"(<wnid>/*.JPEG), images (with data.labels_file), *.parquet or *.tar shards, or "
                          f"{d.root}/train.parquet{hint}.")
    raise ConfigError(f"No ImageNet-layout folder at data.root={d.root} (expected {d.root}/train/<wnid>/*.JPEG){hint}.")
