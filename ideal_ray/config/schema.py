"""The configuration's shape: one dataclass per part, composed into each stage's top-level config
(:class:`TokenizerTrainConfig`, :class:`ARTrainConfig`) and the sampling settings (:class:`SampleConfig`).

Numbers for ``paper`` come from ``shared/design/ideal-spec.md`` (the paper and the authors' release).
Layer numbers are 1-based like the paper ("block 8 and block 24"); code converts to 0-based indices.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional, Tuple

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

    root: str = "data/imagenet"  # ImageNet layout: train/<wnid>/*.JPEG, val/<wnid>/*.JPEG (or any format below)
    class_index: str = ""  # "" = <root>/class_index.json
    format: str = "auto"  # auto | folder | flat | parquet | webdataset (ideal_ray.data.sources, as extraction)
    labels_file: str = ""  # labels of a flat folder: LOC_train_solution.csv, or "name label" lines
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
    # How Ray Train places the workers on the cluster's nodes (ScalingConfig.placement_strategy): PACK (as few
    # nodes as fit, the default), SPREAD (as many as it can), STRICT_PACK (all on one node) or STRICT_SPREAD (one
    # worker per node; the run waits until the cluster has dist.num_workers nodes that fit a worker)
    placement_strategy: str = "PACK"
    # Tokenizer stage: where the frozen VFM trunk runs. "trainer": inside every train worker (on its GPU);
    # "data": in a Ray Data actor pool after decode/augment, the trainers receive its features with the images.
    # The math is the same either way (a pure function of the image), so a resumed run may switch it.
    vfm_placement: str = "trainer"
    vfm_actors: int = 1  # VFM actors per rank's dataset with vfm_placement=data (one GPU each with use_gpu)
    # How parameters are updated (train/engines.py): "deepspeed" (every Ray run; one process too) or "torch"
    # (plain torch AdamW in one process: quick CPU runs where DeepSpeed's start-up costs more than the run)
    engine: str = "deepspeed"
    # The inference export also goes to the run's MLflow record as an artifact (beside the reconstructions grids):
    # with `mlflow server --artifacts-destination s3://...` it lands in the object store and downloads through the
    # server (`mlflow artifacts download`); false keeps it out of the tracking store (the export file and, on an
    # object-store storage_path, its copy next to the checkpoints stay)
    export_to_mlflow: bool = True


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


# ------------------------------------------------------------------- the offline stages (jobs over datasets)
@dataclass
class SourceConfig:
    """A split of a labelled image set, in any format ``ideal_ray.data.sources`` reads."""

    root: str = ""  # data set root: <split>/<wnid>/* folders, a flat folder, Parquet shards or WebDataset tars
    split: str = "train"
    format: str = "auto"  # auto | folder | flat | parquet | webdataset
    labels_file: str = ""  # labels of a flat folder: LOC_val_solution.csv, or "name label" lines
    class_index: str = ""  # "" = <root>/class_index.json


@dataclass
class RunConfig:
    """Where an offline stage's model runs: a Ray actor pool over the cluster (default) or this process."""

    in_process: bool = False  # no Ray: decode and run the model in this process, on ``device``
    device: str = "auto"  # Ray: auto (GPUs if the cluster has them) | cuda | cpu; in process: cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    num_actors: Optional[int] = None  # model actors (encoders, samplers, evaluators); None = every GPU, or 1
    decode_actors: Optional[int] = None  # CPU decode actors; None = the stage's default


@dataclass
class FIDConfig:
    """The FID Inception network and the cache of reference statistics (``ideal_ray.eval.fid``)."""

    inception_weights: str = ""  # torch-fidelity's file; "" = $TORCH_HOME/hub/checkpoints or the converted file
    cache_dir: str = ""  # "" = $IDEAL_RAY_FID_REFS or ~/.cache/ideal_ray/fid_refs
    batch_size: int = 50


