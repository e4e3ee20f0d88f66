"""The stack as the template declares it: names, functions, settings and the state machine."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml  # type: ignore[import-untyped, unused-ignore]  # types-PyYAML is optional

__all__ = [
    "ACCOUNT_ID",
    "REGION",
    "STACK_NAME",
    "FunctionSpec",
    "StackTemplate",
    "TemplateError",
    "load_template",
]


REGION: Final = "us-east-1"
ACCOUNT_ID: Final = "123456789012"  # moto's default account
STACK_NAME: Final = "tilefan"
STACK_GUID: Final = "00000000-0000-4000-8000-000000000000"
TEMPLATE_FILE: Final = "template.yaml"

_SECRET_REFERENCE = re.compile(
    r"\{\{resolve:secretsmanager:arn:[^:]+:secretsmanager:[^:]+:\d+:secret:(\w+):SecretString\}\}"
)
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z0-9_:.]+)\}")


class TemplateError(ValueError):
    """The template uses something the embedded engine cannot reproduce."""


class _CfnLoader(yaml.SafeLoader):  # type: ignore[misc, unused-ignore]  # Any without stubs
    """A safe YAML loader that turns CloudFormation short-form tags into their long form."""


def _construct_intrinsic(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> Any:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    elif isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    else:
        raise TemplateError(f"unexpected YAML node for !{tag_suffix}")
    if tag_suffix in ("Ref", "Condition"):
        return {tag_suffix: value}
    if tag_suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{tag_suffix}": value}


_CfnLoader.add_multi_constructor("!", _construct_intrinsic)


@dataclass(frozen=True)
class FunctionSpec:
    """One ``AWS::Serverless::Function`` with the template's Globals applied."""

    logical_id: str
    code_uri: Path
    handler: str
    memory_mb: int
    timeout_s: int
    environment: Mapping[str, Any]
    ephemeral_mb: int = 512
    """``EphemeralStorage.Size``: the function's /tmp, in MB (Lambda's default is 512)."""

    @property
    def arn(self) -> str:
        """The ARN the engine gives this function (its name is its logical id)."""
        return f"arn:aws:lambda:{REGION}:{ACCOUNT_ID}:function:{self.logical_id}"


@dataclass(frozen=True)
class StackTemplate:
    """The parts of ``template.yaml`` the engine reproduces, with physical names chosen."""

    root: Path
    parameters: Mapping[str, str]
    resources: Mapping[str, Mapping[str, Any]]
    functions: Mapping[str, FunctionSpec]
    bucket_id: str
    table_id: str
    state_machine_id: str
    secrets: Mapping[str, str]
    """A value for each ``AWS::SecretsManager::Secret``, made afresh for each engine."""

    def resolve(self, value: Any) -> Any:
        """Resolve the intrinsic functions in ``value`` against this stack."""
        return _Resolver(self).resolve(value)

    def physical_name(self, logical_id: str) -> str:
        """The name the engine gives a resource, as ``Ref`` returns it."""
        return _Resolver(self).ref(logical_id)

    def api_functions(self) -> frozenset[str]:
        """The functions with API events: those that answer users' requests."""
        return frozenset(
            logical_id
            for logical_id, resource in self.resources.items()
            if logical_id in self.functions
            and any(
                event.get("Type") == "Api"
                for event in resource.get("Properties", {}).get("Events", {}).values()
            )
        )

    def keyless_routes(self) -> list[tuple[str, re.Pattern[str]]]:
        """The API routes the template serves without an API key: (method, pattern on the path).

        The method is the event's (``ANY`` for every method).
        """
        routes = []
        for resource in self.resources.values():
            events = resource.get("Properties", {}).get("Events", {})
            for event in events.values():
                properties = event.get("Properties", {})
                if event.get("Type") != "Api" or properties.get("Auth", {}).get(
                    "ApiKeyRequired", True
                ):
                    continue
                segments = [
                    ".+"
                    if part.endswith("+}")
                    else "[^/]+"
                    if part.startswith("{")
                    else re.escape(part)
                    for part in properties["Path"].split("/")
                ]
                path = "/".join(segments)  # {name}: one segment; {proxy+}: one or more
                routes.append((str(properties["Method"]).upper(), re.compile(f"^{path}$")))
        return routes

    @property
    def bucket_name(self) -> str:
        """Name of the template's bucket."""
        return self.physical_name(self.bucket_id)

    @property
    def table_name(self) -> str:
        """Name of the template's table."""
        return self.physical_name(self.table_id)

    @property
    def state_machine_name(self) -> str:
        """Name of the template's state machine."""
        props = self.resources[self.state_machine_id].get("Properties", {})
        if "Name" in props:
            return str(self.resolve(props["Name"]))
        return f"{STACK_NAME}-{self.state_machine_id}"

    @property
    def state_machine_arn(self) -> str:
        """ARN of the template's state machine."""
        return f"arn:aws:states:{REGION}:{ACCOUNT_ID}:stateMachine:{self.state_machine_name}"

    def state_machine_definition(self) -> str:
        """The ASL text with the template's DefinitionSubstitutions applied."""
        props = self.resources[self.state_machine_id]["Properties"]
        if "DefinitionUri" in props:
            uri = props["DefinitionUri"]
            if not isinstance(uri, str):
                raise TemplateError("DefinitionUri must be a local path for the embedded engine")
            text = (self.root / uri).read_text(encoding="utf-8")
        elif "Definition" in props:
            text = json.dumps(props["Definition"])
        else:
            raise TemplateError(f"{self.state_machine_id} has no Definition or DefinitionUri")
        substitutions = {
            key: _as_text(self.resolve(value))
            for key, value in props.get("DefinitionSubstitutions", {}).items()
        }

        def substitute(match: re.Match[str]) -> str:
            key = match.group(1)
            if key not in substitutions:
                raise TemplateError(f"no DefinitionSubstitutions entry for ${{{key}}}")
            return substitutions[key]

        definition = _PLACEHOLDER.sub(substitute, text)
        json.loads(definition)  # fail here, not inside moto, if substitution broke the JSON
        return definition

    def function_environment(self, logical_id: str) -> dict[str, str]:
        """One function's environment variables (Globals and its own), resolved."""
        spec = self.functions[logical_id]
        return {name: _as_text(self.resolve(value)) for name, value in spec.environment.items()}

    def environment(self) -> dict[str, str]:
        """Every function's environment variables, resolved and merged.

        The handlers share one process, hence one ``os.environ``: a variable that two functions
        set to different values cannot be reproduced, and is refused.
        """
        merged: dict[str, str] = {}
        for spec in self.functions.values():
            for name, value in spec.environment.items():
                text = _as_text(self.resolve(value))
                if merged.setdefault(name, text) != text:
                    raise TemplateError(f"functions disagree on environment variable {name}")
        return merged

    def setting_variables(self) -> frozenset[str]:
        """Environment variables whose value is a setting: a literal or a parameter.

        The others name the stack's resources (``!Ref TilefanBucket``) and are always the
        engine's. A setting already in the process environment is left as it is, as
        ``parameters=`` overrides a parameter: a benchmark or test that sets
        ``TILEFAN_TILES_PER_ITEM`` before starting an engine gets its value.
        """
        settings: set[str] = set()
        for spec in self.functions.values():
            for name, value in spec.environment.items():
                if not isinstance(value, dict) or (
                    set(value) == {"Ref"} and value["Ref"] in self.parameters
                ):
                    settings.add(name)
        return frozenset(settings)


