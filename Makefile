# One entry point for every routine task. Each target builds .venv first if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# What is installed: `local` (the embedded engine) for the demo, `dev` (which includes it) for
# the rest.
LOCAL_STAMP := $(VENV)/.installed-local
STAMP := $(VENV)/.installed-dev
# The SAM CLI has its own virtualenv: aws-sam-cli pins boto3 and pydantic below what the
# project's environment resolves to. Pinned, so CI checks with the SAM a developer used.
SAM_CLI_VERSION := 1.170.0
SAM_VENV := .venv-sam
SAM := $(SAM_VENV)/bin/sam
SAM_STAMP := $(SAM_VENV)/.installed-$(SAM_CLI_VERSION)
# Architecture of the functions and layers for `make sam-build` (docs/deploy.md).
ARCH ?= arm64

.PHONY: setup sam sam-build browser demo test lint bench clean

$(BIN)/pip:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(LOCAL_STAMP): pyproject.toml layers/constraints.txt | $(BIN)/pip
	$(BIN)/pip install --quiet -e '.[local]' --constraint layers/constraints.txt
	touch $(LOCAL_STAMP)

$(STAMP): pyproject.toml layers/constraints.txt | $(BIN)/pip
	$(BIN)/pip install --quiet -e '.[dev]' --constraint layers/constraints.txt
	touch $(STAMP) $(LOCAL_STAMP)

setup: $(STAMP)

$(SAM_STAMP):
	rm -rf $(SAM_VENV)
	$(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/pip install --quiet --upgrade pip
	$(SAM_VENV)/bin/pip install --quiet "aws-sam-cli==$(SAM_CLI_VERSION)"
	touch $(SAM_STAMP)

sam: $(SAM_STAMP)

# sam build does not tell the layers' Makefiles the template's Architecture: set both.
sam-build: $(SAM_STAMP)
	SAM_CLI_TELEMETRY=0 TILEFAN_ARCH=$(ARCH) $(SAM) build --parallel \
		--parameter-overrides Architecture=$(ARCH)

demo: $(LOCAL_STAMP)
	$(BIN)/tilefan demo

# The job page's browser tests drive Debian's Chromium (Playwright's own browser download
# does not work offline); installed here when missing, which needs root and apt.
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# The SAM checks (tests/integration/test_sam_build.py) and the browser tests
# (tests/e2e/test_job_page.py) fail rather than skip here.
test: $(STAMP) $(SAM_STAMP) browser
	TILEFAN_REQUIRE_SAM=1 TILEFAN_REQUIRE_BROWSER=1 $(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) $(SAM_VENV) .aws-sam build *.egg-info .pytest_cache .mypy_cache .ruff_cache