@dataclass
class ClassifierConfig:
    """Class accuracy of generated samples (``ideal_ray.eval.class_accuracy``): a classifier fitted once on real
    images of the data set the classes come from, cached beside the reference statistics."""

    data: str = ""  # root of that labelled data set; "" = no class accuracy
    split: str = "train"
    per_class: Optional[int] = None  # real images per class it is fitted on; None = 50, 0 = all
    kind: str = "probe"  # probe: linear classifier on Inception features | cnn: a small convnet on the pixels


@dataclass
class ExtractConfig(StageConfig):
    """Token extraction (``jobs/extract_tokens.py``): a split encoded into token shards for the AR stage."""

    REQUIRED: ClassVar[Tuple[str, ...]] = ("tokenizer", "data.root", "out")  # paths a run cannot go without
    # inputs checked for existence by the jobs (the checkpoint files are checked by their own loader's sentences)
    INPUTS: ClassVar[Tuple[str, ...]] = ("data.root", "data.labels_file", "data.class_index")
    OUTPUTS: ClassVar[Tuple[str, ...]] = ("out",)
    STORE_OUTPUTS: ClassVar[Tuple[str, ...]] = ("out",)  # outputs the stage writes to an object store itself

    preset: str = "paper"
    tokenizer: str = ""  # our export or the authors' release tokenizer file
    out: str = ""  # folder of tokens-*.parquet + manifest.json (+ skipped.tsv)
    data: SourceConfig = field(default_factory=SourceConfig)
    views: str = "llamagen"  # llamagen: ten-crop at 1.1x and 1.05x (20 views, the paper) | release: crop + flip
    image_size: Optional[int] = None  # crop size; None = the tokenizer's
    batch_size: Optional[int] = None  # views per encoder forward; None = 512 on GPU, 64 on CPU
    shard_images: int = 4096  # images per Parquet shard
    row_group_images: int = 4  # images per Parquet row group
    max_shards: Optional[int] = None  # stop after writing this many shards
    max_skip_fraction: float = 0.05  # stop when more than this fraction of a shard's images (and > 10) is unreadable
    verify: bool = True  # re-read every shard at the end
    run: RunConfig = field(default_factory=RunConfig)
    decode_batch: int = 8  # images per Ray decode task
    num_workers: int = 0  # decode worker processes of an in-process run
    tracking_uri: Optional[str] = None  # None = $MLFLOW_TRACKING_URI or <out>/mlflow.db; "" = no MLflow


@dataclass
class SampleJobConfig(StageConfig):
    """Sampling (``jobs/sample.py``): class-conditional images from a GPT + tokenizer, ADM npz + grid."""

    REQUIRED: ClassVar[Tuple[str, ...]] = ("gpt", "tokenizer", "out")  # paths a run cannot go without
    INPUTS: ClassVar[Tuple[str, ...]] = ()  # (the checkpoint files are checked by their own loader's sentences)
    OUTPUTS: ClassVar[Tuple[str, ...]] = ("out",)

    preset: str = "paper"
    gpt: str = ""  # our export, a LlamaGen c2i file or the authors' release GPT checkpoint
    tokenizer: str = ""
    out: str = ""  # folder of samples.npz and grid.png (must not hold them)
    sample: SampleConfig = field(default_factory=SampleConfig)
    classes: Tuple[int, ...] = ()  # class ids; () = every class of the GPT
    run: RunConfig = field(default_factory=RunConfig)
    tracking_uri: Optional[str] = ""  # "" = no MLflow; None = $MLFLOW_TRACKING_URI or <out>/mlflow.db


