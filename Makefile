# The two set-up commands (see README.md):
#   make demo   run the main job on the embedded default (sample volume, local worker)
#   make test   run the test suite (builds the images on first use; needs root for Docker)
#   make images build the worker, Airflow, SQS and PostgreSQL images (README: Run it in containers)
# Both create .venv from the pinned requirements first.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test bench images clean

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

# Debian's Docker engine, compose v1 and debootstrap build and run the images (tests/images).
/usr/sbin/dockerd /usr/bin/docker-compose /usr/sbin/debootstrap:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap

images: $(STAMP) /usr/sbin/dockerd /usr/sbin/debootstrap
	images/build.sh

test: $(STAMP) /usr/bin/chromium /usr/sbin/dockerd /usr/bin/docker-compose /usr/sbin/debootstrap
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python bench/worker_efficiency.py

clean:
	rm -rf $(VENV) demo build .pytest_cache .hypothesis
