"""A job's console (``ideal_ray.console.job_console``), in a subprocess as a job runs: the console gets only what the
job says and its bars; print, logging, warnings and C-level output go to the log file, unfiltered; a failure's
traceback reaches the console all the same. (The real pipeline's console is checked in test_cluster_job.py.)"""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

JOB = r"""
import logging, os, sys, warnings
sys.path.insert(0, {repo!r})
from ideal_ray.console import job_console, progress, say

with job_console({folder!r}):
    say("[job] stage: running")
    print("library chatter on stdout")
    logging.warning("library chatter through logging")
    warnings.warn("library chatter as a warning", FutureWarning)
    os.write(2, b"library chatter from C\n")
    bar = progress(3, "stage", "img")
    for _ in range(3):
        bar.update(1)
    bar.close()
    say("[job] stage: finished")
    raise RuntimeError("the stage failed")
"""


def test_console_shows_the_job_lines_and_failure_the_log_holds_the_rest(tmp_path):
    folder = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", JOB.format(repo=REPO, folder=str(folder))], capture_output=True,
                       cwd=tmp_path, timeout=120)
    assert p.returncode == 1
    out, err = p.stdout.decode(), p.stderr.decode()  # bytes: text mode would turn the bar's \r into newlines
    lines = out.rstrip("\n").split("\n")  # a bar redraws its line with carriage returns: one line
    assert lines[0] == "[ideal-ray] log (Ray, DeepSpeed, Tune, MLflow output): run/console.log"
    assert lines[1] == "[job] stage: running" and lines[-1] == "[job] stage: finished"
    assert len(lines) == 4 and lines[2].rsplit("\r", 1)[-1].startswith("stage: 100%") and "3/3" in lines[2]
    assert "chatter" not in out + err
    assert err.rstrip().endswith("RuntimeError: the stage failed")  # the traceback, on the console
    log = (folder / "console.log").read_text()
    for text in ("[job] stage: running", "library chatter on stdout", "library chatter through logging",
                 "FutureWarning: library chatter as a warning", "library chatter from C",
                 "RuntimeError: the stage failed", "[job] stage: finished"):
        assert text in log, text


def test_outside_a_job_console_say_prints(capsys):
    from ideal_ray.console import job_console, say

    with job_console("unused") as path:  # pytest holds stdout: nothing is redirected, no log file is made
        say("hello")
    assert path is None and capsys.readouterr().out == "hello\n" and not os.path.exists("unused")


REFUSING_JOB = r"""
import sys
sys.path.insert(0, {repo!r})
from ideal_ray.cli import refuse
from ideal_ray.console import job_console

with job_console({folder!r}):
    print("library chatter on stdout")
    refuse("config error: optim.lr=abc needs a number.")
"""


def test_a_refusal_is_one_sentence_and_exit_code_2(tmp_path):
    folder = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", REFUSING_JOB.format(repo=REPO, folder=str(folder))],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 2
    assert p.stderr == "config error: optim.lr=abc needs a number.\n"  # once, no traceback
    assert "config error: optim.lr=abc needs a number." in (folder / "console.log").read_text()


OUTCOME_JOB = r"""
import sys
sys.path.insert(0, {repo!r})
from ideal_ray.cli import outcome
from ideal_ray.config import ConfigError
from ideal_ray.console import job_console

with job_console({folder!r}), outcome("rerun the same command to resume"):
    raise {error}
"""


