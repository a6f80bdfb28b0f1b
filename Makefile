# Two commands on a fresh machine: `make demo` (the offline demo) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test notebooks screenshot bench study report clean-outputs

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q -e . --no-deps
	touch $(STAMP)

# The main job on the embedded default (profile demo, synthetic data): prepare, zero-shot baseline, train, evaluate, index, search.
demo: $(STAMP)
	$(PY) -m helpers demo

# Lint and format check, then unit tests plus nbval over every notebook, on the fixture profile
# (set by conftest.py).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest --nbval -q

# The whole study of 02 + 03 on the demo profile (results/demo/power_plan.csv: 5 seeds for the primary
# variants, 3 for the exploratory ones; each run trains until val Recall@5 levels off; resumable: run
# it again after an interruption, it prints the projected time), then the experiments that need no
# training: post-processing (on the final configuration's runs; where a checkpoint is gone the run is
# retrained under its recorded configuration) and robustness (the crop and photometric runs on trees
# with each nuisance turned up, from the ranks stored while their checkpoints existed). `python -m helpers study all
# --statistics-only` recomputes every comparison from the committed runs without training. `make
# report` then rebuilds report/ from results/ and report/prose/ only.
study: $(STAMP)
	$(PY) -m helpers study plan --profile demo
	$(PY) -m helpers study all --profile demo
	$(PY) -m helpers study postprocess --profile demo
	$(PY) -m helpers study robustness --profile demo

report: $(STAMP)
	$(PY) -m helpers report

# Re-execute the notebooks in place on the demo profile (the outputs that are committed).
notebooks: $(STAMP)
	for nb in 0*/*.ipynb; do C2S_PROFILE=demo $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace "$$nb" || exit 1; done

# 05_live_demo/screenshot.jpg: the live demo serving the demo model (after `make notebooks`), in Chromium.
screenshot: $(STAMP)
	$(PY) 05_live_demo/take_screenshot.py --profile demo

# Speed ratios against a reference measured in the same run (see docs/benchmarks.md).
bench: $(STAMP)
	$(PY) benchmarks/bench_train.py --repeats 3
	$(PY) benchmarks/bench_embed.py
	$(PY) benchmarks/bench_search.py

clean-outputs:
	rm -rf outputs
