"""Turn a CustomResourceDefinition's openAPIV3Schema into the strict JSON schema checked in next to it.

    python k8s/schemas/crd_to_jsonschema.py CRD.yaml OUT.json --source "kubeflow/trainer v2.3.0 (commit <sha>), <path>"

A CRD without a structural schema (Katib's Experiment: only ``x-kubernetes-preserve-unknown-fields``; its webhook
validates) takes its structure from the API's OpenAPI definitions instead, the ones generated from its Go types:

    python k8s/schemas/crd_to_jsonschema.py experiment.yaml OUT.json --definitions swagger.json \
        --root v1beta1.Experiment --enums '{"v1beta1.ObjectiveSpec.type": ["minimize", "maximize"], ...}' --source ...

Definitions the file does not hold (ObjectMeta, Container, the unstructured trial template) stay open objects;
``--enums`` adds the allowed values the Go types name as constants (the generated definitions say only "string").

What the API server does with a structural schema, made explicit for an offline validator: an object that lists
its ``properties`` (or lists none and is no map) accepts no other field (server-side strict field validation), unless the CRD marks it
``x-kubernetes-preserve-unknown-fields``; apiVersion and kind are fixed to the CRD's group/version and kind.
Descriptions are dropped (the CRD is the documentation). CEL rules (``x-kubernetes-validations``) are kept as
annotations: jsonschema does not evaluate them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml


def _strict(node: Any, names: bool = False) -> Any:
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    if names:  # the mapping under "properties": field names (a field may be called "description") -> schemas
        return {k: _strict(v) for k, v in node.items()}
    out = {k: _strict(v, names=k == "properties") for k, v in node.items() if k != "description"}
    # an object with properties, or an object with none and no map values (e.g. mlPolicy.torch: {}), keeps
    # nothing else: the server prunes, or with strict field validation refuses, any other field
    closed = "properties" in node or (node.get("type") == "object" and "additionalProperties" not in node)
    if closed and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def convert(crd: dict[str, Any], source: str) -> dict[str, Any]:
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served", True) and v.get("storage", True)]
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": f"{group}/{version['name']}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["properties"]["metadata"] = {"type": "object", "required": ["name"]}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": f"{kind}, {group}/{version['name']} ({crd['spec']['scope']})",
            "description": f"Derived by k8s/schemas/crd_to_jsonschema.py from {source}.", **schema}


OPEN = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}  # a type defined elsewhere: not checked here


def from_definitions(crd: dict[str, Any], swagger: dict[str, Any], root: str, enums: dict[str, list[str]],
                     source: str) -> dict[str, Any]:
    """The schema of ``root`` in the OpenAPI ``definitions``, strict as above, with ``enums`` (``Def.field``)."""
    defs = swagger["definitions"]

    def resolve(node: Any, names: bool = False) -> Any:
        if isinstance(node, list):
            return [resolve(n) for n in node]
        if not isinstance(node, dict):
            return node
        if names:  # field names -> schemas (FileSystemPath has a field called "format")
            return {k: resolve(v) for k, v in node.items()}
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            return {"$ref": f"#/$defs/{name}"} if name in defs else OPEN
        return {k: resolve(v, names=k == "properties") for k, v in node.items() if k not in ("default", "format")}

    out = {name: _strict(resolve(d)) for name, d in defs.items()}
    for dotted, values in enums.items():
        name, _, prop = dotted.rpartition(".")
        out[name]["properties"][prop]["enum"] = values
    schema = out.pop(root)
    crd_schema = {"spec": {"group": crd["spec"]["group"], "scope": crd["spec"]["scope"],
                           "names": crd["spec"]["names"],
                           "versions": [{**v, "schema": {"openAPIV3Schema": schema}} for v in crd["spec"]["versions"]]}}
    return {**convert(crd_schema, source), "$defs": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("crd", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--source", required=True, help="where the CRD came from: repository, tag, commit, path")
    p.add_argument("--definitions", type=Path, help="OpenAPI (swagger 2) definitions of a CRD without a schema")
    p.add_argument("--root", help="with --definitions: the definition of the CRD's kind, e.g. v1beta1.Experiment")
    p.add_argument("--enums", default="{}", help="with --definitions: JSON {\"Def.field\": [values]}")
    a = p.parse_args()
    crd = yaml.safe_load(a.crd.read_text(encoding="utf-8"))
    if a.definitions:
        swagger = json.loads(a.definitions.read_text(encoding="utf-8"))
        schema = from_definitions(crd, swagger, a.root, json.loads(a.enums), a.source)
    else:
        schema = convert(crd, a.source)
    a.out.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
