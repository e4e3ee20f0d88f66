"""What can be checked of an AWS deployment without an AWS account: SAM's own validation, the
template after SAM's transform, and ``sam build``'s artifacts.

Two builds, both with the template's makefile builders (no Docker, no local python3.12):

- the deployable default, arm64 and Python 3.12, into ``.aws-sam/test-arm64``: its size
  against Lambda's limit and its binaries' platform are checked, but this machine cannot run
  them;
- the same Makefiles for x86_64 and this machine's Python 3.11 (TILEFAN_LAYER_PYTHON), into
  ``.aws-sam/test-x86_64-py311``: each built function's handler module is imported in a
  separate interpreter whose path holds only the built function, the built layers, the
  standard library and boto3 (which the Lambda runtime provides). That proves the layers carry
  everything the handlers import, that pyvips loads libvips from pyvips-binary in API mode,
  and that the handlers' import-time code runs with the template's environment. It does not
  prove that the arm64 / 3.12 wheels load, only that they are the wheels of that platform.

A build is reused while its inputs (template, Makefiles, handlers, tilefan, pyproject) are
unchanged. The SAM CLI lives in its own virtualenv (``make sam``): aws-sam-cli pins boto3 and
pydantic below what this project's environment resolves to.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cfnlint.decode.cfn_yaml import load as load_cfn_yaml  # type: ignore[import-untyped]

from tests.unit.test_template_iam import FUNCTION_ROLES, function_roles, least_privilege_problems
from tilefan.local.engine import load_template

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ASL_PATH = PROJECT_ROOT / "statemachine" / "tilefan.asl.json"
SAM_VENV_BIN = PROJECT_ROOT / ".venv-sam" / "bin"
CODE_DIRS = {
    "ApiFunction": "api",
    "SplitterFunction": "splitter",
    "TileWorkerFunction": "tile_worker",
    "MergerFunction": "merger",
}
FUNCTIONS = tuple(CODE_DIRS)
LAYERS = ("VipsLayer", "CoreLayer")
LAMBDA_UNZIPPED_LIMIT = 262_144_000  # "250 MB": a function and all its layers, unzipped
ELF_MACHINE = {"arm64": 183, "x86_64": 62}  # EM_AARCH64, EM_X86_64
# What the Lambda Python runtime brings: boto3 and what it imports.
RUNTIME_PACKAGES = ("boto3", "botocore", "s3transfer", "jmespath", "dateutil", "six", "urllib3")
BUILD_INPUTS = ("template.yaml", "pyproject.toml", "statemachine", "layers", "tilefan")


@dataclass(frozen=True)
class Build:
    """One ``sam build`` output directory and what it was built for."""

    directory: Path
    architecture: str
    python: str

    def layer(self, name: str) -> Path:
        return self.directory / name / "python"

    def function(self, name: str) -> Path:
        return self.directory / name


def _sam_environment(**extra: str) -> dict[str, str]:
    environment = {
        **os.environ,
        "SAM_CLI_TELEMETRY": "0",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        # The Makefiles' pip: this interpreter's, whatever python3 is on PATH.
        "PYTHON": sys.executable,
        **extra,
    }
    environment.pop("AWS_ENDPOINT_URL", None)
    return environment


def run(command: list[str], *, timeout: float = 900, **extra_env: str) -> str:
    """Run a command at the project root; fail with its output unless it succeeds."""
    result = subprocess.run(
        command,
        cwd=PROJECT_ROOT,
        env=_sam_environment(**extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, (
        f"{' '.join(command[:3])} failed ({result.returncode}):\n"
        f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def sam() -> Path:
    path = Path(os.environ.get("TILEFAN_SAM", str(SAM_VENV_BIN / "sam")))
    if not path.is_file():
        message = f"no SAM CLI at {path}: `make sam` installs it"
        if os.environ.get("TILEFAN_REQUIRE_SAM") == "1":  # make test: every check must run
            pytest.fail(message)
        pytest.skip(message)
    return path


def _inputs_digest(architecture: str, python: str) -> str:
    digest = hashlib.sha256(f"{architecture} {python}\n".encode())
    for entry in (*BUILD_INPUTS, *CODE_DIRS.values()):
        path = PROJECT_ROOT / entry
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for file in files:
            if file.is_file() and "__pycache__" not in file.parts:
                digest.update(str(file.relative_to(PROJECT_ROOT)).encode() + b"\0")
                digest.update(file.read_bytes())
    return digest.hexdigest()


def sam_build(sam: Path, name: str, architecture: str, python: str) -> Build:
    """``sam build`` for an architecture and Python, reused while its inputs are unchanged."""
    build = Build(PROJECT_ROOT / ".aws-sam" / name, architecture, python)
    stamp = build.directory / ".tilefan-inputs"
    inputs = _inputs_digest(architecture, python)
    if stamp.is_file() and stamp.read_text() == inputs:
        return build
    shutil.rmtree(build.directory, ignore_errors=True)
    run(
        [
            str(sam),
            "build",
            "--parallel",
            "--build-dir",
            str(build.directory),
            "--parameter-overrides",
            f"Architecture={architecture}",
        ],
        TILEFAN_ARCH=architecture,
        TILEFAN_LAYER_PYTHON=python,
    )
    stamp.write_text(inputs)
    return build


@pytest.fixture(scope="module")
def builds(sam: Path) -> dict[str, Build]:
    """Both builds, made at once: each is mostly downloading and unpacking wheels."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    wanted = {
        "deployable": ("test-arm64", "arm64", "3.12"),
        "importable": (f"test-x86_64-py{version.replace('.', '')}", "x86_64", version),
    }
    with ThreadPoolExecutor(len(wanted)) as pool:
        futures = {key: pool.submit(sam_build, sam, *args) for key, args in wanted.items()}
        return {key: future.result() for key, future in futures.items()}


