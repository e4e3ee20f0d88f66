"""The layers carry exactly the project's dependencies, for Lambda's platform, not this one's."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The Lambda Python runtime provides boto3 (and botocore, s3transfer, jmespath).
PROVIDED_BY_THE_RUNTIME = {"boto3>=1.34"}


def make_variable(layer: str, name: str) -> list[str]:
    """The words of ``name := ...`` in layers/<layer>/Makefile."""
    text = (PROJECT_ROOT / "layers" / layer / "Makefile").read_text(encoding="utf-8")
    [value] = re.findall(rf"^{name} := (.*)$", text, flags=re.MULTILINE)
    return shlex.split(value)


def test_layers_install_exactly_the_projects_dependencies() -> None:
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    dependencies = set(project["project"]["dependencies"])
    vips = make_variable("vips", "REQUIREMENTS") + make_variable("vips", "PYVIPS")
    core = make_variable("core", "REQUIREMENTS")
    assert not set(vips) & set(core)
    assert set(vips) | set(core) | PROVIDED_BY_THE_RUNTIME == dependencies


@pytest.mark.parametrize("layer", ["vips", "core"])
def test_wheels_are_fetched_for_lambda_not_built_here(layer: str) -> None:
    makefile = (PROJECT_ROOT / "layers" / layer / "Makefile").read_text(encoding="utf-8")
    # The settings every layer shares are in layers/layer.mk, included by the Makefile's path.
    assert "include $(dir $(lastword $(MAKEFILE_LIST)))../layer.mk" in makefile
    text = makefile + (PROJECT_ROOT / "layers" / "layer.mk").read_text(encoding="utf-8")
    assert "--only-binary=:all:" in text
    assert "--platform manylinux_2_28_$(MACHINE)" in text
    assert "--python-version $(TILEFAN_LAYER_PYTHON)" in text
    # No default architecture: SAM does not tell make the template's, so a guess could ship
    # aarch64 binaries under x86_64 functions.
    assert not re.search(r"^TILEFAN_ARCH \?=", text, flags=re.MULTILINE)
    assert re.search(r"^TILEFAN_LAYER_PYTHON \?= 3\.12$", text, flags=re.MULTILINE)
    assert f"build-{layer.capitalize()}Layer:" in text


def test_pyvips_is_copied_as_python_not_compiled_for_this_machine() -> None:
    text = (PROJECT_ROOT / "layers" / "vips" / "Makefile").read_text(encoding="utf-8")
    uses = [line for line in text.splitlines() if "$(PYVIPS)" in line]
    # Only downloaded as the sdist (then its package directory is copied), never installed.
    assert uses and all("pip download" in line and "--no-binary=:all:" in line for line in uses)


def constraints() -> dict[str, str]:
    """layers/constraints.txt: package name (normalised) -> pinned version."""
    pins: dict[str, str] = {}
    for line in (PROJECT_ROOT / "layers" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_every_layer_dependency_is_pinned_to_the_version_the_tests_run_with() -> None:
    from importlib.metadata import version

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    shipped = set(project["project"]["dependencies"]) - PROVIDED_BY_THE_RUNTIME
    names = {re.split(r"[<>=!~ ]", spec, maxsplit=1)[0].lower() for spec in shipped}
    pins = constraints()
    assert names <= set(pins), f"not pinned: {names - set(pins)}"
    # `make setup` installs under the same constraints, so this environment is the pinned one.
    assert {name: version(name) for name in pins} == pins


def test_the_layers_and_the_test_environment_install_under_the_constraints() -> None:
    shared = (PROJECT_ROOT / "layers" / "layer.mk").read_text(encoding="utf-8")
    assert "CONSTRAINTS := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))constraints.txt)" in shared
    assert '--constraint "$(CONSTRAINTS)" --target' in shared
    vips = (PROJECT_ROOT / "layers" / "vips" / "Makefile").read_text(encoding="utf-8")
    assert '--no-binary=:all: --constraint "$(CONSTRAINTS)"' in vips
    setup = (PROJECT_ROOT / "Makefile").read_text(encoding="utf-8")
    assert "pip install --quiet -e '.[dev]' --constraint layers/constraints.txt" in setup


def test_a_layer_build_without_an_architecture_fails_instead_of_guessing(tmp_path: Path) -> None:
    import os
    import subprocess

    environment = {k: v for k, v in os.environ.items() if k != "TILEFAN_ARCH"}
    environment["ARTIFACTS_DIR"] = str(tmp_path)
    for layer in ("vips", "core"):
        built = subprocess.run(
            [
                "make",
                "--makefile",
                str(PROJECT_ROOT / "layers" / layer / "Makefile"),
                f"build-{layer.capitalize()}Layer",
            ],
            cwd=PROJECT_ROOT,
            env=environment,
            capture_output=True,
            text=True,
            check=False,
        )
        assert built.returncode != 0
        assert "TILEFAN_ARCH is not set" in built.stderr
        assert list(tmp_path.iterdir()) == []  # nothing fetched


def test_make_sam_build_drives_the_layers_and_the_template_from_one_setting() -> None:
    text = (PROJECT_ROOT / "Makefile").read_text(encoding="utf-8")
    assert "TILEFAN_ARCH=$(ARCH) $(SAM) build" in text
    assert "--parameter-overrides Architecture=$(ARCH)" in text
