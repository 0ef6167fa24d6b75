"""Typed configuration for every part of ideal-ray.

One dataclass per part, composed into :class:`TokenizerTrainConfig` for the tokenizer stage.
Named presets (``tiny``, ``paper``) and ablation variants (``paper+fusion-none``) are built by
:func:`load_config`; ``a.b=c`` overrides are applied on top and the result is validated with one
clear sentence per error, before any model is built or any cluster time is spent.

Numbers for ``paper`` come from ``shared/design/ideal-spec.md`` (the paper and the authors' release).
Layer numbers are 1-based like the paper ("block 8 and block 24"); code converts to 0-based indices.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence, Tuple

from ideal_ray.errors import InputError


class ConfigError(InputError, ValueError):
    """A configuration value is wrong. The message is one sentence a user can act on."""


# --------------------------------------------------------------------------------------------- parts
@dataclass
class VFMConfig:
    """The frozen vision foundation model whose features are tokenized."""

    backbone: str = "siglip2"  # siglip2 | dinov2 | dinov3 | tiny
    # open_clip model name (siglip2, tiny) or timm model name (dinov2, dinov3)
    model_name: str = "ViT-L-16-SigLIP2-384"
    # open_clip pretrained tag ("webli") or timm pretrained tag; "" builds random weights (tiny only)
    pretrained: str = "webli"
    # a local weights file (.safetensors / .bin / .pth); "" looks in the HF / torch hub cache
    weights_path: str = ""
    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    heads: int = 16  # used only by tiny (registered) architectures; real backbones bring their own
    mlp_ratio: float = 4.0
    shallow_layer: int = 8  # 1-based block number; output read before the final norm
    deep_layer: int = 24
    single_layer: bool = False  # layer probe (paper Table 1): tokenize deep_layer only
    shallow_norm_trainable: bool = True  # paper: learnable; release: frozen at 1/0
    mean: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: Tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid


@dataclass
class FusionConfig:
    """AttnFuse: deep tokens query shallow tokens (spec section 2)."""

    mode: str = "attention"  # attention | linear | none
    heads: int = 8
    mlp_ratio: float = 2.0
    dropout: float = 0.1


@dataclass
class QuantizerConfig:
    """Factorized, l2-normalized VQ (spec section 3)."""

    codebook_size: int = 16384
    dim: int = 64
    l2_norm: bool = True
    codebook_weight: float = 1.0
    commitment_weight: float = 0.25
    entropy_weight: float = 0.01
    entropy_temperature: float = 0.01
    usage_window: int = 524288  # indices remembered for the rolling codebook-usage figure


@dataclass
class FeatureDecoderConfig:
    """ViT feature decoder with CLS + registers and deep/shallow heads (spec section 4)."""

    width: int = 1024
    depth: int = 6
    heads: int = 8
    mlp_dim: int = 2048
    dropout: float = 0.1
    num_registers: int = 4


@dataclass
class PixelDecoderConfig:
    """CNN pixel decoder from the deep-feature grid to pixels (spec section 5)."""

    base_channels: int = 128
    ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2  # ResBlocks per up level
    dropout: float = 0.0
    norm_groups: int = 32
    out_channels: int = 3


@dataclass
class DiscriminatorConfig:
    """Frozen DINO ViT-S/16 trunk with five trainable heads (spec section 6)."""

    model_name: str = "vit_small_patch16_224.dino"  # timm name
    pretrained: bool = True
    weights_path: str = ""
    image_size: int = 224
    patch_size: int = 16
    width: int = 384
    depth: int = 12
    heads: int = 6
    tap_blocks: Tuple[int, ...] = (2, 5, 8, 11)  # 0-based blocks tapped after; the embedding is tapped too
    head_kernel: int = 9
    crop_prob: float = 0.5  # one random crop for the batch with this probability, else area-resize
    # a tap's tokens: "add_cls" = class token added to each patch token, (image/patch)^2 tokens (release);
    # "cls_token" = class token kept as its own token, 1 + (image/patch)^2 tokens
    tap_readout: str = "add_cls"


@dataclass
class TokenizerConfig:
    vfm: VFMConfig = field(default_factory=VFMConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    feature_decoder: FeatureDecoderConfig = field(default_factory=FeatureDecoderConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    image_size: int = 384  # pixel-space resolution the tokenizer reconstructs


@dataclass
class LossConfig:
    """Loss weights and schedule (spec section 6)."""

    recon_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual_warmup_steps: int = 10  # w_p = min(1, step / warmup)
    lpips_net: str = "vgg"  # lpips package backbone: vgg | alex | squeeze
    lpips_pretrained: bool = True  # False: random trunk (tiny/CPU tests), shipped linear heads
    lpips_weights_path: str = ""  # local torchvision VGG16 file; "" looks in $TORCH_HOME/hub/checkpoints
    deep_mse_weight: float = 1.0
    deep_cos_weight: float = 1.0
    shallow_align: bool = True
    shallow_mse_weight: float = 1.0
    shallow_cos_weight: float = 1.0
    adv_weight: float = 0.5  # lambda_adv for hinge_G, from disc_start
    disc_weight: float = 0.5  # lambda_d for the discriminator hinge (+ LeCAM)
    disc_start: int = 20000
    lecam_weight: float = 0.001
    lecam_decay: float = 0.999
    cr_weight: float = 4.0
    diffaug: bool = True
    diffaug_prob: float = 0.5
    use_discriminator: bool = True


@dataclass
class OptimConfig:
    """AdamW for G and D, cosine schedule with warm-up (spec section 6)."""

    lr: float = 1e-4
    base_batch: int = 256  # lr is scaled linearly by global_batch / base_batch
    betas: Tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_start_lr: float = 1e-5
    min_lr: float = 1e-5
    warmup_epochs: float = 4.0
    epochs: float = 50.0
    grad_clip: float = 1.0
    lr_schedule: str = "cosine"  # cosine (tokenizer) | constant (AR); both after the optional warm-up
    ema_decay: float = 0.9999
    precision: str = "bf16"  # bf16 | fp32 (bf16 autocast is used on GPU only)
    seed: int = 42


@dataclass
class DataConfig:
    """Where images come from and how they are augmented."""

    root: str = "data/imagenet"  # ImageNet layout: train/<wnid>/*.JPEG, val/<wnid>/*.JPEG
    class_index: str = ""  # "" = <root>/class_index.json
    image_size: int = 384  # random crop size
    resize_min: int = 384  # shorter side resized to U[resize_min, resize_max]
    resize_max: int = 480
    hflip_prob: float = 0.5
    global_batch: int = 256
    loader_workers: int = 8
    # synthetic set (demo, tests): made under root when root has no train folder yet, at the tiny preset's own
    # data/synthetic or wherever make_synthetic=true asks for it (a mistyped root is refused, not filled)
    make_synthetic: bool = False
    synthetic_classes: int = 10
    synthetic_train_per_class: int = 100
    synthetic_val_per_class: int = 10
    synthetic_size: int = 96


@dataclass
class ScheduleConfig:
    """How long to train and how often to do things; steps are optimizer steps."""

    steps: int = 0  # 0 = derive from optim.epochs and the dataset size
    steps_per_epoch: int = 5005  # ImageNet-1k at batch 256; recomputed from the data when known
    log_every: int = 50
    ckpt_every: int = 10000
    vis_every: int = 5000


@dataclass
class DistributedConfig:
    """How a stage runs on Ray Train + DeepSpeed, and where its results go."""

    num_workers: int = 8  # Ray Train workers (one per GPU)
    use_gpu: bool = True
    cpus_per_worker: float = 8.0  # leave the rest of each node's CPUs to Ray Data (decode, augment)
    zero_stage: int = 1  # DeepSpeed ZeRO stage for the generator and discriminator engines (0, 1 or 2)
    # Ray Train storage: local dir, NFS path, or s3:// / gs:// (pyarrow filesystems); "" = the run's output_dir
    storage_path: str = ""
    max_failures: int = 3  # worker-group restarts from the latest checkpoint before the run fails
    keep_checkpoints: int = 3  # most recent checkpoints kept in storage
    max_bad_steps: int = 10  # NaN guard: stop after this many non-finite steps in a row
    prefetch_batches: int = 2  # Ray Data batches prefetched per worker
    ray_address: str = ""  # "" = RAY_ADDRESS or a local cluster
    # Tokenizer stage: where the frozen VFM trunk runs. "trainer": inside every train worker (on its GPU);
    # "data": in a Ray Data actor pool after decode/augment, the trainers receive its features with the images.
    # The math is the same either way (a pure function of the image), so a resumed run may switch it.
    vfm_placement: str = "trainer"
    vfm_actors: int = 1  # VFM actors per rank's dataset with vfm_placement=data (one GPU each with use_gpu)
    # How parameters are updated (train/engines.py): "deepspeed" (every Ray run; one process too) or "torch"
    # (plain torch AdamW in one process: quick CPU runs where DeepSpeed's start-up costs more than the run)
    engine: str = "deepspeed"


@dataclass
class PerfConfig:
    """Speed levers of a stage's step on a GPU (train/levers.py). Each keeps the math of the plain step (tested
    on CPU) and each is timed alone by ``jobs/bench.py``; on CPU the GPU-only ones change nothing. Defaults follow
    the H200 measurements in the README ("Performance"): a lever is on by default once it measured a gain."""

    frozen_bf16: bool = False  # frozen trunks' linear/conv weights held in bf16 (CUDA + precision=bf16 only)
    channels_last: bool = False  # pixel decoder activations and the LPIPS trunk in NHWC (CUDA only)
    compile: bool = False  # torch.compile (inductor) of the step's regions (CUDA only): decoders, trunk blocks
    # torch.compile mode of those regions: default | reduce-overhead (CUDA graphs of each region) |
    # max-autotune-no-cudagraphs (autotuned kernels; long first compile)
    compile_mode: str = "default"
    # when the host reads the NaN guard: "after_backward" launches the backward first (the host waits while the
    # GPU already has the backward queued; a non-finite step's gradients are NaN-poisoned and dropped), or
    # "before_backward" (the host waits for the forward, the GPU idles until the backward is launched)
    nan_check: str = "after_backward"


class StageConfig:
    """What every stage's top-level config offers: a plain dict and a dotted-key view (MLflow params)."""

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> Dict[str, Any]:
        return flatten(self.to_dict())


