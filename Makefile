# minilora — common commands. `make test` is what CI runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with notebooks/nbval_sanitize.cfg
LESSONS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

# glibc returns large freed blocks to the OS and page-faults them back on the next step; on small VMs
# that costs up to 10x in training speed. Keeping freed memory in the process avoids it.
export MALLOC_MMAP_THRESHOLD_ ?= 4294967296
export MALLOC_TRIM_THRESHOLD_ ?= 4294967296
export MALLOC_TOP_PAD_ ?= 536870912

# Kernels named "python3" run `python` from PATH: make it the venv's, so lessons import this install.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install test unit nbval lessons exercises lab data adapters bench mutation clean

# The venv is (re)built when missing or when the dependency lists change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Unit tests, reference tests (peft / transformers / bitsandbytes) and strict nbval on every lesson.
test: unit nbval

unit: $(STAMP)
	$(PY) -m pytest -q tests

# The lessons and the exercise solutions; the student versions in notebooks/exercises/ fail their checks by
# design and are run by tests/test_exercises.py instead.
nbval: $(STAMP)
	$(PY) -m pytest -q $(NBVAL) $(LESSONS) notebooks/solutions/

# Execute notebooks in place, each top to bottom in a fresh kernel: $(call execute,<notebooks>)
execute = for nb in $(1); do \
		echo "== $$nb"; \
		$(PY) -m jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=600 \
			--ExecutePreprocessor.kernel_name=python3 "$$nb" || exit 1; \
	done

# Execute every lesson (commit the result).
lessons: $(STAMP)
	$(call execute,$(LESSONS))

# Execute each exercise solution, then write its student version into notebooks/exercises/ with nbgrader
# (commit both; tests/test_exercises.py checks that the student versions are up to date).
SOLUTIONS := $(sort $(wildcard notebooks/solutions/*.ipynb))
exercises: $(STAMP)
	$(call execute,$(SOLUTIONS))
	$(PY) notebooks/solutions/generate_exercises.py

lab: $(STAMP)
	$(PY) -m jupyter lab notebooks/

# Regenerate data/: tasks and corpus, tokenizer, the pretrained base checkpoints (decoder-base takes over an
# hour on 2 cores; an interrupted run resumes), then the four task adapters on decoder-base.
# (the -W filter hides runpy's note that the package imported these modules before running them)
RUN_MODULE := $(PY) -W "ignore:'minilora:RuntimeWarning" -m
data: $(STAMP)
	$(RUN_MODULE) minilora.tasks
	$(RUN_MODULE) minilora.tokenizer
	$(RUN_MODULE) minilora.pretrain --quiet
	$(RUN_MODULE) minilora.task_adapters --quiet

# The four task adapters alone (data/adapters/<task>/), from the committed decoder-base.
adapters: $(STAMP)
	$(RUN_MODULE) minilora.task_adapters --quiet

bench: $(STAMP)
	$(PY) bench/suite.py $(if $(QUICK),--quick)

# Mutation testing of the method files with the tests that exercise them (tests/README.md); not part of
# `make test`. Configured in pyproject's [tool.mutmut]; starts fresh so the score is the current code's.
MUTATION_JOBS ?= 2
mutation: $(STAMP)
	rm -rf mutants
	$(PY) -m mutmut run --max-children $(MUTATION_JOBS)
	$(PY) tests/mutation_score.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
