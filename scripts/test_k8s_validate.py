"""Tests of the manifest checks: a small valid render passes, and each fault is named.

Run by scripts/validate-k8s.sh (python -m unittest, in .venv-k8s).
"""

import copy
import os
import tempfile
import unittest

import yaml

import k8s_validate
from k8s_manifests import ManifestError, containers, expand, listen_port, load_documents, parse_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEDA_SCHEMA = os.path.join(ROOT, "k8s", "schemas", "keda-scaledobject-v1alpha1.schema.json")
VERSIONS = ["1.29"]


def good_render():
    """A worker pool as the overlays render it, trimmed to what the checks read."""
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "cfg-abc", "namespace": "fmboost"},
        "data": {"ns": "fm", "idle": "30000", "device": "cuda:0"},
    }
    worker = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "w-cfm", "namespace": "fmboost"},
        "spec": {
            "selector": {"matchLabels": {"s": "cfm"}},
            "template": {
                "metadata": {"labels": {"s": "cfm", "fmboost.io/stage": "cfm"}},
                "spec": {
                    "terminationGracePeriodSeconds": 45,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
                    "containers": [
                        {
                            "name": "worker",
                            "image": "fmboost-cuda:0.1.0",
                            "command": ["fmboost-worker-cfm"],
                            "args": [
                                "--redis=redis://r.fmboost.svc:6379",
                                "--namespace=$(A_NS)",
                                "--device=$(A_DEVICE)",
                                "--idle-timeout-ms=$(A_IDLE)",
                                "--health-listen=0.0.0.0:50061",
                                "--metrics-listen=0.0.0.0:9090",
                            ],
                            "env": [
                                {"name": n, "valueFrom": {"configMapKeyRef": {"name": "cfg-abc", "key": k}}}
                                for n, k in (("A_NS", "ns"), ("A_DEVICE", "device"), ("A_IDLE", "idle"))
                            ],
                            "ports": [
                                {"name": "health", "containerPort": 50061},
                                {"name": "metrics", "containerPort": 9090},
                            ],
                            "startupProbe": {"grpc": {"port": 50061}},
                            "livenessProbe": {"grpc": {"port": 50061}},
                            "resources": {"limits": {"nvidia.com/gpu": 1}},
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                            },
                            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                        }
                    ],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }
    scaled = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "w-cfm", "namespace": "fmboost"},
        "spec": {
            "scaleTargetRef": {"name": "w-cfm"},
            "minReplicaCount": 1,
            "maxReplicaCount": 4,
            "triggers": [
                {
                    "type": "redis-streams",
                    "name": "normal",
                    "metadata": {
                        "address": "r.fmboost.svc:6379",
                        "stream": "fm:q:cfm:normal",
                        "consumerGroup": "fm:workers:cfm",
                        "lagCount": "4",
                        "activationLagCount": "0",
                    },
                }
            ],
        },
    }
    return [config, worker, scaled]


def container_of(docs):
    return docs[1]["spec"]["template"]["spec"]["containers"][0]


