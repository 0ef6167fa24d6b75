"""The AR stage's input checks. The stage itself runs end to end (token shards -> 2 CPU workers on Ray Train +
DeepSpeed -> GPT export, loss falling from log(vocab)) inside the submitted pipeline job of test_cluster_job.py."""
import pytest

from ideal_ray.config import ConfigError, load_ar_config


def test_missing_shards_are_a_clear_error(tmp_path):
    from ideal_ray.data.tokens import check_shards

    with pytest.raises(ConfigError, match="jobs/extract_tokens.py"):
        check_shards(load_ar_config("ar-tiny", [f"data.shards={tmp_path}"]))
