#!/usr/bin/env python3
"""Prints, as JSON, what every container of the rendered overlays runs.

Usage: k8s_container_args.py OVERLAY=RENDERED.yaml [...]
(scripts/validate-k8s.sh renders the overlays and writes this output to
<out>/container-args.json; run that script rather than this one by hand.)

Output, for a test that compares the manifests with the binaries' real flags:

  {"format": 1,
   "containers": [
     {"overlay": "gpu",                       # k8s/overlays/<name>
      "workload": "Deployment/fmboost-worker-cfm",
      "container": "worker",
      "image": "fmboost-cuda:0.1.0",
      "binary": "fmboost-worker-cfm",         # command[0]; null when the image's
                                              # entrypoint runs
      "fmboost_binary": true,                 # binary is one of ours (fmboost*)
      "args": ["--redis=redis://...", ...],   # after the kubelet's $(VAR) expansion
      "args_raw": ["--redis=redis://$(FMBOOST_ARG_REDIS_ADDRESS)", ...],
      "flags": {"--redis": "redis://...", ...},   # parsed from args; null = bare switch
      "positionals": [],
      "ports": [{"name": "health", "containerPort": 50061, "protocol": "TCP"}, ...],
      "probes": {"startupProbe": {"kind": "grpc", "port": 50061, "service": null}, ...},
      "env": ["FMBOOST_ARG_REDIS_ADDRESS", ...]}   # names only; all FMBOOST_ARG_* exist
                                                   # only for $(VAR) expansion
   ]}

Exit status 1 (with the reason on stderr) when a file cannot be read or an env var
refers to a ConfigMap key missing from the render.
"""

import json
import sys

from k8s_manifests import ManifestError, containers, load_documents


def main(argv):
    if not argv or any("=" not in a for a in argv):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    out = []
    try:
        for spec in argv:
            overlay, path = spec.split("=", 1)
            out.extend(c.to_json(overlay) for c in containers(load_documents(path)))
    except ManifestError as e:
        print(f"k8s_container_args: {e}", file=sys.stderr)
        return 1
    json.dump({"format": 1, "containers": out}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
