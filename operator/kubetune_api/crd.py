"""Generate the FineTuneJob CustomResourceDefinition from the pydantic models.

pydantic emits JSON Schema (2020-12) with $refs and null unions; the API
server wants a structural OpenAPI v3 schema. This module rewrites one into the
other and adds what only Kubernetes knows: CEL rules, defaults for nested
objects, printer columns, the status subresource.

Regenerate with `kubetune crd --write crds/` (a test fails when crds/ drifts);
the YAML rendering lives in the CLI, which has PyYAML.
"""

from __future__ import annotations

import copy
import json
from typing import Any, get_args

from pydantic import BaseModel

from . import models
from .rules import RULES

CRD_NAME = f"{models.PLURAL}.{models.GROUP}"
CRD_FILENAME = f"{models.GROUP}_{models.PLURAL}.yaml"

_DROP_KEYS = {"title", "additionalProperties", "$defs"}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline every $ref (the models have no recursion)."""
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        target.update(siblings)  # a field's description wins over the class docstring
        return _resolve(target, defs)
    return {k: _resolve(v, defs) for k, v in node.items()}


def _words(values: list[str]) -> str:
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " or " + values[-1]


def _flatten_union(options: list[dict[str, Any]], node: dict[str, Any]) -> dict[str, Any]:
    """A union discriminated by `type` (the graders) → one object. Structural schemas
    allow no alternatives, so the object has every variant's fields, without
    defaults (they differ per variant; pydantic fills them in), and CEL rules say
    which fields each `type` needs and allows, with each variant's own rules
    guarded by its type."""
    variants = [_structural(o) for o in options]
    kinds = [v["properties"]["type"]["enum"][0] for v in variants]
    props: dict[str, Any] = {}
    owners: dict[str, list[str]] = {}
    for kind, variant in zip(kinds, variants, strict=True):
        for name, sub in variant["properties"].items():
            sub = {k: v for k, v in sub.items() if k != "default"}
            owners.setdefault(name, []).append(kind)
            if name == "type":
                continue
            if name in props and props[name] != sub:
                raise ValueError(f"union field {name} differs between variants: {kinds}")
            props[name] = sub
    props = {"type": {**variants[0]["properties"]["type"], "enum": kinds}, **props}
    required = set.intersection(*(set(v.get("required", [])) for v in variants))
    rules = []
    for name, kinds_with in owners.items():
        if len(kinds_with) < len(kinds):
            quoted = ", ".join(f"'{k}'" for k in kinds_with)
            rules.append(
                {
                    "rule": f"!has(self.{name}) || self.type in [{quoted}]",
                    "message": f"{name} applies to type {_words(kinds_with)} only: remove it",
                    "fieldPath": f".{name}",
                }
            )
    for kind, variant in zip(kinds, variants, strict=True):
        for name in variant.get("required", []):
            if name not in required:
                rules.append(
                    {
                        "rule": f"self.type != '{kind}' || has(self.{name})",
                        "message": f"a {kind} grader needs {name}: add it",
                        "fieldPath": f".{name}",
                    }
                )
        for entry in variant.get("x-kubernetes-validations", []):
            rules.append({**entry, "rule": f"self.type != '{kind}' || ({entry['rule']})"})
    out = {k: v for k, v in node.items() if k not in _DROP_KEYS}
    out.update({"type": "object", "required": sorted(required), "properties": props})
    out["x-kubernetes-validations"] = rules + node.get("x-kubernetes-validations", [])
    return out


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    """One JSON Schema node → one structural OpenAPI v3 node."""
    node = dict(node)
    out: dict[str, Any] = {}

    if "oneOf" in node:
        return _flatten_union(node.pop("oneOf"), node)

    if "anyOf" in node:
        options = node.pop("anyOf")
        non_null = [o for o in options if o.get("type") != "null"]
        types = {o.get("type") for o in non_null}
        if len(non_null) == 1:
            # Optional[X] → X, deliberately not `nullable`: the API server then prunes
            # an explicit null, so `has(self.x)` in CEL means "set" exactly as in Python.
            return _structural({**non_null[0], **node})
        if types == {"string", "integer"}:
            # Union[Literal["auto"], int]: int-or-string; a CEL rule checks the values.
            # The anyOf is the one structural schemas allow here; it tells clients
            # (kubectl explain) the two types instead of <Object>.
            out = {k: v for k, v in node.items() if k in ("description", "default")}
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            out["x-kubernetes-int-or-string"] = True
            return out
        raise ValueError(f"cannot express union {options} structurally")

    if "const" in node:
        node["enum"] = [node.pop("const")]

    # JSON Schema 2020 bounds → OpenAPI v3.0 bounds
    for excl, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if excl in node and not isinstance(node[excl], bool):
            node[inclusive] = node.pop(excl)
            node[excl] = True

    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "properties":
            out[key] = {name: _structural(sub) for name, sub in value.items()}
        elif key == "items":
            out[key] = _structural(value)
        elif key == "default" and value is None:
            continue
        else:
            out[key] = value

    if node.get("type") == "object" and isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(node["additionalProperties"])
    if "properties" in out:
        out.setdefault("type", "object")
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if "maxLength" in node and node.get("type") == "object":  # dict max_length
        out["maxProperties"] = out.pop("maxLength")
    return out


def _model_of(annotation: Any) -> Any:
    """The model class of X or Optional[X] (an optional block, e.g. sweep: when it is
    set, its own nested blocks get their defaults too), else None."""
    args = get_args(annotation)
    if type(None) in args:  # Optional[X]; not list[X] or dict[str, X]
        args = tuple(a for a in args if a is not type(None))
        annotation = args[0] if len(args) == 1 else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _default_nested_objects(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """Fields built by default_factory get `default: {}` so the API server fills
    in their own defaults, and CEL rules can rely on them being present."""
    for name, field in model.model_fields.items():
        alias = field.alias or name
        prop = schema.get("properties", {}).get(alias)
        if prop is None:
            continue
        annotation = _model_of(field.annotation)
        if annotation is not None:
            if field.default_factory is not None:
                prop["default"] = {}
            _default_nested_objects(prop, annotation)
        elif field.default_factory is not None:
            prop.pop("default", None)  # empty lists/maps: no value in storing them


def schema_for(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    resolved = _resolve(raw, raw.get("$defs", {}))
    resolved.pop("$defs", None)
    schema = _structural(resolved)
    _default_nested_objects(schema, model)
    return schema


def _node_at(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node = schema
    for key in path:
        node = node["properties"][key]
    return node


def spec_schema() -> dict[str, Any]:
    """The spec's OpenAPI schema with CEL rules attached (also used for defaulting)."""
    schema = schema_for(models.FineTuneJobSpec)
    for rule in RULES:
        if rule.cel is None:
            continue
        node = _node_at(schema, rule.path)
        entry = {"rule": rule.cel, "message": rule.message}
        if rule.field:
            entry["fieldPath"] = "." + rule.field
        node.setdefault("x-kubernetes-validations", []).append(entry)
    schema["required"] = sorted(set(schema.get("required", [])) | {"model", "dataset"})
    _expand_object_defaults(schema)
    _describe_defaults_and_bounds(schema)
    return schema


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _bounds_text(node: dict[str, Any]) -> str:
    """The schema's bounds in words: what `kubectl explain` shows of them."""
    parts = []
    if "minimum" in node:
        word = "greater than" if node.get("exclusiveMinimum") else "at least"
        parts.append(f"{word} {_number(node['minimum'])}")
    if "maximum" in node:
        word = "less than" if node.get("exclusiveMaximum") else "at most"
        parts.append(f"{word} {_number(node['maximum'])}")
    if "maxLength" in node:
        parts.append(f"at most {node['maxLength']} characters")
    if "maxItems" in node:
        parts.append(f"at most {node['maxItems']} items")
    if "maxProperties" in node:
        parts.append(f"at most {node['maxProperties']} entries")
    if not parts:
        return ""
    return parts[0][0].upper() + ", ".join(parts)[1:] + "."