def test_the_exit_code_rule(tmp_path):
    """Refused input: 2 and its sentence; Ctrl-C: 130 and where to resume; anything else is a bug: its traceback,
    exit 1 (a RuntimeError is not swallowed)."""
    cases = {"ConfigError('data.root= is empty; pass the data set folder.')":
             (2, "config error: data.root= is empty; pass the data set folder.\n"),
             "FileExistsError('runs/x/samples.npz exists; choose a new --out.')":
             (2, "error: runs/x/samples.npz exists; choose a new --out.\n"),
             "KeyboardInterrupt()": (130, "interrupted: rerun the same command to resume\n"),
             "RuntimeError('a bug')": (1, None)}
    for i, (error, (code, said)) in enumerate(cases.items()):
        folder = tmp_path / f"run{i}"
        p = subprocess.run([sys.executable, "-c", OUTCOME_JOB.format(repo=REPO, folder=str(folder), error=error)],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert p.returncode == code, (error, p.stderr)
        if said is None:
            assert "Traceback" in p.stderr and "RuntimeError: a bug" in p.stderr
        else:
            assert p.stderr == said and said.strip() in (folder / "console.log").read_text()


def test_ctrl_c_stops_a_job_with_130_and_where_to_resume(tmp_path):
    """SIGINT a real sampling job once it is sampling (its log says so): exit 130, the resume line, no samples."""
    import signal
    import time

    from conftest import ctrl_c_reaches_it, random_sampling_models

    gpt, tok = random_sampling_models(str(tmp_path), num_classes=2)
    out = tmp_path / "samples"
    p = subprocess.Popen([sys.executable, os.path.join(REPO, "jobs", "sample.py"), "--gpt", gpt, "--tokenizer", tok,
                          "--out", str(out), "--in-process", "sample.per_class=5000", "sample.batch_size=2",
                          "sample.out_size=8"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                         preexec_fn=ctrl_c_reaches_it)
    log = out / "console.log"
    t0 = time.time()
    try:  # waits for the event; the 10-minute limit only guards against a hang (it comes in ~5 s)
        while not (log.exists() and "sampling 10000 images" in log.read_text()):
            assert p.poll() is None and time.time() - t0 < 600, (p.poll(), log.read_text() if log.exists() else "")
            time.sleep(0.1)
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted: nothing was written to") and "Traceback" not in \
        stderr
    assert not (out / "samples.npz").exists()


def test_an_unreachable_cluster_is_one_sentence(tmp_path):
    """RAY_ADDRESS naming a port nothing listens on: exit 2 and a sentence naming the address (Ray itself would
    wait for its GCS for ever)."""
    import socket

    from conftest import random_sampling_models

    gpt, tok = random_sampling_models(str(tmp_path), num_classes=2)
    with socket.socket() as s:  # a free port, closed again: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.run([sys.executable, os.path.join(REPO, "jobs", "sample.py"), "--gpt", gpt, "--tokenizer", tok,
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env=dict(os.environ, RAY_ADDRESS=f"127.0.0.1:{port}"))
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith(f"error: No Ray cluster could be reached at 127.0.0.1:{port} ($RAY_ADDRESS") and \
        "Traceback" not in p.stderr


def test_missing_inputs_are_refused_before_anything_starts(tmp_path):
    """A missing input path: exit 2 with one sentence naming it, nothing created (no output or log folder); the
    checks run before torch or Ray are imported (the times are printed, not asserted)."""
    import time

    from conftest import random_sampling_models

    gpt, tok = random_sampling_models(str(tmp_path), num_classes=2)
    gone, out = str(tmp_path / "gone"), str(tmp_path / "work" / "out")
    cases = {
        "extract_tokens.py": (["--tokenizer", tok, "--data-root", gone, "--out", out], f"--data-root {gone}"),
        "evaluate.py gen": (["gen", "--samples", gone, "--reference", gone, "--out", out], f"--samples {gone}"),
        "evaluate.py recon": (["recon", "--tokenizer", tok, "--data-root", gone, "--out", out], f"--data-root {gone}"),
        "sweep_cfg.py": (["--gpt", gpt, "--tokenizer", tok, "--reference", gone, "--name", "s", "--storage-path", out,
                          "--cfg-scales", "1.0"], f"--reference {gone}"),
        "train_ar.py": ([f"data.shards={gone}", f"output_dir={out}"], f"No token shards at data.shards={gone}"),
        "sweep_ablation.py": (["--study", "fusion", "--name", "a", "--storage", out, f"train.data.root={gone}"],
                              f"No ImageNet-layout folder at data.root={gone}"),
    }
    (tmp_path / "work").mkdir()
    for job, (argv, said) in cases.items():
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, os.path.join(REPO, "jobs", job.split()[0])] + argv, capture_output=True,
                           text=True, cwd=tmp_path / "work", timeout=600)
        print(f"{job}: rc {p.returncode} in {time.perf_counter() - t0:.2f} s")
        assert p.returncode == 2 and said in p.stderr and p.stderr.count("\n") == 1, (job, p.stderr)
        assert os.listdir(tmp_path / "work") == [], (job, os.listdir(tmp_path / "work"))