@dataclass
class TokenizerTrainConfig(StageConfig):
    """Everything the tokenizer stage needs."""

    preset: str = "paper"
    name: str = "ideal-tokenizer"
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    dist: DistributedConfig = field(default_factory=DistributedConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    output_dir: str = "runs"


# ------------------------------------------------------------------------------------- the AR stage
@dataclass
class GPTConfig:
    """Class-conditional LlamaGen-style GPT over the tokenizer's codes (spec section 7)."""

    size: str = "B"  # B | L | XXL | 3B | tiny (informational; the numbers below are what counts)
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    multiple_of: int = 256  # SwiGLU hidden = 8d/3 rounded up to a multiple of this
    ffn_dim_multiplier: float = 0.0  # 0 = none
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    initializer_range: float = 0.02
    vocab_size: int = 16384
    num_classes: int = 1000  # class id num_classes is the CFG null class
    grid: int = 24  # tokens per image = grid * grid
    cls_token_num: int = 1
    class_dropout: float = 0.1
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    attn_dropout: float = 0.0
    drop_path: float = 0.0

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid


GPT_SIZES: Dict[str, Dict[str, int]] = {
    "B": dict(n_layer=12, n_head=12, dim=768),
    "L": dict(n_layer=24, n_head=16, dim=1024),
    "XXL": dict(n_layer=48, n_head=24, dim=1536),
    "3B": dict(n_layer=24, n_head=32, dim=3200),
    "tiny": dict(n_layer=2, n_head=4, dim=64),
}


def gpt_config(size: str, **overrides: Any) -> GPTConfig:
    """A GPT preset by name (B, L, XXL, 3B, tiny), optionally with field overrides."""
    if size not in GPT_SIZES:
        raise ConfigError(f"Unknown GPT size '{size}'; choose one of {sorted(GPT_SIZES)}.")
    fields = dict(GPT_SIZES[size], size=size)
    if size == "tiny":
        fields.update(vocab_size=256, num_classes=10, grid=8, multiple_of=32)
    fields.update(overrides)
    return GPTConfig(**fields)


@dataclass
class SampleConfig:
    """Class-conditional sampling (spec section 7)."""

    cfg_scale: float = 1.75  # logits u + s (c - u); 1.0 = no guidance
    cfg_interval: Tuple[float, float] = (0.0, 1.0)  # guidance only for token fractions in [start, end)
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    per_class: int = 50
    batch_size: int = 64
    seed: int = 0
    out_size: int = 256  # decoded 384 px images are resized (bicubic) to this, uint8


@dataclass
class TokenDataConfig:
    """Token shards written by jobs/extract_tokens.py (one random view per image per epoch)."""

    shards: str = "data/tokens"  # folder with tokens-*.parquet + manifest.json
    global_batch: int = 512
    loader_workers: int = 1  # shard-reader actors per rank


@dataclass
class ARTrainConfig(StageConfig):
    """Everything the AR stage needs."""

    preset: str = "ar-B"
    name: str = "ideal-ar-B"
    model: GPTConfig = field(default_factory=GPTConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-4, base_batch=0, warmup_epochs=0.0, epochs=300.0, lr_schedule="constant", seed=0))
    data: TokenDataConfig = field(default_factory=TokenDataConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(log_every=100, ckpt_every=25000,
                                                                            vis_every=10**9))
    dist: DistributedConfig = field(default_factory=DistributedConfig)
    # compiled GPT blocks: GPT-B 838 vs 468 seq/s at batch 64 on one H200 (README "Performance")
    perf: PerfConfig = field(default_factory=lambda: PerfConfig(compile=True))
    output_dir: str = "runs"


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


