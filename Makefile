# The two commands of the README:
#   make demo   installs everything into .venv and runs the main job end to end (embedded default)
#   make test   installs everything (with test tools) and runs the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: install install-dev demo test services lint typecheck reproduce bench catalog clean fuzz

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements.txt -c constraints.txt
	# torchattacks pins requests~=2.25.1 (a CVE) that it never imports: install it alone, without deps.
	$(PIP) install --quiet --no-deps torchattacks==3.5.1
	$(PIP) install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PIP) install --quiet -r requirements-dev.txt -c constraints.txt
	# openapi-python-client caps typer below the version the kdiga CLI uses, for its own CLI, which
	# tests/api/test_generated_client.py never runs (it calls the library): install it alone.
	$(PIP) install --quiet --no-deps openapi-python-client==0.29.1
	bash scripts/install-system-deps.sh
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(PY) -m kdiga_launcher.demo

services:
	bash scripts/start-services.sh

# Lint and types first (seconds), then the suite: CI runs this target.
test: install-dev services lint typecheck
	$(VENV)/bin/pytest -q --durations=30

lint: install-dev
	$(VENV)/bin/ruff check .

# mypy --strict on the service packages and the client (pyproject.toml [tool.mypy] names them).
typecheck: install-dev
	$(VENV)/bin/mypy

reproduce: install
	$(PY) benchmarks/reproduce_digits.py

# One thread and a time budget for the step case: ratios at one thread are less sensitive to other
# processes (on a shared 2-core machine two threads were 4-20x slower; on an idle one 1.2-1.8x
# faster, BENCHMARKS.md "Intra-op threads"); the full zoo without a budget takes > 20 min.
bench: install-dev
	$(PY) -m benchmarks.run --threads 1 --step-budget-s 370

# schemathesis over the whole OpenAPI document against the real app (SQLite + Redis), >= 10k
# requests, every check; the summary goes to fuzz-report/ (record it in FUZZING.md).
FUZZ_EXAMPLES ?= 1000
FUZZ_SEED ?= 1
fuzz: install-dev services
	$(PY) scripts/fuzz_api.py --max-examples $(FUZZ_EXAMPLES) --seed $(FUZZ_SEED) --out fuzz-report

catalog: install
	$(PY) scripts/gen_catalog.py

clean:
	rm -rf $(VENV) .pytest_cache demo-output