def load_template(
    project_root: Path,
    parameters: Mapping[str, str] | None = None,
    function_properties: Mapping[str, Mapping[str, Any]] | None = None,
) -> StackTemplate:
    """Read ``template.yaml`` under ``project_root``; ``parameters`` override its defaults.

    ``function_properties`` replace properties of the template's functions (``{"TileWorkerFunction":
    {"CodeUri": "tests/handlers/sleeper/", "Timeout": 2}}``): what a test deploys instead.
    """
    path = project_root / TEMPLATE_FILE
    document = yaml.load(path.read_text(encoding="utf-8"), Loader=_CfnLoader)
    if not isinstance(document, dict) or "Resources" not in document:
        raise TemplateError(f"{path} is not a CloudFormation template")
    resources: dict[str, dict[str, Any]] = document["Resources"]
    for logical_id, properties in (function_properties or {}).items():
        if resources.get(logical_id, {}).get("Type") != "AWS::Serverless::Function":
            raise TemplateError(f"template has no function {logical_id}")
        resource = resources[logical_id]
        resource["Properties"] = {**resource.get("Properties", {}), **properties}

    values: dict[str, str] = {}
    for name, declaration in document.get("Parameters", {}).items():
        if "Default" in declaration:
            values[name] = _as_text(declaration["Default"])
    for name, value in (parameters or {}).items():
        if name not in document.get("Parameters", {}):
            raise TemplateError(f"template has no parameter {name}")
        values[name] = value

    globals_ = document.get("Globals", {}).get("Function", {})
    functions = {
        logical_id: _function_spec(project_root, logical_id, resource, globals_, values)
        for logical_id, resource in resources.items()
        if resource.get("Type") == "AWS::Serverless::Function"
    }
    return StackTemplate(
        root=project_root,
        parameters=values,
        resources=resources,
        functions=functions,
        bucket_id=_single(resources, "AWS::S3::Bucket"),
        table_id=_single(resources, "AWS::DynamoDB::Table"),
        state_machine_id=_single(resources, "AWS::Serverless::StateMachine"),
        secrets={
            logical_id: secrets.token_urlsafe(32)
            for logical_id, resource in resources.items()
            if resource.get("Type") == "AWS::SecretsManager::Secret"
        },
    )


def _single(resources: Mapping[str, Mapping[str, Any]], resource_type: str) -> str:
    found = [lid for lid, res in resources.items() if res.get("Type") == resource_type]
    if len(found) != 1:
        raise TemplateError(f"expected one {resource_type}, found {len(found)}")
    return found[0]