# ----------------------------------------------------------------------------------------- overrides
def _coerce(value: str, tp: Any, key: str, example: str = "") -> Any:
    """``value`` as the field type ``tp``; a value that does not parse is refused naming the override and, from
    ``example`` (the field's current value), one that would."""
    eg = f", e.g. {key}={example}" if example else ""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        return _coerce(value, args[0], key, example)
    if tp is bool:
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"Override {key}={value} needs a boolean (true/false).")
    if tp is int:
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"Override {key}={value} needs an integer{eg}.") from None
    if tp is float:
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"Override {key}={value} needs a number{eg}.") from None
    if tp is str:
        return value
    if origin in (tuple, list, Tuple, List):
        args = typing.get_args(tp)
        elem = args[0] if args else str
        text = value.strip().strip("[]()")
        parts = [p.strip() for p in text.split(",") if p.strip()] if text else []
        try:
            items = [_coerce(p, elem, key) for p in parts]
        except ConfigError:  # name the whole value, not the one item
            kind = {int: "integers", float: "numbers"}.get(elem, "values")
            raise ConfigError(f"Override {key}={value} needs comma-separated {kind}{eg}.") from None
        if origin in (tuple, Tuple) and args and args[-1] is not Ellipsis and len(args) != len(items):
            raise ConfigError(f"Override {key}={value} needs exactly {len(args)} comma-separated values{eg}.")
        return tuple(items) if origin in (tuple, Tuple) else items
    raise ConfigError(f"Override {key} has a type ({tp}) that cannot be set from the command line.")


