"""Config presets, ablation variants, overrides and one-sentence validation errors."""
import dataclasses

import pytest

from ideal_ray.config import (ABLATIONS, STAGE_PRESETS, ConfigError, TokenizerTrainConfig, apply_overrides, from_dict,
                              load_config, load_stage_config, preset_names)


def test_paper_preset_has_spec_values():
    c = load_config("paper")
    v = c.model.vfm
    assert (v.model_name, v.image_size, v.patch_size, v.width, v.depth) == ("ViT-L-16-SigLIP2-384", 384, 16, 1024, 24)
    assert (v.shallow_layer, v.deep_layer) == (8, 24) and v.grid == 24
    assert c.model.quantizer.codebook_size == 16384 and c.model.quantizer.dim == 64
    assert c.model.fusion.mode == "attention" and c.model.fusion.heads == 8
    assert c.model.pixel_decoder.ch_mult == (1, 1, 2, 2, 4)
    assert c.loss.disc_start == 20000 and c.loss.cr_weight == 4.0 and c.loss.lecam_weight == 0.001
    assert c.optim.betas == (0.9, 0.95) and c.optim.ema_decay == 0.9999 and c.data.global_batch == 256


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_and_variant_validates(name):
    load_config(name)


def test_ablations_change_what_they_name():
    assert load_config("paper+fusion-linear").model.fusion.mode == "linear"
    assert load_config("paper+fusion-none").model.fusion.mode == "none"
    assert load_config("paper+shallow-align-off").loss.shallow_align is False
    d2 = load_config("paper+backbone-dinov2").model.vfm
    assert d2.backbone == "dinov2" and d2.grid == 24 and d2.mean[0] == pytest.approx(0.485)
    assert load_config("paper+backbone-dinov3").model.vfm.grid == 24
    lp = load_config("paper+layer-12")
    assert lp.model.vfm.single_layer and lp.model.vfm.deep_layer == 12 and lp.model.fusion.mode == "none"
    assert not lp.loss.shallow_align
    both = load_config("tiny+fusion-none+shallow-align-off")
    assert both.model.fusion.mode == "none" and not both.loss.shallow_align
    assert set(ABLATIONS) >= {"fusion-attention", "fusion-linear", "fusion-none", "backbone-dinov2", "layer-8"}


def test_overrides_are_typed():
    c = load_config("tiny", ["optim.lr=2e-4", "model.fusion.mode=linear", "loss.diffaug=false",
                             "model.pixel_decoder.ch_mult=1,1,2", "optim.betas=0.8,0.9", "data.root=/x/y"])
    assert c.optim.lr == 2e-4 and isinstance(c.optim.lr, float)
    assert c.model.fusion.mode == "linear" and c.loss.diffaug is False
    assert c.model.pixel_decoder.ch_mult == (1, 1, 2) and c.optim.betas == (0.8, 0.9)
    assert c.data.root == "/x/y"


def test_overrides_do_not_touch_the_input():
    base = load_config("tiny")
    apply_overrides(base, ["optim.lr=5.0"])
    assert base.optim.lr != 5.0