@pytest.fixture(scope="module")
def deployable(builds: dict[str, Build]) -> Build:
    return builds["deployable"]


@pytest.fixture(scope="module")
def importable(builds: dict[str, Build]) -> Build:
    return builds["importable"]


def tree_bytes(path: Path) -> int:
    return sum(file.lstat().st_size for file in path.rglob("*") if file.is_file())


def elf_machine(path: Path) -> int | None:
    with path.open("rb") as file:
        header = file.read(20)
    if header[:4] != b"\x7fELF":
        return None
    machine: int = struct.unpack("<H", header[18:20])[0]
    return machine


# --- SAM's validation and transform -----------------------------------------------------------


def test_sam_validate_lint_passes(sam: Path) -> None:
    output = run([str(sam), "validate", "--lint", "--region", "us-east-1"], timeout=300)
    assert "is a valid SAM Template" in output


TRANSFORM = r"""
import json, sys
from samcli.lib.translate import sam_template_validator as validator
from samcli.yamlhelper import yaml_parse

class NoManagedPolicies:
    def load(self):
        return {}

validator.yaml_dump = json.dumps  # hand the translated template back as JSON
with open(sys.argv[1]) as source:
    template = yaml_parse(source.read())
checker = validator.SamTemplateValidator(template, NoManagedPolicies(), region="us-east-1")
print(checker.get_translated_template_if_valid())
"""


@pytest.fixture(scope="module")
def transformed(sam: Path) -> dict[str, Any]:
    """template.yaml after the SAM transform, as CloudFormation would receive it."""
    output = run([str(sam.parent / "python"), "-c", TRANSFORM, "template.yaml"], timeout=300)
    document: dict[str, Any] = json.loads(output)
    return document


def test_least_privilege_holds_after_the_sam_transform(transformed: dict[str, Any]) -> None:
    # SAM adds no role, no managed policy (AWSLambdaBasicExecutionRole) and no policy.
    assert least_privilege_problems(transformed) == []
    assert function_roles(transformed) == FUNCTION_ROLES
    machines = [
        resource["Properties"]
        for resource in transformed["Resources"].values()
        if resource["Type"] == "AWS::StepFunctions::StateMachine"
    ]
    assert [machine["RoleArn"] for machine in machines] == [
        {"Fn::GetAtt": ["StateMachineRole", "Arn"]}
    ]