def _default_text(node: dict[str, Any]) -> str:
    default = node.get("default")
    if default is None or isinstance(default, (dict, list)):
        return ""
    shown = json.dumps(default) if isinstance(default, bool) else _number(default)
    return f"Default: {shown}."


def _describe_defaults_and_bounds(node: dict[str, Any]) -> None:
    """Append each field's default, allowed values and bounds to its description,
    so `kubectl explain` and the API reference say them without the schema."""
    for sub in node.get("properties", {}).values():
        _describe_defaults_and_bounds(sub)
        extra = []
        if "enum" in sub:
            extra.append("One of: " + ", ".join(str(v) for v in sub["enum"]) + ".")
        extra += [_default_text(sub), _bounds_text(sub)]
        text = " ".join(t for t in [sub.get("description", ""), *extra] if t)
        if text:
            sub["description"] = text
    items = node.get("items")
    if isinstance(items, dict):
        _describe_defaults_and_bounds(items)


def _filled(node: dict[str, Any]) -> dict[str, Any]:
    """An object's value with every nested default filled in."""
    out: dict[str, Any] = {}
    for name, sub in node.get("properties", {}).items():
        if sub.get("default") == {} and sub.get("type") == "object":
            out[name] = _filled(sub)
        elif "default" in sub:
            out[name] = copy.deepcopy(sub["default"])
    return out


def _expand_object_defaults(node: dict[str, Any]) -> None:
    """`default: {}` → the object with its nested defaults. The API server checks a
    default against the schema's CEL rules as written, without defaulting inside
    it, so a rule reading a defaulted field would reject `{}` and the whole CRD."""
    for sub in node.get("properties", {}).values():
        _expand_object_defaults(sub)
        if sub.get("default") == {} and sub.get("type") == "object":
            sub["default"] = _filled(sub)


def build_crd() -> dict[str, Any]:
    status = schema_for(models.FineTuneJobStatus)
    version = {
        "name": models.VERSION,
        "served": True,
        "storage": True,
        "subresources": {"status": {}},
        "additionalPrinterColumns": [
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Progress", "type": "string", "jsonPath": ".status.progress.display"},
            {"name": "Loss", "type": "string", "jsonPath": ".status.metrics.displayLoss"},
            {"name": "Best", "type": "string", "jsonPath": ".status.sweep.display"},
            {"name": "Method", "type": "string", "jsonPath": ".spec.method.type", "priority": 1},
            {
                "name": "Workers",
                "type": "integer",
                "jsonPath": ".spec.resources.workers",
                "priority": 1,
            },
            {"name": "Reason", "type": "string", "jsonPath": ".status.reason"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        "schema": {
            "openAPIV3Schema": {
                "type": "object",
                "description": "FineTuneJob fine-tunes a language model on a Ray cluster "
                "(KubeRay) with DeepSpeed ZeRO: LoRA, QLoRA or full fine-tuning.",
                "required": ["spec"],
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "metadata": {"type": "object"},
                    "spec": spec_schema(),
                    "status": status,
                },
            }
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {
                "app.kubernetes.io/name": "kubetune",
                "app.kubernetes.io/part-of": "kubetune",
            },
        },
        "spec": {
            "group": models.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": models.KIND,
                "listKind": models.KIND + "List",
                "plural": models.PLURAL,
                "singular": models.SINGULAR,
                "shortNames": models.SHORT_NAMES,
                "categories": ["kubetune", "all"],
            },
            "versions": [version],
        },
    }