def _show(v: Any) -> str:
    """A value as an override would write it: ``0.9,0.95`` for a tuple."""
    return ",".join(str(x) for x in v) if isinstance(v, (tuple, list)) else str(v)


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """Return a copy of ``cfg`` with each ``a.b=c`` override applied (values typed by the field)."""
    import difflib

    cfg = _deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' is not of the form key.sub=value.")
        key, value = item.split("=", 1)
        key = key.strip()
        node = cfg
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not dataclasses.is_dataclass(node):
                raise ConfigError(f"Override key '{key}' goes below a plain value at '{'.'.join(parts[:i])}'.")
            hints = typing.get_type_hints(type(node))
            if part not in hints:
                names = [f.name for f in dataclasses.fields(node)]
                where = ".".join(parts[:i]) or "the config"
                close = difflib.get_close_matches(part, names, n=1)
                hint = f"; the closest is {'.'.join(parts[:i] + close[:1])}" if close else ""
                raise ConfigError(f"Override key '{key}' is unknown: {where} has no field '{part}' (fields: "
                                  f"{', '.join(names)}){hint}.")
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(getattr(node, part)):
                    raise ConfigError(f"Override key '{key}' names a section; set one of its fields instead.")
                setattr(node, part, _coerce(value.strip(), hints[part], key, _show(getattr(node, part))))
            else:
                node = getattr(node, part)
    return cfg