def test_transform_keeps_tracing_logging_and_the_api_key(transformed: dict[str, Any]) -> None:
    resources = transformed["Resources"]
    for function in FUNCTIONS:
        properties = resources[function]["Properties"]
        assert properties["TracingConfig"] == {"Mode": "Active"}
        assert properties["LoggingConfig"] == {"LogGroup": {"Ref": f"{function}LogGroup"}}
    machine = resources["TilefanStateMachine"]["Properties"]
    assert machine["TracingConfiguration"] == {"Enabled": True}
    assert machine["LoggingConfiguration"]["Level"] == {"Ref": "StateMachineLogLevel"}
    kinds = {resource["Type"] for resource in resources.values()}
    assert {"AWS::ApiGateway::ApiKey", "AWS::ApiGateway::UsagePlan"} <= kinds
    assert "TilefanApiApiKey" in resources  # the ApiKeyId output refers to it


# --- the deployable build (arm64, Python 3.12) ------------------------------------------------


def test_function_and_layers_fit_lambdas_unzipped_limit(
    deployable: Build, capsys: pytest.CaptureFixture[str]
) -> None:
    layers = {name: tree_bytes(deployable.directory / name) for name in LAYERS}
    functions = {name: tree_bytes(deployable.function(name)) for name in FUNCTIONS}
    with capsys.disabled():
        sizes = ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in layers.items())
        print(f"\nbuilt layers ({deployable.architecture}, Python {deployable.python}): {sizes}")
    for name, size in functions.items():
        total = size + sum(layers.values())
        assert total < LAMBDA_UNZIPPED_LIMIT, f"{name}: {total:,} bytes with its layers"
    # Headroom: a layer that doubles should be noticed well before the limit.
    assert sum(layers.values()) < LAMBDA_UNZIPPED_LIMIT / 2


def test_deployable_layers_hold_lambda_arm64_python_312_binaries(deployable: Build) -> None:
    for name in LAYERS:
        root = deployable.layer(name)
        assert (root / ".tilefan-layer").read_text().split() == ["arm64", "3.12"]
        binaries = [path for path in root.rglob("*.so*") if path.is_file()]
        machines = {path.name: elf_machine(path) for path in binaries}
        assert set(machines.values()) <= {ELF_MACHINE["arm64"]}, machines
        extensions = [path.name for path in binaries if ".cpython-" in path.name]
        assert all("cpython-312-aarch64-linux-gnu" in ext for ext in extensions), extensions
    vips = deployable.layer("VipsLayer")
    assert (vips / "_libvips.abi3.so").is_file()  # pyvips-binary's compiled API-mode module
    assert elf_machine(vips / "_libvips.abi3.so") == ELF_MACHINE["arm64"]
    assert not list((vips / "pyvips").rglob("*.so"))  # pyvips itself stays pure Python
    assert list(vips.glob("numpy-*.dist-info")), "numpy is missing"


def test_core_layer_carries_this_checkouts_tilefan(deployable: Build) -> None:
    built = deployable.layer("CoreLayer") / "tilefan"
    source = PROJECT_ROOT / "tilefan"
    for path in source.rglob("*.py"):
        relative = path.relative_to(source)
        assert (built / relative).read_bytes() == path.read_bytes(), relative


def test_built_template_deploys_the_built_code_and_the_asl_file(deployable: Build) -> None:
    built: dict[str, Any] = load_cfn_yaml(str(deployable.directory / "template.yaml"))
    resources = built["Resources"]
    for function in FUNCTIONS:
        code = (deployable.directory / resources[function]["Properties"]["CodeUri"]).resolve()
        assert code == deployable.function(function)
        assert (code / "app.py").read_bytes() == (
            PROJECT_ROOT / CODE_DIRS[function] / "app.py"
        ).read_bytes()
    for layer in LAYERS:
        content = resources[layer]["Properties"]["ContentUri"]
        assert (deployable.directory / content).resolve() == deployable.directory / layer
    # sam package uploads this file as the state machine's definition: the engine's ASL file.
    definition = resources["TilefanStateMachine"]["Properties"]["DefinitionUri"]
    assert (deployable.directory / definition).resolve() == ASL_PATH


