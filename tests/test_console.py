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
