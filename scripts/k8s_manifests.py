"""Reading rendered Kubernetes manifests (the output of `kubectl kustomize`).

Shared by k8s_container_args.py (prints what each container runs, as JSON) and
k8s_validate.py (schemas and consistency checks). Needs PyYAML.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
PROBE_KINDS = ("startupProbe", "readinessProbe", "livenessProbe")

# Kubernetes expands $(VAR) in command and args from the container's env; $$ escapes a $.
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


class ManifestError(Exception):
    """A rendered manifest that cannot be read the way the checks need."""


def load_documents(path):
    """All non-empty YAML documents of a rendered overlay file."""
    try:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
    except OSError as e:
        raise ManifestError(f"{path}: cannot read: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ManifestError(f"{path}: not valid YAML: {e}") from e
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            raise ManifestError(f"{path}: document {i} is not a Kubernetes object")
    return docs


def object_key(doc):
    return f"{doc['kind']}/{doc.get('metadata', {}).get('name', '?')}"


def config_maps(docs):
    """ConfigMap name -> its data, as rendered (generated names carry their hash)."""
    return {
        d["metadata"]["name"]: d.get("data", {}) or {}
        for d in docs
        if d["kind"] == "ConfigMap"
    }


@dataclass
class Container:
    """One container of a workload, with its args expanded the way the kubelet does."""

    workload: str
    container: str
    image: str
    binary: str | None
    args_raw: list
    args: list
    unresolved: list
    flags: dict
    positionals: list
    ports: list
    probes: dict
    env_names: list
    termination_grace_s: int | None
    resources: dict
    labels: dict = field(default_factory=dict)

    def to_json(self, overlay):
        return {
            "overlay": overlay,
            "workload": self.workload,
            "container": self.container,
            "image": self.image,
            "binary": self.binary,
            "fmboost_binary": is_fmboost_binary(self.binary),
            "args": self.args,
            "args_raw": self.args_raw,
            "flags": self.flags,
            "positionals": self.positionals,
            "ports": self.ports,
            "probes": self.probes,
            "env": self.env_names,
        }


def is_fmboost_binary(binary):
    return binary is not None and binary.startswith("fmboost")


def env_values(container, cms, where):
    """Env var name -> value where it can be known offline (literal or ConfigMap key)."""
    values = {}
    for var in container.get("env", []) or []:
        name = var["name"]
        if "value" in var:
            values[name] = str(var["value"])
            continue
        ref = (var.get("valueFrom") or {}).get("configMapKeyRef")
        if ref is None:
            continue  # secrets, field refs: only known in the cluster
        data = cms.get(ref["name"])
        if data is None:
            raise ManifestError(f"{where}: env {name} names ConfigMap {ref['name']}, not in the render")
        if ref["key"] not in data:
            raise ManifestError(f"{where}: env {name} names key {ref['key']!r}, not in ConfigMap {ref['name']}")
        values[name] = str(data[ref["key"]])
    return values


def expand(arg, values):
    """Kubelet-style $(VAR) expansion; returns (expanded, names left unexpanded)."""
    missing = []

    def sub(m):
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        if name in values:
            return values[name]
        missing.append(name)
        return m.group(0)

    return _VAR_REF.sub(sub, arg), missing


def parse_flags(args):
    """Splits args into {--flag: value} (value None for a bare switch) and positionals.

    Accepts both --flag=value and --flag value; a repeated flag is an error here because
    none of fmboost's flags take several values.
    """
    flags, positionals = {}, []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            if "=" in arg:
                name, value = arg.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("-"):
                name, value = arg, args[i + 1]
                i += 1
            else:
                name, value = arg, None
            if name in flags:
                raise ManifestError(f"flag {name} given twice")
            flags[name] = value
        else:
            positionals.append(arg)
        i += 1
    return flags, positionals


def _probe(probe):
    for kind in ("grpc", "httpGet", "tcpSocket"):
        if kind in probe:
            return {"kind": kind, "port": probe[kind].get("port"), "service": probe[kind].get("service")}
    if "exec" in probe:
        return {"kind": "exec", "command": probe["exec"].get("command")}
    raise ManifestError(f"probe without a handler: {probe}")


def containers(docs):
    """Every container (init containers included) of every workload in the render."""
    cms = config_maps(docs)
    found = []
    for doc in docs:
        if doc["kind"] not in WORKLOAD_KINDS:
            continue
        template = doc["spec"]["template"]
        pod = template["spec"]
        for c in (pod.get("initContainers") or []) + pod["containers"]:
            where = f"{object_key(doc)} container {c['name']}"
            values = env_values(c, cms, where)
            command = c.get("command") or []
            args_raw = list(command[1:]) + list(c.get("args") or [])
            args, unresolved = [], []
            for a in args_raw:
                expanded, missing = expand(str(a), values)
                args.append(expanded)
                unresolved.extend(missing)
            try:
                flags, positionals = parse_flags(args)
            except ManifestError as e:
                raise ManifestError(f"{where}: {e}") from e
            found.append(
                Container(
                    workload=object_key(doc),
                    container=c["name"],
                    image=c.get("image", ""),
                    binary=command[0] if command else None,
                    args_raw=args_raw,
                    args=args,
                    unresolved=sorted(set(unresolved)),
                    flags=flags,
                    positionals=positionals,
                    ports=[
                        {"name": p.get("name"), "containerPort": p["containerPort"], "protocol": p.get("protocol", "TCP")}
                        for p in c.get("ports") or []
                    ],
                    probes={k: _probe(c[k]) for k in PROBE_KINDS if k in c},
                    env_names=[v["name"] for v in c.get("env") or []],
                    termination_grace_s=pod.get("terminationGracePeriodSeconds"),
                    resources=c.get("resources") or {},
                    labels=(template.get("metadata") or {}).get("labels") or {},
                )
            )
    return found


def listen_port(address):
    """Port of a listen address such as 0.0.0.0:50051 or [::]:50051, or None."""
    m = re.fullmatch(r"(?:\[[0-9a-fA-F:]+\]|[^:\[\]]*):([0-9]{1,5})", address or "")
    return int(m.group(1)) if m else None