# --- the importable build (x86_64, this Python) -----------------------------------------------

IMPORT = r"""
import importlib, importlib.util, json, pkgutil, sys
task, runtime, *layers = sys.argv[1:]
# As on Lambda: the function's code, then the layers (/opt/python), then the runtime's boto3.
sys.path[:0] = [task, *layers, runtime]
spec = importlib.util.spec_from_file_location("app", task + "/app.py")
app = importlib.util.module_from_spec(spec)
sys.modules["app"] = app
spec.loader.exec_module(app)
import tilefan, pyvips
# Modules a handler imports only when a job needs them (numpy for resize, say).
failed = {}
for module in pkgutil.walk_packages(tilefan.__path__, "tilefan."):
    try:
        importlib.import_module(module.name)
    except Exception as error:
        failed[module.name] = repr(error)
names = ("tilefan", "pyvips", "_libvips", "numpy", "pydantic", "pydantic_core",
         "pydantic_settings", "yaml", "aws_lambda_powertools", "boto3", "botocore")
print(json.dumps({
    "handler": callable(getattr(app, "lambda_handler", None)),
    "api_mode": bool(pyvips.API_mode),
    "libvips": [pyvips.version(0), pyvips.version(1)],
    "files": {name: getattr(sys.modules.get(name), "__file__", None) for name in names},
    "failed": failed,
    "path": sys.path,
}))
"""


@pytest.fixture(scope="module")
def lambda_runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in for what the Lambda runtime puts on the path: boto3 and its dependencies."""
    import importlib.util

    runtime = tmp_path_factory.mktemp("lambda-runtime")
    for name in RUNTIME_PACKAGES:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        origin = Path(spec.origin)
        source = origin.parent if origin.name == "__init__.py" else origin
        (runtime / source.name).symlink_to(source)
    return runtime


def function_environment(function: str) -> dict[str, str]:
    """The function's environment as the template sets it (parameter defaults)."""
    stack = load_template(PROJECT_ROOT)
    return {
        name: str(stack.resolve(value))
        for name, value in stack.functions[function].environment.items()
    }


@pytest.fixture(scope="module")
def imported(importable: Build, lambda_runtime: Path) -> Mapping[str, dict[str, Any]]:
    if os.uname().machine != "x86_64":
        pytest.skip("the import check builds x86_64 layers; this machine is not x86_64")
    results: dict[str, dict[str, Any]] = {}
    for function in FUNCTIONS:
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_LAMBDA_FUNCTION_NAME": function,
            **function_environment(function),
        }
        result = subprocess.run(
            [
                sys.executable,
                "-I",  # no PYTHON* variables, no user site
                "-S",  # no site-packages: nothing of this virtualenv
                "-c",
                IMPORT,
                str(importable.function(function)),
                str(lambda_runtime),
                *(str(importable.layer(layer)) for layer in LAYERS),
            ],
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, f"{function}:\n{result.stderr[-6000:]}"
        results[function] = json.loads(result.stdout.strip().splitlines()[-1])
    return results


@pytest.mark.parametrize("function", FUNCTIONS)
def test_built_handler_imports_with_only_the_layers_and_the_runtime(
    importable: Build, imported: Mapping[str, dict[str, Any]], lambda_runtime: Path, function: str
) -> None:
    result = imported[function]
    assert result["handler"] is True
    assert result["api_mode"] is True  # pyvips uses pyvips-binary's compiled _libvips
    assert result["failed"] == {}
    assert not [entry for entry in result["path"] if "site-packages" in entry]
    files = {name: Path(file) for name, file in result["files"].items() if file}
    for name in ("tilefan", "pyvips", "_libvips", "numpy", "pydantic_core", "yaml"):
        assert name in files, f"{name} was not imported"
    for name in ("pyvips", "_libvips", "numpy"):
        assert files[name].is_relative_to(importable.layer("VipsLayer")), name
    for name in ("tilefan", "pydantic_core", "pydantic_settings", "yaml", "aws_lambda_powertools"):
        assert files[name].is_relative_to(importable.layer("CoreLayer")), name
    assert files["boto3"].parent.parent == lambda_runtime
