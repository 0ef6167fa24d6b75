"""jobs/bench.py ar-train and sample: run on CPU with the tiny preset and print tables with positive numbers."""
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ideal_ray.checkpoint import to_llamagen_state_dict  # noqa: E402
from jobs.bench import ar_train_flops_per_seq, main  # noqa: E402

GPU_CHECK = os.path.join(os.path.dirname(__file__), "..", "jobs", "gpu_check.sh")

LLAMAGEN = os.path.join(os.path.dirname(__file__), "..", "third_party", "LlamaGen")


def _row(out: str, first_cell: str):
    line = next(ln for ln in out.splitlines() if ln.startswith(f"| {first_cell}"))
    return [c.strip() for c in line.strip("|").split("|")]


def _table(out: str, first_header: str = "variant"):
    header = [c.strip() for c in next(ln for ln in out.splitlines()
                                      if ln.startswith(f"| {first_header}")).strip("|").split("|")]
    return header


def test_ar_train_table_times_the_stage(capsys, local_group):
    """The AR benchmark times ARStage's own step on the DeepSpeed engine, one row per lever variant."""
    main(["ar-train", "--preset", "tiny", "--batch", "4", "--steps", "2", "--warmup", "1", "--device", "cpu",
          "--variants", "base,nan_after"])
    out = capsys.readouterr().out
    header = _table(out)
    for variant, levers in (("base", "-"), ("nan_after", "nan_after")):
        row = dict(zip(header, _row(out, variant)))
        assert row["levers"] == levers and row["engine"] == "deepspeed" and row["ZeRO"] == "1"
        assert float(row["seq/s"]) > 0 and float(row["TFLOP/s"]) > 0 and float(row["MFU %"]) > 0
        assert row["skipped"] == "0"
    assert "ARStage.train_step + EMA" in out
    assert "6 x N_params x T + 12 x layers x width x T^2" in out


def test_tokenizer_table_times_the_stage(capsys, local_group):
    main(["tokenizer", "--preset", "tiny", "--batch", "2", "--steps", "1", "--warmup", "0", "--device", "cpu",
          "--variants", "base", "dist.engine=torch"])
    out = capsys.readouterr().out
    row = dict(zip(_table(out), _row(out, "base")))
    assert row["engine"] == "torch" and float(row["img/s"]) > 0 and float(row["TFLOP/s"]) > 0
    assert "TokenizerStage.train_step + EMA" in out


def test_unknown_variant_is_one_sentence(capsys):
    with pytest.raises(SystemExit) as e:
        main(["ar-train", "--preset", "tiny", "--device", "cpu", "--variants", "fast"])
    assert e.value.code == 2 and "unknown variant 'fast'" in capsys.readouterr().err


def test_flops_formula_matches_performance_note():
    # performance.md: AR-B ~0.42 TFLOP per 576-token sequence
    assert ar_train_flops_per_seq(110_888_448, 12, 768, 576) / 1e12 == pytest.approx(0.42, abs=0.005)


def test_sample_table(capsys):
    main(["sample", "--preset", "tiny", "--batch", "2", "--iters", "1", "--warmup", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    row = _row(out, "ideal_ray Sampler")
    assert float(row[2]) > 0 and float(row[3]) > 0  # tokens/s, images/s


def test_llamagen_names_are_the_loaders_inverse():
    import torch

    from ideal_ray.checkpoint import convert_llamagen_state_dict
    from ideal_ray.config import gpt_config
    from ideal_ray.models.gpt import GPT

    state = GPT(gpt_config("tiny")).state_dict()
    back = convert_llamagen_state_dict(to_llamagen_state_dict(state))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.skipif(not os.path.isfile(os.path.join(LLAMAGEN, "autoregressive", "models", "generate.py")),
                    reason="no local LlamaGen checkout in third_party/LlamaGen")
def test_sample_vs_llamagen(capsys):
    main(["sample", "--preset", "tiny", "--batch", "2", "--iters", "1", "--warmup", "0", "--device", "cpu",
          "--llamagen-dir", LLAMAGEN])
    out = capsys.readouterr().out
    assert float(_row(out, "LlamaGen generate")[3]) > 0
    assert float(re.search(r"equal to LlamaGen's for ([\d.]+)%", out).group(1)) > 99.0
    assert float(re.search(r"speedup over LlamaGen eager generate: ([\d.]+)x", out).group(1)) > 0


def _gpu_check_cases() -> list:
    """The bench.py arguments of every case jobs/gpu_check.sh runs (its ``run LIMIT ARGS...`` lines)."""
    cases = []
    for line in open(GPU_CHECK):
        m = re.match(r"^(?:\[.*\] \|\| )?run \d+ (.+)$", line.strip())
        if m:
            cases.append(m.group(1).split())
    return cases


def test_every_case_of_the_device_script_names_flags_presets_and_variants_bench_knows():
    """The prepared device run (an H200 is lent rarely, for minutes) must not meet a renamed flag, preset or lever:
    every case parses with bench.py's own parser and names known variants. (``bash jobs/gpu_check.sh --cpu`` runs
    the cases themselves at tiny scale on the CPU.)"""
    from ideal_ray.config import load_config
    from jobs.bench import AR_LEVERS, SAMPLE_VARIANTS, TOKENIZER_LEVERS, build_parser, variant_overrides

    cases = _gpu_check_cases()
    assert {c[0] for c in cases} == {"tokenizer", "ar-train", "sample", "precision"} and len(cases) >= 9
    parser = build_parser()
    for case in cases:
        args = parser.parse_args(case)
        if case[0] == "tokenizer":
            load_config(args.preset, args.overrides)  # an unknown preset is a ConfigError
        if case[0] in ("tokenizer", "ar-train"):
            levers = TOKENIZER_LEVERS if case[0] == "tokenizer" else AR_LEVERS
            for v in args.variants.split(","):
                variant_overrides(v, levers)  # an unknown one exits 2
        elif case[0] == "sample":
            assert set(args.variants.split(",")) <= set(SAMPLE_VARIANTS), case
        elif case[0] == "precision":
            variant_overrides(args.variant, TOKENIZER_LEVERS if args.stage == "tokenizer" else AR_LEVERS)
    with pytest.raises(SystemExit):  # the check can fail: a flag bench does not have
        parser.parse_args(["tokenizer", "--preset", "paper", "--micro-batch", "4"])