def _deepcopy(cfg: Any) -> Any:
    import copy

    return copy.deepcopy(cfg)


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def from_dict(cls: Any, data: Dict[str, Any]) -> Any:
    """Rebuild a (nested) config dataclass from :func:`dataclasses.asdict` output (e.g. a checkpoint)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, v = hints[f.name], data[f.name]
        if dataclasses.is_dataclass(tp):
            v = from_dict(tp, v)
        elif typing.get_origin(tp) in (tuple, Tuple) and v is not None:
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def to_json(cfg: Any) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------- validation
BACKBONES = ("siglip2", "dinov2", "dinov3", "tiny")
FUSION_MODES = ("attention", "linear", "none")
LPIPS_NETS = ("vgg", "alex", "squeeze")
PRECISIONS = ("bf16", "fp32")
LR_SCHEDULES = ("cosine", "constant")
VFM_PLACEMENTS = ("trainer", "data")
ENGINES = ("deepspeed", "torch")
NAN_CHECKS = ("after_backward", "before_backward")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
TAP_READOUTS = ("add_cls", "cls_token")


def _check(ok: bool, sentence: str) -> None:
    if not ok:
        raise ConfigError(sentence)


def _positive(key: str, v: Any, note: str = "") -> None:
    _check(v > 0, f"{key}={_show(v)} must be positive{note}.")


def _non_negative(key: str, v: Any, note: str = "") -> None:
    _check(v >= 0, f"{key}={_show(v)} cannot be negative{note}.")


def _at_least_one(key: str, v: int, note: str = "") -> None:
    _check(v >= 1, f"{key}={v} must be at least 1{note}.")


def _fraction(key: str, v: float, upper_open: bool = False) -> None:
    """A probability or decay: in [0, 1], or [0, 1) with ``upper_open``."""
    _check(0 <= v < 1 if upper_open else 0 <= v <= 1, f"{key}={v} must be in [0, 1{')' if upper_open else ']'}.")


def _non_empty(key: str, v: str, example: str) -> None:
    _check(bool(v and v.strip()), f"{key} is empty; pass {example}.")


def _require_finite(node: Any, prefix: str = "") -> None:
    """Every float of a (nested) config is a finite number: no field of ours has a use for inf or NaN (a NaN even
    passes comparisons like ``lr > 0`` unnoticed), so a non-finite one is refused before any other check."""
    for f in dataclasses.fields(node):
        v, key = getattr(node, f.name), prefix + f.name
        if dataclasses.is_dataclass(v):
            _require_finite(v, key + ".")
            continue
        if any(isinstance(x, float) and not math.isfinite(x) for x in (v if isinstance(v, (tuple, list)) else (v,))):
            example = "" if f.default is dataclasses.MISSING else f", e.g. {key}={_show(f.default)}"
            raise ConfigError(f"{key}={_show(v)} is not a finite number; give it a finite value{example}.")


def validate_run_folder(name: str, output_dir: str) -> None:
    """A stage's run folder is ``output_dir/name``: ``name`` must be one folder name, so the run stays inside
    ``output_dir`` (``..`` or ``a/b`` would put its checkpoints, records and exports somewhere else)."""
    _non_empty("name", name, "a run name, e.g. name=my-run")
    _check(name not in (".", "..") and not any(c in name for c in "/\\\0"),
           f"name={name} is not a single folder name (the run folder output_dir/name would lie outside output_dir); "
           f"pass a plain name like name=my-run and choose where runs go with output_dir.")
    _non_empty("output_dir", output_dir, "the folder runs are written under, e.g. output_dir=runs")


def validate_optim(o: OptimConfig, global_batch: int) -> None:
    """The optimizer and its learning-rate schedule, for every training stage."""
    _positive("optim.lr", o.lr)
    _check(o.lr_schedule in LR_SCHEDULES,
           f"optim.lr_schedule '{o.lr_schedule}' is unknown; choose one of {LR_SCHEDULES}.")
    _check(o.precision in PRECISIONS, f"optim.precision '{o.precision}' is unknown; choose one of {PRECISIONS}.")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
           f"optim.betas={_show(o.betas)} must be two values in [0, 1), e.g. optim.betas=0.9,0.95.")
    _non_negative("optim.weight_decay", o.weight_decay)
    _non_negative("optim.warmup_start_lr", o.warmup_start_lr)
    _non_negative("optim.min_lr", o.min_lr)
    _non_negative("optim.base_batch", o.base_batch, " (0 turns linear lr scaling off)")
    if o.lr_schedule == "cosine":
        peak = o.lr * (max(1.0, global_batch / o.base_batch) if o.base_batch else 1.0)
        _check(o.min_lr <= peak, f"optim.min_lr={o.min_lr} is above the peak learning rate {peak:g}; lower "
               f"optim.min_lr or raise optim.lr.")
    _non_negative("optim.warmup_epochs", o.warmup_epochs)
    _non_negative("optim.epochs", o.epochs)
    _check(o.warmup_epochs <= o.epochs,
           f"optim.warmup_epochs={o.warmup_epochs} is longer than optim.epochs={o.epochs}.")
    _non_negative("optim.grad_clip", o.grad_clip, " (0 turns clipping off)")
    _fraction("optim.ema_decay", o.ema_decay, upper_open=True)
    _non_negative("optim.seed", o.seed)


def validate_training(cfg: Any, zero_note: str) -> None:
    """What every training stage's config (tokenizer, AR) shares: run folder, optimizer, schedule, batch over the
    workers, the Ray Train / DeepSpeed settings and the speed levers. ``zero_note``: why ZeRO-3 is not offered."""
    o, s, t = cfg.optim, cfg.schedule, cfg.dist
    validate_run_folder(cfg.name, cfg.output_dir)
    _at_least_one("data.global_batch", cfg.data.global_batch)
    validate_optim(o, cfg.data.global_batch)
    _non_negative("schedule.steps", s.steps, " (0 derives the run's length from optim.epochs)")
    _check(s.steps > 0 or o.epochs > 0,
           "optim.epochs=0 and schedule.steps=0 give a run of no steps; set schedule.steps or optim.epochs.")
    for k in ("steps_per_epoch", "log_every", "ckpt_every", "vis_every"):
        _at_least_one(f"schedule.{k}", getattr(s, k))
    _at_least_one("dist.num_workers", t.num_workers)
    _check(cfg.data.global_batch % t.num_workers == 0,
           f"data.global_batch {cfg.data.global_batch} does not divide evenly over dist.num_workers {t.num_workers}; "
           f"choose a global batch that is a multiple of the worker count.")
    _check(t.zero_stage in (0, 1, 2), f"dist.zero_stage {t.zero_stage} is not supported (0, 1 or 2): {zero_note}.")
    _positive("dist.cpus_per_worker", t.cpus_per_worker)
    _non_negative("dist.max_failures", t.max_failures)
    _at_least_one("dist.keep_checkpoints", t.keep_checkpoints)
    _at_least_one("dist.max_bad_steps", t.max_bad_steps)
    _non_negative("dist.prefetch_batches", t.prefetch_batches)
    validate_engine_and_perf(t, cfg.perf)


def validate_tokenizer(m: TokenizerConfig) -> None:
    _require_finite(m, "model.")
    v, f, q, fd, pd = m.vfm, m.fusion, m.quantizer, m.feature_decoder, m.pixel_decoder
    _check(v.backbone in BACKBONES, f"model.vfm.backbone '{v.backbone}' is unknown; choose one of {BACKBONES}.")
    _check(f.mode in FUSION_MODES, f"model.fusion.mode '{f.mode}' is unknown; choose one of {FUSION_MODES}.")
    for k in ("image_size", "patch_size", "width", "depth", "heads"):
        _at_least_one(f"model.vfm.{k}", getattr(v, k))
    _positive("model.vfm.mlp_ratio", v.mlp_ratio)
    _check(all(s > 0 for s in v.std), f"model.vfm.std={_show(v.std)} must be positive (pixels are divided by it).")
    _check(v.image_size % v.patch_size == 0,
           f"model.vfm.image_size {v.image_size} is not a multiple of model.vfm.patch_size {v.patch_size}.")
    _check(1 <= v.deep_layer <= v.depth,
           f"model.vfm.deep_layer {v.deep_layer} is beyond the backbone's depth {v.depth} (layers are 1..{v.depth}).")
    if not v.single_layer:
        _check(1 <= v.shallow_layer <= v.depth,
               f"model.vfm.shallow_layer {v.shallow_layer} is beyond the backbone's depth {v.depth} "
               f"(layers are 1..{v.depth}).")
        _check(v.shallow_layer < v.deep_layer,
               f"model.vfm.shallow_layer {v.shallow_layer} must come before model.vfm.deep_layer {v.deep_layer}.")
    else:
        _check(f.mode == "none", "Single-layer tokenization (model.vfm.single_layer=true) has no shallow tokens "
               "to fuse: set model.fusion.mode=none.")
    _at_least_one("model.fusion.heads", f.heads)
    _check(v.width % f.heads == 0 or f.mode != "attention",
           f"model.fusion.heads {f.heads} does not divide the VFM width {v.width}.")
    _positive("model.fusion.mlp_ratio", f.mlp_ratio)
    _fraction("model.fusion.dropout", f.dropout, upper_open=True)
    _check(q.codebook_size >= 2, f"model.quantizer.codebook_size {q.codebook_size} must be at least 2.")
    _check(q.codebook_size <= 65536,
           f"model.quantizer.codebook_size {q.codebook_size} exceeds 65536, the range of the uint16 token shards.")
    _check(1 <= q.dim <= v.width,
           f"model.quantizer.dim {q.dim} must be between 1 and the VFM width {v.width}.")
    for k in ("codebook_weight", "commitment_weight", "entropy_weight"):
        _non_negative(f"model.quantizer.{k}", getattr(q, k), " (0 turns that term off)")
    _positive("model.quantizer.entropy_temperature", q.entropy_temperature)
    _at_least_one("model.quantizer.usage_window", q.usage_window)
    for k in ("width", "heads", "mlp_dim", "depth"):
        _at_least_one(f"model.feature_decoder.{k}", getattr(fd, k))
    _check(fd.width % fd.heads == 0,
           f"model.feature_decoder.heads {fd.heads} does not divide its width {fd.width}.")
    _fraction("model.feature_decoder.dropout", fd.dropout, upper_open=True)
    _non_negative("model.feature_decoder.num_registers", fd.num_registers)
    _check(len(pd.ch_mult) >= 1, "model.pixel_decoder.ch_mult needs at least one level.")
    for k in ("base_channels", "num_res_blocks", "norm_groups", "out_channels"):
        _at_least_one(f"model.pixel_decoder.{k}", getattr(pd, k))
    _check(all(c >= 1 for c in pd.ch_mult),
           f"model.pixel_decoder.ch_mult={_show(pd.ch_mult)} must hold multipliers of at least 1.")
    _fraction("model.pixel_decoder.dropout", pd.dropout, upper_open=True)
    for c in pd.ch_mult:
        _check(pd.base_channels * c % pd.norm_groups == 0,
               f"model.pixel_decoder channels {pd.base_channels * c} are not divisible by norm_groups "
               f"{pd.norm_groups}.")
    up = 2 ** (len(pd.ch_mult) - 1)
    _check(v.grid * up == m.image_size,
           f"The pixel decoder upsamples the {v.grid}x{v.grid} token grid by {up} to {v.grid * up}, "
           f"but model.image_size is {m.image_size}: change model.pixel_decoder.ch_mult or model.image_size.")


def validate_engine_and_perf(t: DistributedConfig, p: PerfConfig) -> None:
    """The engine backend and the speed levers, for every training stage."""
    _check(t.engine in ENGINES, f"dist.engine '{t.engine}' is unknown; choose one of {ENGINES}.")
    _check(t.engine == "deepspeed" or t.num_workers == 1,
           f"dist.engine=torch runs one process, but dist.num_workers is {t.num_workers}; use dist.engine=deepspeed "
           f"for several workers, or dist.num_workers=1.")
    _check(p.nan_check in NAN_CHECKS, f"perf.nan_check '{p.nan_check}' is unknown; choose one of {NAN_CHECKS}.")
    _check(p.compile_mode in COMPILE_MODES,
           f"perf.compile_mode '{p.compile_mode}' is unknown; choose one of {COMPILE_MODES}.")


def check_data_root(cfg: TokenizerTrainConfig) -> bool:
    """Whether the training images are there: True when ``data.root`` holds a ``train`` folder, False when the
    synthetic set is to be made there (only where asked: the tiny preset's own root ``data/synthetic``, the demo's,
    or ``data.make_synthetic=true``); any other missing root is a ConfigError (a typo must not train on invented
    data). A file-system check, no imports: jobs run it before anything heavy."""
    d = cfg.data
    if os.path.isdir(os.path.join(d.root, "train")):
        return True
    is_tiny = cfg.preset.split("+")[0] == "tiny"
    if d.make_synthetic or (is_tiny and os.path.abspath(d.root) == os.path.abspath(tiny().data.root)):
        return False
    hint = ("; or pass data.make_synthetic=true to generate the synthetic set there" if is_tiny
            else "; point data.root at your ImageNet copy")
    raise ConfigError(f"No ImageNet-layout folder at data.root={d.root} (expected {d.root}/train/<wnid>/*.JPEG){hint}.")


def validate(cfg: TokenizerTrainConfig) -> None:
    """Raise :class:`ConfigError` with one sentence for the first wrong value."""
    _require_finite(cfg)
    validate_tokenizer(cfg.model)
    d, l, dc, t = cfg.discriminator, cfg.loss, cfg.data, cfg.dist
    _check(l.lpips_net in LPIPS_NETS, f"loss.lpips_net '{l.lpips_net}' is unknown; choose one of {LPIPS_NETS}.")
    _check(not (cfg.model.vfm.single_layer and l.shallow_align),
           "Single-layer tokenization has no shallow target: set loss.shallow_align=false.")
    for k in ("recon_weight", "perceptual_weight", "deep_mse_weight", "deep_cos_weight", "shallow_mse_weight",
              "shallow_cos_weight", "adv_weight", "disc_weight", "lecam_weight", "cr_weight"):
        _non_negative(f"loss.{k}", getattr(l, k), " (0 turns that term off)")
    _non_negative("loss.perceptual_warmup_steps", l.perceptual_warmup_steps)
    _non_negative("loss.disc_start", l.disc_start)
    _check(0 < l.lecam_decay < 1, f"loss.lecam_decay={l.lecam_decay} must be in (0, 1).")
    _fraction("loss.diffaug_prob", l.diffaug_prob)
    for k in ("image_size", "patch_size", "width", "depth", "heads", "head_kernel"):
        _at_least_one(f"discriminator.{k}", getattr(d, k))
    _check(d.image_size % d.patch_size == 0,
           f"discriminator.image_size {d.image_size} is not a multiple of discriminator.patch_size {d.patch_size}.")
    _check(d.width % d.heads == 0, f"discriminator.heads {d.heads} does not divide its width {d.width}.")
    for b in d.tap_blocks:
        _check(0 <= b < d.depth,
               f"discriminator.tap_blocks has block {b}, beyond the trunk's depth {d.depth} (0-based 0..{d.depth - 1}).")
    _fraction("discriminator.crop_prob", d.crop_prob)
    _check(d.tap_readout in TAP_READOUTS,
           f"discriminator.tap_readout '{d.tap_readout}' is unknown; choose one of {TAP_READOUTS}.")
    _non_empty("data.root", dc.root, "the image folder, e.g. data.root=/datasets/imagenet")
    _at_least_one("data.image_size", dc.image_size)
    _check(dc.resize_min >= dc.image_size,
           f"data.resize_min {dc.resize_min} is smaller than the crop data.image_size {dc.image_size}.")
    _check(dc.resize_max >= dc.resize_min, "data.resize_max is smaller than data.resize_min.")
    _check(dc.image_size == cfg.model.image_size,
           f"data.image_size {dc.image_size} differs from model.image_size {cfg.model.image_size}.")
    _fraction("data.hflip_prob", dc.hflip_prob)
    _non_negative("data.loader_workers", dc.loader_workers)
    for k in ("synthetic_classes", "synthetic_train_per_class", "synthetic_val_per_class", "synthetic_size"):
        _at_least_one(f"data.{k}", getattr(dc, k))
    validate_training(cfg, "the EMA and the frozen VFM need full parameters on every rank")
    _check(t.vfm_placement in VFM_PLACEMENTS,
           f"dist.vfm_placement '{t.vfm_placement}' is unknown; choose one of {VFM_PLACEMENTS}.")
    _check(t.vfm_actors >= 1, f"dist.vfm_actors {t.vfm_actors} must be at least 1 (VFM actors per rank's dataset).")


def validate_ar(cfg: ARTrainConfig) -> None:
    """Raise :class:`ConfigError` with one sentence for the first wrong value of the AR stage."""
    _require_finite(cfg)
    m, d, t = cfg.model, cfg.data, cfg.dist
    for k in ("dim", "n_layer", "n_head", "multiple_of", "num_classes", "grid"):
        _at_least_one(f"model.{k}", getattr(m, k))
    _check(m.dim % m.n_head == 0, f"model.n_head {m.n_head} does not divide model.dim {m.dim}.")
    _check((m.dim // m.n_head) % 4 == 0, f"The head dimension {m.dim // m.n_head} must be a multiple of 4 "
           f"(2D RoPE splits it into rows and columns).")
    _check(m.cls_token_num == 1, "model.cls_token_num must be 1 (class-conditional generation).")
    _check(2 <= m.vocab_size <= 65536, f"model.vocab_size {m.vocab_size} must be in [2, 65536] (uint16 shards).")
    _non_negative("model.ffn_dim_multiplier", m.ffn_dim_multiplier, " (0 = none)")
    for k in ("norm_eps", "rope_base", "initializer_range"):
        _positive(f"model.{k}", getattr(m, k))
    for k in ("class_dropout", "token_dropout", "resid_dropout", "ffn_dropout", "attn_dropout", "drop_path"):
        _fraction(f"model.{k}", getattr(m, k), upper_open=True)
    _non_empty("data.shards", d.shards, "the token shards' folder, e.g. data.shards=data/tokens")
    _at_least_one("data.loader_workers", d.loader_workers)
    validate_training(cfg, "the EMA keeps full parameters on every rank")
    _check(t.vfm_placement == "trainer",
           f"dist.vfm_placement '{t.vfm_placement}' does not apply to the AR stage (it reads token shards and runs "
           f"no VFM); leave dist.vfm_placement=trainer.")


def validate_sample(cfg: SampleConfig) -> None:
    """Sampling settings (``ideal_ray.sampling``, the sampling jobs and the CFG sweep): one sentence for the first
    wrong value, keys as the jobs' flags name them (``cfg_scale`` is ``--cfg-scale``)."""
    _require_finite(cfg)
    _non_negative("cfg_scale", cfg.cfg_scale, " (1.0 = no guidance)")
    _check(len(cfg.cfg_interval) == 2 and 0.0 <= cfg.cfg_interval[0] <= cfg.cfg_interval[1] <= 1.0,
           f"cfg_interval={_show(cfg.cfg_interval)} must be start,end with 0 <= start <= end <= 1 (fractions of the "
           f"token sequence).")
    _check(cfg.temperature >= 0,
           f"temperature={cfg.temperature} is negative; use 0 for greedy decoding or a positive value.")
    _check(cfg.top_k >= 0, f"top_k={cfg.top_k} is negative; use 0 to turn top-k filtering off.")
    _check(0.0 < cfg.top_p <= 1.0, f"top_p={cfg.top_p} must be in (0, 1]; use 1.0 to turn nucleus filtering off.")
    for k in ("per_class", "batch_size", "out_size"):
        _at_least_one(k, getattr(cfg, k))
    _non_negative("seed", cfg.seed)