def _function_spec(
    root: Path,
    logical_id: str,
    resource: Mapping[str, Any],
    globals_: Mapping[str, Any],
    parameters: Mapping[str, str],
) -> FunctionSpec:
    props = resource.get("Properties", {})

    def parameter(value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {"Ref"} and value["Ref"] in parameters:
            return parameters[value["Ref"]]  # MemorySize: !Ref TileWorkerMemorySize
        return value

    def setting(name: str, default: Any) -> Any:
        return parameter(props.get(name, globals_.get(name, default)))

    environment = {
        **globals_.get("Environment", {}).get("Variables", {}),
        **props.get("Environment", {}).get("Variables", {}),
    }
    code_uri = setting("CodeUri", None)
    if not isinstance(code_uri, str):
        raise TemplateError(f"{logical_id}: CodeUri must be a local path")
    return FunctionSpec(
        logical_id=logical_id,
        code_uri=root / code_uri,
        handler=str(setting("Handler", "app.lambda_handler")),
        memory_mb=int(setting("MemorySize", 128)),
        timeout_s=int(setting("Timeout", 3)),
        environment=environment,
        ephemeral_mb=int(parameter(setting("EphemeralStorage", {}).get("Size", 512))),
    )


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    raise TemplateError(f"expected a scalar, got {value!r}")


class _Resolver:
    """Evaluates the intrinsic functions the template uses, as CloudFormation would here."""

    def __init__(self, stack: StackTemplate) -> None:
        self._stack = stack

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self.resolve(item) for item in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (key, argument), *_ = value.items()
            if key == "Ref":
                return self.ref(str(argument))
            if key == "Fn::GetAtt":
                logical_id, attribute = argument
                return self.get_att(str(logical_id), str(attribute))
            if key == "Fn::Sub":
                return self.sub(argument)
            if key == "Fn::Join":
                delimiter, parts = argument
                resolved = self.resolve(parts)
                if isinstance(resolved, str):  # a CommaDelimitedList parameter
                    resolved = resolved.split(",")
                return str(delimiter).join(_as_text(part) for part in resolved)
            if key == "Fn::Split":
                delimiter, text = argument
                return _as_text(self.resolve(text)).split(str(delimiter))
            if key == "Fn::Select":
                index, items = argument
                return self.resolve(items)[int(index)]
            if key.startswith("Fn::"):
                raise TemplateError(f"the embedded engine does not evaluate {key}")
        return {name: self.resolve(item) for name, item in value.items()}

    def ref(self, name: str) -> str:
        stack = self._stack
        pseudo = {
            "AWS::Region": REGION,
            "AWS::AccountId": ACCOUNT_ID,
            "AWS::StackName": STACK_NAME,
            "AWS::StackId": (
                f"arn:aws:cloudformation:{REGION}:{ACCOUNT_ID}:stack/{STACK_NAME}/{STACK_GUID}"
            ),
            "AWS::Partition": "aws",
            "AWS::URLSuffix": "amazonaws.com",
        }
        if name in pseudo:
            return pseudo[name]
        if name in stack.parameters:
            return stack.parameters[name]
        resource_type = stack.resources.get(name, {}).get("Type")
        if resource_type == "AWS::S3::Bucket":
            return f"{STACK_NAME}-{name}".lower()
        if resource_type == "AWS::DynamoDB::Table":
            return f"{STACK_NAME}-{name}"
        if resource_type == "AWS::Serverless::Function":
            return name
        if resource_type == "AWS::Serverless::StateMachine":
            return stack.state_machine_arn
        if resource_type == "AWS::SecretsManager::Secret":
            return f"arn:aws:secretsmanager:{REGION}:{ACCOUNT_ID}:secret:{name}"
        if resource_type == "AWS::Serverless::LayerVersion":
            return f"arn:aws:lambda:{REGION}:{ACCOUNT_ID}:layer:{name}:1"
        raise TemplateError(f"cannot Ref {name}")

    def get_att(self, logical_id: str, attribute: str) -> str:
        stack = self._stack
        if logical_id in stack.functions and attribute == "Arn":
            return stack.functions[logical_id].arn
        if logical_id == stack.state_machine_id and attribute == "Name":
            return stack.state_machine_name
        if logical_id == stack.state_machine_id and attribute == "Arn":
            return stack.state_machine_arn
        if logical_id == stack.bucket_id and attribute == "Arn":
            return f"arn:aws:s3:::{stack.bucket_name}"
        if logical_id == stack.table_id and attribute == "Arn":
            return f"arn:aws:dynamodb:{REGION}:{ACCOUNT_ID}:table/{stack.table_name}"
        raise TemplateError(f"cannot GetAtt {logical_id}.{attribute}")

    def sub(self, argument: Any) -> str:
        if isinstance(argument, list):
            template, variables = argument
            local = {name: _as_text(self.resolve(v)) for name, v in variables.items()}
        else:
            template, local = argument, {}

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in local:
                return local[name]
            if "." in name and not name.startswith("AWS::"):
                logical_id, attribute = name.split(".", 1)
                return self.get_att(logical_id, attribute)
            return self.ref(name)

        text = _PLACEHOLDER.sub(replace, str(template))
        # A dynamic reference to a template secret reads the value the engine made for it.
        return _SECRET_REFERENCE.sub(lambda match: self._stack.secrets[match.group(1)], text)
