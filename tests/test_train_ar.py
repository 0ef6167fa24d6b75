"""The AR stage end to end at tiny scale: token shards -> 2 CPU workers on Ray Train + DeepSpeed -> GPT export."""
import math
import os

import pytest
import torch

from ideal_ray.checkpoint import save_inference_checkpoint
from ideal_ray.config import ConfigError, load_ar_config, load_config
from ideal_ray.data.synthetic import make_synthetic_imagenet
from ideal_ray.models.tokenizer import IdealTokenizer
from ideal_ray.pipelines.extract_local import extract_tokens_local
from ideal_ray.tracking import find_runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("ar")
    make_synthetic_imagenet(str(root / "data"), num_classes=4, train_per_class=8, val_per_class=1, size=72, seed=0)
    tcfg = load_config("tiny")
    torch.manual_seed(0)
    tok_path = save_inference_checkpoint(str(root / "tok.pt"), IdealTokenizer(tcfg.model).eval(), tcfg)
    extract_tokens_local(tok_path, str(root / "data"), str(root / "tokens"), views="release", batch_size=16)
    return root


def test_missing_shards_are_a_clear_error(tmp_path):
    from ideal_ray.train.ar_stage import check_shards

    with pytest.raises(ConfigError, match="jobs/extract_tokens.py"):
        check_shards(load_ar_config("ar-tiny", [f"data.shards={tmp_path}"]))


def test_two_worker_ar_run_learns_and_exports(shards):
    import ray

    from ideal_ray.train.ar_stage import load_gpt, train_ar

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    try:
        cfg = load_ar_config("ar-tiny", [f"data.shards={shards / 'tokens'}", f"dist.storage_path={shards / 'runs'}",
                                         f"output_dir={shards / 'runs'}", "schedule.steps=40",
                                         "schedule.log_every=1", "schedule.ckpt_every=20", "model.num_classes=4"])
        result = train_ar(cfg, log=lambda line: None)
    finally:
        ray.shutdown()
    assert result["steps"] == 40
    run = find_runs(result["tracking_uri"], "ideal-ar")[0]
    import mlflow

    losses = [m.value for m in mlflow.MlflowClient(result["tracking_uri"]).get_metric_history(run["run_id"], "loss")]
    assert losses[0] == pytest.approx(math.log(256), abs=0.3)  # zero-init head: uniform over the codebook
    assert losses[-1] < losses[0] - 0.5, losses
    gpt = load_gpt(result["export"])  # weights_only=True inside
    logits = gpt(torch.zeros(2, 64, dtype=torch.long), torch.tensor([0, 1]))
    assert logits.shape == (2, 64, 256) and torch.isfinite(logits).all()
    assert os.path.basename(result["export"]) == "gpt_step40.pt"