@dataclass
class ReconEvalConfig(StageConfig):
    """Reconstruction metrics of a tokenizer (``jobs/evaluate.py recon``): rFID/sFID/precision/recall (+ rIS),
    PSNR, SSIM, codebook usage and entropy, zero-shot and linear-probe accuracy."""

    REQUIRED: ClassVar[Tuple[str, ...]] = ("tokenizer", "data.root", "out")  # paths a run cannot go without
    INPUTS: ClassVar[Tuple[str, ...]] = ("data.root", "data.labels_file", "data.class_index", "fid.inception_weights")
    OUTPUTS: ClassVar[Tuple[str, ...]] = ("out", "fid.cache_dir")  # (the reference statistics' cache)

    preset: str = "paper"
    tokenizer: str = ""
    out: str = ""  # folder of result.json, per_class.csv and grid.png (must not hold a result.json)
    data: SourceConfig = field(default_factory=lambda: SourceConfig(split="val"))
    num_images: Optional[int] = None  # an evenly spaced subset; None = the whole split
    batch_size: int = 32  # images per actor call
    run: RunConfig = field(default_factory=lambda: RunConfig(decode_actors=2))
    zero_shot: bool = True  # zero-shot top-1/5 (backbones with a text tower)
    probe_train_images: int = 0  # linear probe trained on this many evenly spaced probe_split images; 0 = off
    probe_split: str = "train"
    grid: bool = True  # grid.png of real over reconstructed images
    fid: FIDConfig = field(default_factory=FIDConfig)
    tracking_uri: Optional[str] = None  # None = $MLFLOW_TRACKING_URI or <out>/mlflow.db; "" = no MLflow


