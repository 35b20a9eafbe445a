#!/usr/bin/env python3
"""Validates rendered overlays: schemas, then what schemas cannot see.

Usage: k8s_validate.py --keda-schema FILE --k8s-version V [--k8s-version V ...]
                       OVERLAY=RENDERED.yaml [...]

1. Every Kubernetes object against the API's own schemas, strictly (unknown fields are
   errors), for each version given (kubernetes-validate ships them).
2. Every KEDA ScaledObject against our schema (k8s/schemas/); any other kind without a
   schema is an error, never skipped.
3. Consistency of the objects with each other and with the binaries' flags (see
   check_* below): expanded args, ports and probes on the listen flags, GPUs for CUDA
   devices, grace periods over idle timeouts, non-root read-only containers, and KEDA
   triggers on the streams and group the workers use.

Prints one line per problem and exits 1 if there is any.
"""

import argparse
import json
import re
import sys

import jsonschema
import kubernetes_validate

from k8s_manifests import (
    WORKLOAD_KINDS,
    ManifestError,
    containers,
    is_fmboost_binary,
    listen_port,
    load_documents,
    object_key,
)

KEDA_API = "keda.sh/v1alpha1"
# The gRPC servers of our binaries: the coordinator's --listen, the workers' --health-listen.
GRPC_LISTEN_FLAGS = ("--listen", "--health-listen")
GPU_RESOURCE = "nvidia.com/gpu"