class ChecksTest(unittest.TestCase):
    keda = k8s_validate.keda_validator(KEDA_SCHEMA)

    def errors(self, docs):
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump_all(docs, f)
        try:
            return k8s_validate.validate_overlay(f.name, VERSIONS, self.keda)[0]
        finally:
            os.unlink(f.name)

    def assert_one_error(self, docs, *fragments):
        errors = self.errors(docs)
        self.assertEqual(len(errors), 1, errors)
        for fragment in fragments:
            self.assertIn(fragment, errors[0])

    def test_good_render_passes(self):
        self.assertEqual(self.errors(good_render()), [])

    def test_kubernetes_schema_rejects_a_misspelt_field(self):
        docs = good_render()
        container_of(docs)["imagePullPolicies"] = "Always"
        self.assert_one_error(docs, "Kubernetes 1.29 schema", "imagePullPolicies")

    def test_kind_without_schema_is_an_error(self):
        docs = good_render() + [{"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "x"}}]
        self.assert_one_error(docs, "no schema for example.com/v1 Widget")

    def test_keda_schema_rejects_unknown_spec_field(self):
        docs = good_render()
        docs[2]["spec"]["maxReplicas"] = 3
        self.assert_one_error(docs, "KEDA schema", "maxReplicas")

    def test_keda_schema_needs_activation_and_group_with_lag_count(self):
        docs = good_render()
        del docs[2]["spec"]["triggers"][0]["metadata"]["activationLagCount"]
        self.assert_one_error(docs, "KEDA schema", "activationLagCount")
        docs = good_render()
        del docs[2]["spec"]["triggers"][0]["metadata"]["consumerGroup"]
        errors = self.errors(docs)
        self.assertTrue(any("KEDA schema" in e and "consumerGroup" in e for e in errors), errors)

    def test_keda_schema_rejects_non_numeric_lag_count(self):
        docs = good_render()
        docs[2]["spec"]["triggers"][0]["metadata"]["lagCount"] = "REPLACED"
        self.assert_one_error(docs, "KEDA schema", "lagCount")

    def test_undefined_env_var_in_args(self):
        docs = good_render()
        container_of(docs)["args"].append("--max-batch=$(A_MISSING)")
        self.assert_one_error(docs, "undefined env vars ['A_MISSING']")

    def test_env_var_no_arg_uses(self):
        docs = good_render()
        container_of(docs)["env"].append({"name": "A_UNUSED", "value": "1"})
        self.assert_one_error(docs, "env A_UNUSED is not used")

    def test_missing_config_map_key(self):
        docs = good_render()
        del docs[0]["data"]["idle"]
        with self.assertRaisesRegex(ManifestError, "env A_IDLE names key 'idle', not in ConfigMap cfg-abc"):
            self.errors(docs)

    def test_probe_on_metrics_port(self):
        docs = good_render()
        container_of(docs)["livenessProbe"] = {"grpc": {"port": 9090}}
        self.assert_one_error(docs, "livenessProbe port 9090 is not a gRPC listen port [50061]")

    def test_port_without_listen_flag(self):
        docs = good_render()
        container_of(docs)["ports"].append({"name": "extra", "containerPort": 7000})
        self.assert_one_error(docs, "containerPort 7000 is no --*listen flag's port")

    def test_listen_flag_without_port(self):
        docs = good_render()
        container_of(docs)["ports"].pop()  # metrics
        self.assert_one_error(docs, "--metrics-listen port 9090 has no containerPort")

    def test_cuda_device_needs_a_gpu(self):
        docs = good_render()
        del container_of(docs)["resources"]["limits"]
        self.assert_one_error(docs, "--device=cuda:0 needs a nvidia.com/gpu limit")

    def test_cpu_device_must_not_hold_a_gpu(self):
        docs = good_render()
        docs[0]["data"]["device"] = "cpu"
        self.assert_one_error(docs, "--device=cpu but the pod asks for 1 nvidia.com/gpu")

    def test_grace_period_must_exceed_idle_timeout(self):
        docs = good_render()
        docs[1]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30
        self.assert_one_error(docs, "terminationGracePeriodSeconds 30 must exceed --idle-timeout-ms 30000")

    def test_root_filesystem_must_be_read_only(self):
        docs = good_render()
        container_of(docs)["securityContext"]["readOnlyRootFilesystem"] = False
        self.assert_one_error(docs, "readOnlyRootFilesystem is not true")

    def test_non_root_required(self):
        docs = good_render()
        del docs[1]["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]
        self.assert_one_error(docs, "runAsNonRoot is not set")

    def test_trigger_stream_must_match_worker_namespace(self):
        docs = good_render()
        docs[0]["data"]["ns"] = "other"
        errors = self.errors(docs)
        self.assertEqual(len(errors), 2, errors)
        self.assertIn("stream 'fm:q:cfm:normal' is not other:q:cfm:<priority>", errors[0])
        self.assertIn("consumerGroup 'fm:workers:cfm' is not other:workers:cfm", errors[1])

    def test_trigger_address_must_match_worker_redis(self):
        docs = good_render()
        docs[2]["spec"]["triggers"][0]["metadata"]["address"] = "elsewhere:6379"
        self.assert_one_error(docs, "address 'elsewhere:6379' is not the workers' --redis")

    def test_keda_target_must_not_set_replicas(self):
        docs = good_render()
        docs[1]["spec"]["replicas"] = 2
        self.assert_one_error(docs, "sets replicas; KEDA owns that field")

    def test_keda_target_must_exist(self):
        docs = good_render()
        docs[2]["spec"]["scaleTargetRef"]["name"] = "w-gone"
        self.assert_one_error(docs, "is not a Deployment in the render")


class ParsingTest(unittest.TestCase):
    def test_expand_like_the_kubelet(self):
        self.assertEqual(expand("a=$(X)-$(Y)", {"X": "1"}), ("a=1-$(Y)", ["Y"]))
        self.assertEqual(expand("$$(X)", {"X": "1"}), ("$(X)", []))

    def test_parse_flags(self):
        flags, pos = parse_flags(["--a=1", "--b", "2", "--c", "conf", "--d"])
        self.assertEqual(flags, {"--a": "1", "--b": "2", "--c": "conf", "--d": None})
        self.assertEqual(pos, [])
        self.assertEqual(parse_flags(["/etc/redis.conf"]), ({}, ["/etc/redis.conf"]))
        with self.assertRaises(ManifestError):
            parse_flags(["--a=1", "--a=2"])

    def test_unreadable_render_is_named(self):
        with self.assertRaisesRegex(ManifestError, "/nonexistent.yaml: cannot read"):
            load_documents("/nonexistent.yaml")
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write("apiVersion: v1\nkind: [unclosed\n")
        try:
            with self.assertRaisesRegex(ManifestError, "not valid YAML"):
                load_documents(f.name)
        finally:
            os.unlink(f.name)

    def test_listen_port(self):
        self.assertEqual(listen_port("0.0.0.0:50051"), 50051)
        self.assertEqual(listen_port("[::]:9090"), 9090)
        self.assertIsNone(listen_port("0.0.0.0"))

    def test_container_extraction(self):
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump_all(good_render(), f)
        try:
            (c,) = containers(load_documents(f.name))
        finally:
            os.unlink(f.name)
        self.assertEqual(c.binary, "fmboost-worker-cfm")
        self.assertEqual(c.flags["--namespace"], "fm")
        self.assertEqual(c.flags["--idle-timeout-ms"], "30000")
        self.assertEqual(c.probes["startupProbe"], {"kind": "grpc", "port": 50061, "service": None})
        self.assertEqual(c.unresolved, [])


if __name__ == "__main__":
    unittest.main()