@dataclass
class GenEvalConfig(StageConfig):
    """Generation metrics of an ADM samples npz (``jobs/evaluate.py gen``): gFID/sFID/precision/recall (+ IS) and
    the class accuracy of the samples."""

    REQUIRED: ClassVar[Tuple[str, ...]] = ("samples", "reference", "out")  # paths a run cannot go without
    INPUTS: ClassVar[Tuple[str, ...]] = ("samples", "reference", "classifier.data", "fid.inception_weights")
    OUTPUTS: ClassVar[Tuple[str, ...]] = ("out", "fid.cache_dir")  # (the reference statistics' cache)

    preset: str = "paper"
    samples: str = ""  # samples.npz of jobs/sample.py (arr_0 uint8 N x H x W x 3)
    reference: str = ""  # ADM reference batch (VIRTUAL_imagenet256_labeled.npz) or a folder of reference images
    out: str = ""  # folder of result.json (must not hold one)
    device: str = "auto"  # this process: auto (its GPU if it has one) | cpu | cuda | cuda:N
    fid: FIDConfig = field(default_factory=FIDConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    tracking_uri: Optional[str] = None  # None = $MLFLOW_TRACKING_URI or <out>/mlflow.db; "" = no MLflow


@dataclass
class CfgSweepConfig(StageConfig):
    """A CFG sweep on Ray Tune (``jobs/sweep_cfg.py``): one trial per combination of the swept values, each
    sampling ``sample.per_class`` images per class and scoring them (gFID ... + class accuracy)."""

    REQUIRED: ClassVar[Tuple[str, ...]] = ("gpt", "tokenizer", "reference")  # paths a run cannot go without
    INPUTS: ClassVar[Tuple[str, ...]] = ("reference", "classifier.data", "fid.inception_weights")
    OUTPUTS: ClassVar[Tuple[str, ...]] = ("storage_path", "fid.cache_dir")

    preset: str = "paper"
    name: str = "cfg"  # the sweep's folder under storage_path; a rerun of the same name resumes it
    storage_path: str = "runs/sweeps"
    gpt: str = ""
    tokenizer: str = ""
    reference: str = ""  # ADM reference npz or a folder of reference images
    cfg_scales: Tuple[float, ...] = (1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0)
    cfg_intervals: Tuple[float, ...] = ()  # start,end pairs to sweep, flattened (0,1,0.5,1); () = sample.cfg_interval
    temperatures: Tuple[float, ...] = ()  # () = sample.temperature
    top_ks: Tuple[int, ...] = ()  # () = sample.top_k
    sample: SampleConfig = field(default_factory=SampleConfig)  # every trial's settings but the swept ones
    classes: Tuple[int, ...] = ()  # () = every class of the GPT
    precision: str = "auto"  # GPT dtype: auto (bf16 on CUDA) | bf16 | fp32
    gpus_per_trial: Optional[float] = None  # GPU share per trial (fractions share a GPU); None = 1 with GPUs, else 0
    cpus_per_trial: float = 1.0
    max_concurrent_trials: Optional[int] = None
    fid: FIDConfig = field(default_factory=FIDConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    tracking_uri: Optional[str] = None  # None = $MLFLOW_TRACKING_URI or <storage_path>/<name>/mlflow.db
    experiment: str = "ideal-sweep-cfg"
    verbose: int = 1  # 0 = no Tune progress table, no trial logs


@dataclass
class AblationSweepConfig(StageConfig):
    """The paper's ablations on Ray Tune (``jobs/sweep_ablation.py``): each trial trains the tokenizer preset
    ``train_preset+variant`` for a step budget and evaluates it."""

    REQUIRED: ClassVar[Tuple[str, ...]] = ()  # paths a run cannot go without
    OUTPUTS: ClassVar[Tuple[str, ...]] = ("storage_path", "fid_cache_dir")
    INPUTS: ClassVar[Tuple[str, ...]] = ("inception_weights",)

    preset: str = "paper"
    name: str = "ablation"  # the sweep's folder under storage_path; a rerun of the same name resumes it
    storage_path: str = "runs/sweeps"
    train_preset: str = "paper"  # every trial's base tokenizer preset
    train_overrides: Tuple[str, ...] = ()  # a.b=c overrides of every trial's training config (train.a.b=c on the CLI)
    study: str = "fusion"  # fusion | shallow-align | backbone | layer | custom
    variants: Tuple[str, ...] = ()  # the custom study's variants (v or v1+v2 of config.ABLATIONS)
    steps: Optional[int] = None  # every trial's step budget; None = the preset's schedule
    scheduler: str = "grid"  # grid | asha
    asha_metric: str = "train_rec_mse"
    asha_mode: str = "min"
    grace_period: Optional[int] = None  # ASHA grace (steps); None = budget // reduction_factor**2, >= log_every
    reduction_factor: int = 3
    workers_per_trial: int = 1  # Ray Train workers per trial
    gpus_per_worker: int = 0
    max_concurrent_trials: Optional[int] = None  # None = as many as the cluster holds
    max_failures: int = 0  # retries of a failed trial
    eval_images: Optional[int] = None  # evenly spaced val images; None = all
    eval_batch_size: int = 32
    decode_actors: int = 1
    probe_train_images: Optional[int] = None  # None = 10000 for single-layer variants, else 0
    zero_shot: bool = False
    inception_weights: str = ""
    fid_cache_dir: str = ""
    tracking_uri: Optional[str] = None  # None = $MLFLOW_TRACKING_URI or <storage_path>/<name>/mlflow.db


@dataclass
class PipelineConfig(StageConfig):
    """The chain's settings beside the tokenizer config (``jobs/pipeline.py``): the AR preset and overrides, and
    each offline stage's config. The paths one stage hands the next (exports, shards, samples) and the run folder's
    outputs are filled in by the chain; ``gen.reference`` (default ``<data.root>/val``), ``gen.fid.cache_dir``
    (default ``<run>/fid_refs``) and the data roots (default the tokenizer's ``data.root``) may be set here.
    ``sweep.cfg_scales`` empty: no sweep stage."""

    preset: str = "paper"
    ar_preset: str = "ar-B"
    ar_overrides: Tuple[str, ...] = ()  # a.b=c overrides of the AR config (ar.a.b=c on the pipeline's command line)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    sampling: SampleJobConfig = field(default_factory=SampleJobConfig)
    recon: ReconEvalConfig = field(default_factory=ReconEvalConfig)
    gen: GenEvalConfig = field(default_factory=GenEvalConfig)
    sweep: CfgSweepConfig = field(default_factory=CfgSweepConfig)


# ------------------------------------------------------------------------------------------- helpers
def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