def keda_validator(schema_path):
    with open(schema_path, encoding="utf-8") as f:
        schema = json.load(f)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def check_schemas(docs, versions, keda):
    errors = []
    for doc in docs:
        key = object_key(doc)
        if doc["apiVersion"] == KEDA_API and doc["kind"] == "ScaledObject":
            for e in sorted(keda.iter_errors(doc), key=lambda e: list(e.path)):
                path = ".".join(str(p) for p in e.path) or "(root)"
                errors.append(f"{key}: KEDA schema: {path}: {e.message}")
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path) or "(root)"
                errors.append(f"{key}: Kubernetes {version} schema: {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError:
                errors.append(f"{key}: no schema for {doc['apiVersion']} {doc['kind']} (Kubernetes {version})")
    return errors


def check_containers(conts):
    """Args, ports, probes and devices of our own containers against their flags."""
    errors = []
    for c in conts:
        where = f"{c.workload} container {c.container}"
        declared = {p["containerPort"] for p in c.ports}
        probe_ports = {k: p["port"] for k, p in c.probes.items() if "port" in p}
        for kind, port in probe_ports.items():
            if not isinstance(port, int):
                errors.append(f"{where}: {kind} port {port!r}: give the number, so it can be checked against the flags")
            elif port not in declared:
                errors.append(f"{where}: {kind} port {port} is not a containerPort")
        if not is_fmboost_binary(c.binary):
            continue
        if c.unresolved:
            errors.append(f"{where}: args refer to undefined env vars {c.unresolved}")
        for name in c.env_names:
            if not any(f"$({name})" in a for a in c.args_raw):
                errors.append(f"{where}: env {name} is not used by any arg (the binaries read flags only)")
        listens = {}
        for flag, value in c.flags.items():
            if flag.endswith("listen"):
                port = listen_port(value)
                if port is None:
                    errors.append(f"{where}: {flag}={value!r} is not HOST:PORT")
                else:
                    listens[flag] = port
        for port in sorted(declared - set(listens.values())):
            errors.append(f"{where}: containerPort {port} is no --*listen flag's port")
        for flag, port in sorted(listens.items()):
            if port not in declared:
                errors.append(f"{where}: {flag} port {port} has no containerPort")
        grpc_ports = {listens[f] for f in GRPC_LISTEN_FLAGS if f in listens}
        for kind, probe in c.probes.items():
            if probe["kind"] != "grpc":
                errors.append(f"{where}: {kind} is {probe['kind']}, not a gRPC health probe")
            elif probe["port"] not in grpc_ports:
                errors.append(f"{where}: {kind} port {probe['port']} is not a gRPC listen port {sorted(grpc_ports)}")
        errors.extend(_check_device(c, where))
        idle = c.flags.get("--idle-timeout-ms")
        if idle is not None:
            if not idle.isdigit():
                errors.append(f"{where}: --idle-timeout-ms={idle!r} is not a number of milliseconds")
            elif c.termination_grace_s is None or c.termination_grace_s * 1000 <= int(idle):
                errors.append(
                    f"{where}: terminationGracePeriodSeconds {c.termination_grace_s} must exceed "
                    f"--idle-timeout-ms {idle} (both bound the stage's slowest batch; a drain "
                    f"cut short by SIGKILL loses the batch's progress)"
                )
    return errors


def _check_device(c, where):
    device = c.flags.get("--device")
    if device is None:
        return []
    gpus = (c.resources.get("limits") or {}).get(GPU_RESOURCE)
    m = re.fullmatch(r"cuda:([0-9]+)", device)
    if device == "cpu":
        return [f"{where}: --device=cpu but the pod asks for {gpus} {GPU_RESOURCE}"] if gpus else []
    if m is None:
        return [f"{where}: --device={device!r} is neither cpu nor cuda:N"]
    if gpus is None or int(gpus) <= int(m.group(1)):
        return [f"{where}: --device={device} needs a {GPU_RESOURCE} limit above {m.group(1)}, has {gpus}"]
    return []


def check_security(docs):
    """Every container of every workload: non-root, no privilege escalation, read-only root."""
    errors = []
    for doc in docs:
        if doc["kind"] not in WORKLOAD_KINDS:
            continue
        pod = doc["spec"]["template"]["spec"]
        pod_sc = pod.get("securityContext") or {}
        emptydirs = {v["name"] for v in pod.get("volumes") or [] if "emptyDir" in v}
        for c in (pod.get("initContainers") or []) + pod["containers"]:
            where = f"{object_key(doc)} container {c['name']}"
            sc = c.get("securityContext") or {}
            if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
                errors.append(f"{where}: runAsNonRoot is not set")
            if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
                errors.append(f"{where}: runs as uid 0")
            if sc.get("allowPrivilegeEscalation") is not False:
                errors.append(f"{where}: allowPrivilegeEscalation is not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                errors.append(f"{where}: readOnlyRootFilesystem is not true")
            tmp = [m for m in c.get("volumeMounts") or [] if m["mountPath"] == "/tmp"]
            if not tmp or tmp[0]["name"] not in emptydirs:
                errors.append(f"{where}: /tmp is not an emptyDir (the root filesystem is read-only)")
    return errors


def check_scaled_objects(docs, conts):
    """KEDA targets exist, leave replicas to KEDA, and watch the streams the workers read."""
    errors = []
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    by_workload = {}
    for c in conts:
        by_workload.setdefault(c.workload, []).append(c)
    for so in (d for d in docs if d["kind"] == "ScaledObject"):
        where = object_key(so)
        spec = so["spec"]
        ref = spec["scaleTargetRef"]
        if ref.get("kind", "Deployment") != "Deployment" or ref["name"] not in deployments:
            errors.append(f"{where}: scaleTargetRef {ref} is not a Deployment in the render")
            continue
        target = deployments[ref["name"]]
        if "replicas" in target["spec"]:
            errors.append(f"{where}: Deployment {ref['name']} sets replicas; KEDA owns that field")
        lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if lo > hi:
            errors.append(f"{where}: minReplicaCount {lo} > maxReplicaCount {hi}")
        stage = (target["spec"]["template"]["metadata"].get("labels") or {}).get("fmboost.io/stage")
        workers = [c for c in by_workload.get(f"Deployment/{ref['name']}", []) if is_fmboost_binary(c.binary)]
        if stage is None or len(workers) != 1:
            errors.append(f"{where}: target {ref['name']} needs an fmboost.io/stage label and one fmboost container")
            continue
        flags = workers[0].flags
        ns = flags.get("--namespace")
        redis = re.fullmatch(r"rediss?://(?:[^@/]*@)?([^/]+)(?:/.*)?", flags.get("--redis") or "")
        for t in spec["triggers"]:
            if t["type"] != "redis-streams":
                continue
            md = t["metadata"]
            tname = f"{where} trigger {t.get('name', t['type'])}"
            if not re.fullmatch(rf"{re.escape(ns or '')}:q:{re.escape(stage)}:[a-z0-9-]+", md.get("stream", "")):
                errors.append(f"{tname}: stream {md.get('stream')!r} is not {ns}:q:{stage}:<priority>")
            if md.get("consumerGroup") != f"{ns}:workers:{stage}":
                errors.append(f"{tname}: consumerGroup {md.get('consumerGroup')!r} is not {ns}:workers:{stage}")
            if redis is None or md.get("address") != redis.group(1):
                errors.append(f"{tname}: address {md.get('address')!r} is not the workers' --redis {flags.get('--redis')!r}")
    return errors


def validate_overlay(path, versions, keda):
    docs = load_documents(path)
    conts = containers(docs)
    return (
        check_schemas(docs, versions, keda)
        + check_containers(conts)
        + check_security(docs)
        + check_scaled_objects(docs, conts)
    ), docs


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keda-schema", required=True)
    parser.add_argument("--k8s-version", action="append", required=True)
    parser.add_argument("overlays", nargs="+", metavar="OVERLAY=RENDERED.yaml")
    args = parser.parse_args(argv)
    keda = keda_validator(args.keda_schema)
    failed = False
    for spec in args.overlays:
        if "=" not in spec:
            parser.error(f"{spec!r} is not OVERLAY=RENDERED.yaml")
        overlay, path = spec.split("=", 1)
        try:
            errors, docs = validate_overlay(path, args.k8s_version, keda)
        except ManifestError as e:
            errors, docs = [str(e)], []
        for e in errors:
            print(f"FAIL {overlay}: {e}")
        if errors:
            failed = True
        else:
            kinds = sorted({d["kind"] for d in docs})
            print(
                f"ok   {overlay}: {len(docs)} objects ({', '.join(kinds)}) valid against "
                f"Kubernetes {', '.join(args.k8s_version)} and the KEDA schema; consistency checks pass"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