@pytest.mark.parametrize("overrides, fragment", [
    (["model.vfm.deep_layer=30"], "beyond the backbone's depth"),
    (["model.vfm.shallow_layer=9"], "beyond the backbone's depth"),
    (["model.vfm.shallow_layer=4", "model.vfm.deep_layer=3"], "must come before"),
    (["model.quantizer.dim=128"], "model.quantizer.dim 128"),
    (["model.fusion.mode=cross"], "model.fusion.mode 'cross' is unknown"),
    (["model.vfm.backbone=clip"], "model.vfm.backbone 'clip' is unknown"),
    (["model.quantizer.codebook_size=70000"], "uint16"),
    (["model.pixel_decoder.ch_mult=1,2"], "upsamples"),
    (["discriminator.tap_blocks=0,9"], "tap_blocks"),
    (["model.vfm.single_layer=true"], "model.fusion.mode=none"),
    (["optim.precision=fp8"], "optim.precision"),
    (["data.resize_min=16"], "data.resize_min"),
    (["optim.lr=abc"], "needs a number"),
    (["loss.diffaug=maybe"], "needs a boolean"),
    (["optim.betas=0.9"], "exactly 2"),
    (["model.nope=1"], "has no field 'nope'"),
    (["model=1"], "names a section"),
    (["optim.lr"], "not of the form"),
    (["data.global_batch=9"], "does not divide evenly over dist.num_workers 2"),
    (["dist.zero_stage=3"], "dist.zero_stage 3"),
])
def test_validation_errors_are_one_clear_sentence(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    msg = str(e.value)
    assert fragment in msg
    assert msg.endswith(".") and "\n" not in msg


def test_unknown_preset_and_variant():
    with pytest.raises(ConfigError, match="Unknown preset"):
        load_config("huge")
    with pytest.raises(ConfigError, match="Unknown ablation"):
        load_config("paper+fusion-cubic")


def test_round_trip_through_dict():
    c = load_config("paper+fusion-linear")
    again = from_dict(TokenizerTrainConfig, dataclasses.asdict(c))
    assert again == c


# ---- the AR stage ------------------------------------------------------------------------------------------
def test_ar_presets_follow_the_spec():
    from ideal_ray.config import load_ar_config

    b, l_, xxl, b3 = (load_ar_config(f"ar-{s}") for s in ("B", "L", "XXL", "3B"))
    assert (b.model.n_layer, b.model.n_head, b.model.dim) == (12, 12, 768)
    assert (b3.model.n_layer, b3.model.n_head, b3.model.dim) == (24, 32, 3200)
    assert [c.data.global_batch for c in (b, l_, xxl, b3)] == [512, 512, 256, 128]
    assert [c.optim.epochs for c in (b, l_, xxl, b3)] == [300, 300, 200, 200]
    assert [c.dist.zero_stage for c in (b, l_, xxl, b3)] == [1, 1, 2, 2]
    assert b.optim.lr == 1e-4 and b.optim.lr_schedule == "constant" and b.optim.base_batch == 0
    assert b.model.vocab_size == 16384 and b.model.num_tokens == 576 and b.model.class_dropout == 0.1


@pytest.mark.parametrize("overrides, fragment", [
    (["model.n_head=7"], "does not divide model.dim"),
    (["data.global_batch=9"], "does not divide evenly"),
    (["dist.zero_stage=3"], "dist.zero_stage 3"),
    (["model.token_dropout=1.5"], "model.token_dropout"),
    (["optim.lr_schedule=step"], "optim.lr_schedule 'step'"),
])
def test_ar_validation_errors(overrides, fragment):
    from ideal_ray.config import load_ar_config

    with pytest.raises(ConfigError, match=fragment):
        load_ar_config("ar-tiny", overrides)
    with pytest.raises(ConfigError, match="Unknown AR preset"):
        load_ar_config("ar-huge")


# ---- every bad value gets one sentence (issue 16) ------------------------------------------------------------
def _one_sentence(e: ConfigError, *fragments: str) -> str:
    msg = str(e)
    for f in fragments:
        assert f in msg, (f, msg)
    assert msg.endswith(".") and "\n" not in msg and "Traceback" not in msg, msg
    return msg


def _float_fields(node, prefix=""):
    """(dotted key, value) of every float or tuple-of-floats field of a (nested) config."""
    for f in dataclasses.fields(node):
        v = getattr(node, f.name)
        if dataclasses.is_dataclass(v):
            yield from _float_fields(v, f"{prefix}{f.name}.")
        elif isinstance(v, float) or (isinstance(v, tuple) and v and all(isinstance(x, float) for x in v)):
            yield f"{prefix}{f.name}", v


def _set_all(key, like, text):
    """An override setting ``key`` (a float or a tuple of floats shaped like ``like``) to ``text`` everywhere."""
    return f"{key}={','.join([text] * len(like)) if isinstance(like, tuple) else text}"


CAN_BE_NEGATIVE = {"model.vfm.mean"}  # pixels are centred by it: any finite value


def _loaders():
    from ideal_ray.config import SampleConfig, apply_overrides, load_ar_config, validate_sample

    def sample(overrides):
        validate_sample(apply_overrides(SampleConfig(), overrides))

    stages = {cls.__name__: (lambda o, cls=cls: load_stage_config(cls, "tiny", o, complete=False))
              for cls in STAGE_PRESETS}
    return {"tiny": lambda o: load_config("tiny", o), "paper": lambda o: load_config("paper", o),
            "ar-tiny": lambda o: load_ar_config("ar-tiny", o), "sample": sample, **stages}


def _defaults(stage):
    from ideal_ray.config import SampleConfig, load_ar_config

    if stage in {cls.__name__ for cls in STAGE_PRESETS}:
        return _loaders()[stage]([])
    return {"tiny": lambda: load_config("tiny"), "paper": lambda: load_config("paper"),
            "ar-tiny": lambda: load_ar_config("ar-tiny"), "sample": SampleConfig}[stage]()


# float fields at least: the training stages' many, sampling's 4, extraction's skip fraction ...
MIN_FLOATS = {"tiny": 15, "paper": 15, "ar-tiny": 15, "sample": 4, "ExtractConfig": 1, "SampleJobConfig": 4,
              "ReconEvalConfig": 0, "GenEvalConfig": 0, "CfgSweepConfig": 6, "AblationSweepConfig": 0,
              "PipelineConfig": 11}


@pytest.mark.parametrize("stage", list(MIN_FLOATS))
def test_every_float_field_refuses_inf_nan_and_negatives(stage):
    """A property over every float field of each stage's config: inf, -inf and NaN are refused naming the key and
    the value, and so is -1 wherever a negative means nothing (all but the pixel mean)."""
    load = _loaders()[stage]
    fields = list(_float_fields(_defaults(stage)))
    assert len(fields) >= MIN_FLOATS[stage]
    for key, like in fields:
        for text in ("inf", "-inf", "nan"):
            with pytest.raises(ConfigError) as e:
                load([_set_all(key, like, text)])
            _one_sentence(e.value, f"{key}=", "not a finite number")
        if key not in CAN_BE_NEGATIVE:
            with pytest.raises(ConfigError) as e:
                load([_set_all(key, like, "-1")])
            _one_sentence(e.value, f"{key}=")


@pytest.mark.parametrize("overrides, fragment", [
    (["optim.lr=inf"], "optim.lr=inf is not a finite number"),
    (["optim.lr=nan"], "optim.lr=nan is not a finite number"),
    (["optim.lr=-1e-4"], "optim.lr=-0.0001 must be positive"),
    (["optim.lr=0"], "optim.lr=0.0 must be positive"),
    (["loss.recon_weight=-1"], "loss.recon_weight=-1.0 cannot be negative"),
    (["loss.adv_weight=nan"], "loss.adv_weight=nan is not a finite number"),
    (["loss.lecam_weight=-0.5"], "loss.lecam_weight=-0.5 cannot be negative"),
    (["model.quantizer.commitment_weight=-0.25"], "model.quantizer.commitment_weight=-0.25 cannot be negative"),
    (["optim.betas=0.9,1.0"], "optim.betas=0.9,1.0 must be two values in [0, 1)"),
    (["optim.grad_clip=inf"], "optim.grad_clip=inf"),
    (["optim.ema_decay=nan"], "optim.ema_decay=nan"),
    (["optim.weight_decay=-0.05"], "optim.weight_decay=-0.05 cannot be negative"),
    (["model.fusion.dropout=-0.1"], "model.fusion.dropout=-0.1 must be in [0, 1)"),
    (["model.vfm.std=0.5,0,0.5"], "model.vfm.std=0.5,0.0,0.5 must be positive"),
    (["model.vfm.patch_size=0"], "model.vfm.patch_size=0 must be at least 1"),  # was a ZeroDivisionError
    (["model.fusion.heads=0"], "model.fusion.heads=0 must be at least 1"),  # was a ZeroDivisionError
    (["name="], "name is empty"),
    (["name=../.."], "name=../.. is not a single folder name"),
    (["name=.."], "name=.. is not a single folder name"),
    (["name=."], "name=. is not a single folder name"),
    (["name=a/b"], "name=a/b is not a single folder name"),
    (["name=a\\b"], "is not a single folder name"),
    (["output_dir="], "output_dir is empty"),
    (["output_dir=s3://bucket/runs"], "output_dir=s3://bucket/runs is an object-store URI, but the run's exports, log and MLflow store are written there as files"),  # was a local folder named s3:
    (["data.root="], "data.root is empty"),
    (["data.root=  "], "data.root is empty"),
    (["optim.epochs=0", "optim.warmup_epochs=0", "schedule.steps=0"], "give a run of no steps"),
    (["optim.seed=-1"], "optim.seed=-1 cannot be negative"),
])
def test_tokenizer_refusals_name_key_and_value(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    _one_sentence(e.value, fragment)


@pytest.mark.parametrize("overrides, fragment", [
    (["optim.lr=inf"], "optim.lr=inf is not a finite number"),
    (["optim.lr=-1"], "optim.lr=-1.0 must be positive"),
    (["optim.betas=0.9,-0.1"], "optim.betas=0.9,-0.1"),
    (["optim.grad_clip=-1"], "optim.grad_clip=-1.0 cannot be negative"),
    (["model.rope_base=nan"], "model.rope_base=nan"),
    (["model.class_dropout=inf"], "model.class_dropout=inf"),
    (["model.n_head=0"], "model.n_head=0 must be at least 1"),  # was a ZeroDivisionError
    (["dist.num_workers=0"], "dist.num_workers=0 must be at least 1"),  # was a ZeroDivisionError
    (["schedule.log_every=0"], "schedule.log_every=0 must be at least 1"),  # AR did not check it
    (["dist.max_bad_steps=0"], "dist.max_bad_steps=0 must be at least 1"),  # nor this (the tokenizer did)
    (["name=../x"], "name=../x is not a single folder name"),
    (["name="], "name is empty"),
    (["output_dir="], "output_dir is empty"),
    (["output_dir=gs://bucket/runs"], "output_dir=gs://bucket/runs is an object-store URI, but the run's exports, log and MLflow store are written there as files"),
    (["data.shards="], "data.shards is empty"),
])
def test_ar_refusals_name_key_and_value(overrides, fragment):
    from ideal_ray.config import load_ar_config

    with pytest.raises(ConfigError) as e:
        load_ar_config("ar-tiny", overrides)
    _one_sentence(e.value, fragment)


def test_ar_constant_schedule_ignores_min_lr():
    """min_lr shapes only the cosine: a constant-schedule GPT may train below the cosine's default floor."""
    from ideal_ray.config import load_ar_config

    assert load_ar_config("ar-tiny", ["optim.lr=1e-6"]).optim.lr == 1e-6
    with pytest.raises(ConfigError, match="optim.min_lr=1e-05 is above the peak"):
        load_ar_config("ar-tiny", ["optim.lr=1e-6", "optim.lr_schedule=cosine"])


@pytest.mark.parametrize("fields, fragment", [
    (dict(cfg_scale=float("inf")), "cfg_scale=inf is not a finite number"),
    (dict(cfg_scale=-1.0), "cfg_scale=-1.0 cannot be negative"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(top_p=0.0), "top_p"),
    (dict(cfg_interval=(0.5, 0.2)), "cfg_interval"),
    (dict(cfg_interval=(0.5,)), "cfg_interval"),
    (dict(per_class=0), "per_class=0 must be at least 1"),
    (dict(batch_size=0), "batch_size=0 must be at least 1"),
    (dict(seed=-1), "seed=-1 cannot be negative"),
])
def test_sample_config_refusals(fields, fragment):
    from ideal_ray.config import SampleConfig, validate_sample

    validate_sample(SampleConfig())
    with pytest.raises(ConfigError) as e:
        validate_sample(SampleConfig(**fields))
    _one_sentence(e.value, fragment)


# ---- the offline stages' configs: presets, overrides, one sentence per wrong value --------------------------------
@pytest.mark.parametrize("cls", list(STAGE_PRESETS), ids=lambda c: c.__name__)
def test_every_offline_stage_has_a_tiny_and_a_paper_preset_the_pipeline_shares(cls):
    from ideal_ray.config import PIPELINE_STAGES, PipelineConfig

    for scale in ("tiny", "paper"):
        cfg = load_stage_config(cls, scale, complete=False)
        assert cfg.preset == scale
        if cls is not PipelineConfig:  # ... and the chain runs every stage at the preset of its scale
            key = [k for k, c in PIPELINE_STAGES.items() if c is cls]
            if key:
                assert getattr(load_stage_config(PipelineConfig, scale, complete=False), key[0]) == cfg
    with pytest.raises(ConfigError) as e:
        load_stage_config(cls, "huge")
    _one_sentence(e.value, "preset 'huge'; choose one of ['paper', 'tiny']")


def test_a_job_without_its_paths_is_told_which_one():
    from ideal_ray.config import ExtractConfig

    with pytest.raises(ConfigError) as e:
        load_stage_config(ExtractConfig, "tiny", ["tokenizer=t.pt"])
    _one_sentence(e.value, "data.root is empty; pass data.root=PATH")
    cfg = load_stage_config(ExtractConfig, "tiny", ["tokenizer=t.pt", "data.root=d", "out=o"])
    assert (cfg.tokenizer, cfg.data.root, cfg.out, cfg.views) == ("t.pt", "d", "o", "release")


@pytest.mark.parametrize("cls, overrides, fragment", [
    ("ExtractConfig", ["views=tencrop"], "views 'tencrop' is unknown; choose one of ('llamagen', 'release')"),
    ("ExtractConfig", ["data.format=zip"], "data.format 'zip' is unknown"),
    ("ExtractConfig", ["run.device=gpu"], "run.device=gpu is not a device"),
    ("ExtractConfig", ["run.device=cpu", "run.precision=bf16"], "run.precision=bf16 runs on CUDA only"),
    ("ExtractConfig", ["max_skip_fraction=1.5"], "max_skip_fraction=1.5 must be in [0, 1]"),
    ("ExtractConfig", ["shard_images=0"], "shard_images=0 must be at least 1"),
    ("ExtractConfig", ["run.num_actors=0"], "run.num_actors=0 must be at least 1"),
    ("ExtractConfig", ["data.split="], "data.split is empty"),
    ("SampleJobConfig", ["sample.top_k=-1"], "sample.top_k=-1 is negative"),
    ("SampleJobConfig", ["classes=1,1"], "classes=1,1 names a class twice"),
    ("ReconEvalConfig", ["num_images=0"], "num_images=0 must be at least 1"),
    ("ReconEvalConfig", ["fid.batch_size=0"], "fid.batch_size=0 must be at least 1"),
    ("GenEvalConfig", ["classifier.kind=svm"], "classifier.kind 'svm' is unknown; choose one of ('probe', 'cnn')"),
    ("GenEvalConfig", ["device=tpu"], "device=tpu is not a device"),
    ("CfgSweepConfig", ["cfg_scales="], "cfg_scales is empty; give the scales to sweep"),
    ("CfgSweepConfig", ["cfg_intervals=0,1,0.5"], "cfg_intervals=0.0,1.0,0.5 must be start,end pairs"),
    ("CfgSweepConfig", ["name=a/b"], "name=a/b is not a single folder name"),
    ("CfgSweepConfig", ["top_ks=5,-1"], "top_ks=5,-1 has a negative value"),
    ("AblationSweepConfig", ["study=depth"], "study 'depth' is unknown"),
    ("AblationSweepConfig", ["study=custom"], "study=custom needs variants"),
    ("AblationSweepConfig", ["study=custom", "variants=fusion-linear+nope"], "has unknown part 'nope'"),
    ("AblationSweepConfig", ["variants=fusion-linear"], "study 'fusion' has fixed variants"),
    ("AblationSweepConfig", ["scheduler=pbt"], "scheduler 'pbt' is unknown"),
    ("AblationSweepConfig", ["train_preset=huge"], "train_preset 'huge' is unknown"),
    ("PipelineConfig", ["ar_preset=ar-XL"], "ar_preset 'ar-XL' is unknown"),
    ("PipelineConfig", ["extract.views=x"], "extract.views 'x' is unknown"),
    ("PipelineConfig", ["sweep.cfg_intervals=1,0"], "sweep.cfg_intervals=1.0,0.0 must be start,end pairs"),
    # outputs written as local files: a URI would have become a local folder named s3: (extraction's out may be one)
    ("SampleJobConfig", ["out=s3://b/samples"], "out=s3://b/samples is an object-store URI, but this stage writes out as local files"),
    ("ReconEvalConfig", ["fid.cache_dir=s3://b/refs"], "fid.cache_dir=s3://b/refs is an object-store URI, but this stage writes fid.cache_dir"),
    ("GenEvalConfig", ["out=s3://b/eval"], "out=s3://b/eval is an object-store URI, but this stage writes out"),
    ("CfgSweepConfig", ["storage_path=s3://b/sweeps"], "storage_path=s3://b/sweeps is an object-store URI, but this stage writes storage_path"),
    ("AblationSweepConfig", ["fid_cache_dir=gs://b/refs"], "fid_cache_dir=gs://b/refs is an object-store URI, but this stage writes fid_cache_dir"),
    ("PipelineConfig", ["gen.fid.cache_dir=s3://b/refs"], "gen.fid.cache_dir=s3://b/refs is an object-store URI, but this stage writes fid.cache_dir"),
])
def test_offline_stage_refusals_name_key_and_value(cls, overrides, fragment):
    import ideal_ray.config as c

    with pytest.raises(ConfigError) as e:
        load_stage_config(getattr(c, cls), "tiny", overrides, complete=False)
    _one_sentence(e.value, fragment)


def test_extraction_writes_its_shards_to_an_object_store():
    import ideal_ray.config as c

    assert load_stage_config(c.ExtractConfig, "tiny", ["out=s3://b/tokens"], complete=False).out == "s3://b/tokens"


@pytest.mark.parametrize("override, fragment", [
    ("optim.lr=abc", "Override optim.lr=abc needs a number, e.g. optim.lr=0.001"),
    ("data.global_batch=1.5", "Override data.global_batch=1.5 needs an integer, e.g. data.global_batch=8"),
    ("model.unknown=1", "Override key 'model.unknown' is unknown: model has no field 'unknown'"),
    ("optim.lrr=1e-4", "optim has no field 'lrr' (fields: lr, "),
    ("optim.betas=0.9,abc", "Override optim.betas=0.9,abc needs comma-separated numbers, e.g. optim.betas=0.9,0.95"),
    ("model.pixel_decoder.ch_mult=1,x", "needs comma-separated integers, e.g. model.pixel_decoder.ch_mult=1,2,2"),
    ("loss.diffaug=2", "needs a boolean"),
])
def test_an_override_that_does_not_parse_is_one_sentence(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    _one_sentence(e.value, fragment)
    if override.startswith("optim.lrr"):
        assert str(e.value).endswith("the closest is optim.lr.")


def test_config_and_cli_import_no_torch():
    import subprocess
    import sys

    code = ("import sys, ideal_ray.cli, ideal_ray.config; "
            "print(sorted({'torch', 'ray', 'deepspeed', 'numpy'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


# ---- the jobs refuse before anything heavy: a bad value, an unusable output folder -----------------------------
REPO = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))


def _tree(root):
    import os

    return sorted(os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs)


@pytest.mark.parametrize("job, args, fragment", [
    ("train_tokenizer.py", ["--in-process", "--preset", "tiny", "output_dir={file}"],
     "output_dir={file} cannot hold the run folder {file}/ideal-tokenizer-tiny: {file} exists and is not a folder"),
    ("train_tokenizer.py", ["--preset", "tiny", "output_dir={tmp}", "name=taken"],
     "the run folder {tmp}/taken (output_dir/name) exists and is not a folder"),
    ("train_tokenizer.py", ["--preset", "tiny", "dist.storage_path={file}/sub"],
     "dist.storage_path={file}/sub cannot hold the run folder"),
    ("train_tokenizer.py", ["--preset", "tiny", "optim.lr=inf"], "optim.lr=inf is not a finite number"),
    ("train_tokenizer.py", ["--in-process", "--preset", "tiny", "name=../.."], "name=../.. is not a single folder"),
    ("train_ar.py", ["optim.lr=inf"], "optim.lr=inf is not a finite number"),
    ("extract_tokens.py", ["--preset", "tiny", "views=five"], "views 'five' is unknown"),
    ("extract_tokens.py", ["--data-root", "{tmp}", "--out", "{tmp}/o"],
     "tokenizer is not set; pass --tokenizer PATH (or tokenizer=PATH)"),
    ("sample.py", ["sample.top_p=0"], "sample.top_p=0.0 must be in (0, 1]"),
    ("evaluate.py", ["recon", "num_images=0"], "num_images=0 must be at least 1"),
    ("evaluate.py", ["gen", "--preset", "tiny", "classifier.kind=svm"], "classifier.kind 'svm' is unknown"),
    ("sweep_cfg.py", ["cfg_intervals=0,1,0.5"], "cfg_intervals=0.0,1.0,0.5 must be start,end pairs"),
    ("sweep_ablation.py", ["--study", "custom"], "study=custom needs variants"),
    ("pipeline.py", ["sweep.top_ks=-1"], "sweep.top_ks=-1 has a negative value"),
    ("sample.py", ["--out", "s3://bucket/samples"], "out=s3://bucket/samples is an object-store URI"),
    ("extract_tokens.py", ["--preset", "tiny", "--data-root", "{tmp}", "--tokenizer", "{file}", "--out", "{file}"],
     "--out={file} exists and is not a folder; pass a folder"),  # was a traceback (exit 1)
    ("sample.py", ["--gpt", "{file}", "--tokenizer", "{file}", "--out", "{file}/samples"],
     "--out={file}/samples cannot be made: {file} exists and is not a folder"),
    ("pipeline.py", ["gen.fid.cache_dir=s3://bucket/refs"], "gen.fid.cache_dir=s3://bucket/refs is an object-store"),
])
def test_a_job_refuses_in_one_sentence_before_anything_heavy(tmp_path, job, args, fragment):
    """A real job in a subprocess: exit code 2, one sentence on stderr, no traceback, nothing created (the job runs
    in an empty folder where the tiny preset's relative runs/ and data/synthetic would otherwise appear)."""
    import subprocess
    import sys
    import time

    file = tmp_path / "a-file"
    file.write_text("not a folder")
    (tmp_path / "taken").write_text("not a folder")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    fill = dict(file=str(file), tmp=str(tmp_path))
    before = _tree(tmp_path)
    t0 = time.perf_counter()
    args = [a.format(**fill) for a in args]
    p = subprocess.run([sys.executable, f"{REPO}/jobs/{job}", *args],
                       capture_output=True, text=True, cwd=cwd, timeout=300)
    took = time.perf_counter() - t0
    print(f"\n{job} {' '.join(args)}: refused in {took:.2f} s: {p.stderr.strip()}")
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("config error: ") and p.stderr.count("\n") == 1, p.stderr
    assert fragment.format(**fill) in p.stderr and "Traceback" not in p.stderr + p.stdout
    assert _tree(tmp_path) == before  # nothing created


def test_an_unwritable_output_folder_is_refused(tmp_path, monkeypatch, capsys):
    """Root may write anywhere, so the permission is faked: the nearest existing ancestor of the run folder is what
    is asked (tmp_path here: output_dir/new/deeper does not exist yet)."""
    import os

    from ideal_ray.cli import require_usable_output

    require_usable_output(str(tmp_path / "new" / "deeper"), "run")  # writable: passes
    asked = []
    monkeypatch.setattr(os, "access", lambda p, mode: asked.append(p) or False)
    with pytest.raises(SystemExit) as e:
        require_usable_output(str(tmp_path / "new" / "deeper"), "run")
    assert e.value.code == 2 and asked == [str(tmp_path)]
    err = capsys.readouterr().err
    assert err == (f"config error: output_dir={tmp_path}/new/deeper cannot hold the run folder "
                   f"{tmp_path}/new/deeper/run: {tmp_path} is not writable by this user; pass a folder you can "
                   f"write to as output_dir.\n")
    assert _tree(tmp_path) == []  # nothing created
