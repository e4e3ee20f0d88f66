# What every layer's Makefile shares: each includes this file first. SAM runs make with
# --makefile naming the layer's Makefile in this checkout, but in another folder (a copy of the
# layer's, or the project root for CoreLayer), so the include goes by the Makefile's own path.
#
# Wheels are fetched for Lambda's platform, never built for this machine, so no Docker and no
# local python3.12 are needed. SAM does not pass the template's Architecture to make, so there is
# no default here: a layer built for one architecture under functions of the other would deploy
# and fail at import. `make sam-build ARCH=arm64|x86_64` sets both from one setting; by hand,
#   TILEFAN_ARCH=x86_64 sam build --parameter-overrides Architecture=x86_64
# A build without TILEFAN_ARCH fails. TILEFAN_LAYER_PYTHON=3.11 builds a layer that this
# machine's Python can import (tests/integration/test_sam_build.py); Lambda runs 3.12.

TILEFAN_LAYER_PYTHON ?= 3.12
PYTHON ?= python3

MACHINE_arm64 := aarch64
MACHINE_x86_64 := x86_64
MACHINE := $(MACHINE_$(TILEFAN_ARCH))
PYTHON_TAG := cp$(subst .,,$(TILEFAN_LAYER_PYTHON))
# manylinux_2_28 is Amazon Linux 2023 (python3.12); some wheels (cffi, pydantic-core, PyYAML)
# are tagged only manylinux2014 (glibc 2.17), which Amazon Linux 2023 runs but which pip does
# not accept under a manylinux_2_28 --platform by itself.
PLATFORMS := --platform manylinux_2_28_$(MACHINE) --platform manylinux2014_$(MACHINE)
# The versions the tests ran with (layers/constraints.txt), found by this file's own path.
CONSTRAINTS := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))constraints.txt)
PIP_TARGET = $(PYTHON) -m pip install --quiet --no-compile --only-binary=:all: $(PLATFORMS) \
	--python-version $(TILEFAN_LAYER_PYTHON) --implementation cp --abi $(PYTHON_TAG) --abi abi3 \
	--abi none --constraint "$(CONSTRAINTS)" --target "$(ARTIFACTS_DIR)/python"

# In a build-<Name>Layer recipe, <Name>Layer.
LAYER = $(@:build-%=%)

# The first line of every build-<Name>Layer recipe.
define layer-banner
@echo "$(LAYER): $(TILEFAN_ARCH), Python $(TILEFAN_LAYER_PYTHON)"
endef

# The last lines of every build-<Name>Layer recipe: what the layer was built for, which
# tests/integration/test_sam_build.py reads, and its size.
define layer-stamp
printf '%s %s\n' "$(TILEFAN_ARCH)" "$(TILEFAN_LAYER_PYTHON)" > "$(ARTIFACTS_DIR)/python/.tilefan-layer"
@du -sh "$(ARTIFACTS_DIR)" | sed 's/^/$(LAYER) unzipped: /'
endef

.PHONY: check-arch

check-arch:
	@test -n "$(TILEFAN_ARCH)" || { echo "TILEFAN_ARCH is not set: sam build does not tell the layers the template's Architecture. Build with make sam-build ARCH=arm64 (or x86_64), or set TILEFAN_ARCH to the Architecture you deploy." >&2; exit 2; }
	@test -n "$(MACHINE)" || { echo "TILEFAN_ARCH must be arm64 or x86_64, not '$(TILEFAN_ARCH)'" >&2; exit 2; }
	@test -n "$(ARTIFACTS_DIR)" || { echo "ARTIFACTS_DIR is not set: run sam build" >&2; exit 2; }
