# The two set-up commands (see README.md):
#   make demo   run the main job on the embedded default (sample volume, local worker)
#   make test   run the test suite
# Both create .venv from the pinned requirements first.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

demo: $(STAMP)
	$(VENV)/bin/python scripts/airflow_local.py demo --workdir demo

# Debian's Chromium drives the web-UI test (Playwright uses it; it downloads no browser).
/usr/bin/chromium:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

test: $(STAMP) /usr/bin/chromium
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python bench/worker_efficiency.py

clean:
	rm -rf $(VENV) demo .pytest_cache .hypothesis
