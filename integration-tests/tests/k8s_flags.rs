//! The Kubernetes manifests against the binaries they run (docs/deploy.md, "What is
//! validated"): every fmboost container's args must be flags its binary's `--help` lists,
//! with values where the flag takes one; its ports must be the ports of its listen flags
//! (`--listen`, `--metrics-listen`, `--health-listen`, set or by default); its probes must be
//! gRPC probes on its grpc.health.v1 port; and every `FMBOOST_*` env var it sets must be
//! read by the binary (or be an `FMBOOST_ARG_*` var that an arg expands).
//!
//! Needs the workspace binaries, built into the same target directory as this test
//! (`cargo build --workspace --bins`), and what `scripts/validate-k8s.sh` needs (kubectl,
//! python3; PyPI the first time).

mod k8s_flags {
    pub mod check;
    pub mod help;
}

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_flags::check::{check_container, Container, ContainerArgs};
use k8s_flags::help::BinaryHelp;

/// The binaries every overlay must run (the coordinator and one pool per stage).
const DEPLOYED: [&str; 4] = ["fmboost-coordinator", "fmboost-worker-diffusion", "fmboost-worker-cfm", "fmboost-worker-decoder"];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("workspace root")
}

/// `target/<profile>/`: this test runs from `target/<profile>/deps/`, and cargo puts the
/// workspace's binaries one level up. (CARGO_BIN_EXE_* covers only this crate's own.)
fn binary_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    exe.parent().and_then(Path::parent).expect("test executable under target/<profile>/deps").to_path_buf()
}

/// `--help` of each binary, run once.
#[derive(Default)]
struct Helps(BTreeMap<String, BinaryHelp>);

impl Helps {
    fn get(&mut self, binary: &str) -> &BinaryHelp {
        let name = Path::new(binary).file_name().and_then(|n| n.to_str()).unwrap_or(binary).to_string();
        self.0.entry(name.clone()).or_insert_with(|| {
            let path = binary_dir().join(&name);
            assert!(
                path.is_file(),
                "{} not found: build the workspace binaries first, with the same CARGO_TARGET_DIR as the tests: \
                 cargo build --workspace --bins",
                path.display()
            );
            BinaryHelp::of_binary(&path).unwrap_or_else(|e| panic!("{e}"))
        })
    }
}

/// Runs `scripts/validate-k8s.sh --out DIR` and reads the `container-args.json` it writes.
fn rendered_containers() -> Vec<Container> {
    let root = workspace_root();
    let out = tempfile::tempdir().expect("temporary directory");
    let run = Command::new("bash")
        .arg(root.join("scripts/validate-k8s.sh"))
        .arg("--out")
        .arg(out.path())
        .current_dir(&root)
        .output()
        .expect("running bash scripts/validate-k8s.sh");
    assert!(
        run.status.success(),
        "scripts/validate-k8s.sh failed ({}):\n{}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let path = out.path().join("container-args.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let parsed: ContainerArgs = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(parsed.format, 1, "{}: format {} (this test reads format 1)", path.display(), parsed.format);
    parsed.containers
}

fn overlays() -> BTreeSet<String> {
    let dir = workspace_root().join("k8s/overlays");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("overlay entry"))
        .filter(|entry| entry.path().is_dir())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn manifests_use_the_binaries_real_flags_ports_and_probes() {
    let containers = rendered_containers();
    let mut helps = Helps::default();
    let mut errors = Vec::new();
    let mut seen = BTreeSet::new();
    for c in containers.iter().filter(|c| c.fmboost_binary) {
        let Some(binary) = c.binary.as_deref() else {
            errors.push(format!("{}: runs an fmboost image without naming the binary (command)", c.describe()));
            continue;
        };
        seen.insert((c.overlay.clone(), binary.to_string()));
        errors.extend(check_container(c, helps.get(binary)).into_iter().map(|e| format!("{}: {e}", c.describe())));
    }
    assert!(errors.is_empty(), "manifests disagree with the binaries:\n  {}", errors.join("\n  "));
    // Guards against passing on an empty or partial render.
    for overlay in overlays() {
        for binary in DEPLOYED {
            assert!(seen.contains(&(overlay.clone(), binary.to_string())), "overlay {overlay} renders no container running {binary}");
        }
    }
}

/// A worker container that passes: the base of the fabricated faults below.
fn good_worker() -> Container {
    serde_json::from_value(serde_json::json!({
        "overlay": "test", "workload": "Deployment/fmboost-worker-cfm", "container": "worker",
        "binary": "fmboost-worker-cfm", "fmboost_binary": true,
        "args": ["--redis=redis://r:6379", "--profile", "tiny", "--max-batch=2", "--stack-batches",
                 "--health-listen=0.0.0.0:50061", "--metrics-listen=0.0.0.0:9090"],
        "args_raw": ["--redis=redis://r:6379", "--profile", "tiny", "--max-batch=$(FMBOOST_ARG_MAX_BATCH)", "--stack-batches",
                     "--health-listen=0.0.0.0:50061", "--metrics-listen=0.0.0.0:9090"],
        "ports": [{"name": "health", "containerPort": 50061, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
        "probes": {"startupProbe": {"kind": "grpc", "port": 50061, "service": "liveness"},
                   "readinessProbe": {"kind": "grpc", "port": 50061, "service": null},
                   "livenessProbe": {"kind": "grpc", "port": "health", "service": "liveness"}},
        "env": ["FMBOOST_ARG_MAX_BATCH", "RUST_LOG"]
    }))
    .expect("a container-args.json entry")
}

/// The errors for `good_worker()` changed by `fault`, checked against the real worker binary.
fn worker_errors(fault: impl FnOnce(&mut Container)) -> Vec<String> {
    let mut c = good_worker();
    fault(&mut c);
    check_container(&c, Helps::default().get("fmboost-worker-cfm"))
}

fn assert_one_error(errors: Vec<String>, expected: &str) {
    assert!(errors.len() == 1 && errors[0].contains(expected), "expected one error containing {expected:?}, got {errors:#?}");
}

#[test]
fn a_consistent_container_passes() {
    assert_eq!(worker_errors(|_| {}), Vec::<String>::new());
}

#[test]
fn an_unknown_flag_is_reported() {
    assert_one_error(worker_errors(|c| c.args.push("--idle-timeout=5".into())), "unknown flag --idle-timeout");
}

#[test]
fn a_value_flag_without_value_and_a_switch_with_one_are_reported() {
    assert_one_error(worker_errors(|c| c.args.push("--device".into())), "--device takes a value and has none");
    // `--device --stack-batches`: the next token is a flag, not the value.
    assert_one_error(
        worker_errors(|c| {
            c.args.retain(|a| a != "--stack-batches");
            c.args.extend(["--device".into(), "--stack-batches".into()]);
        }),
        "--device takes a value and has none",
    );
    assert_one_error(worker_errors(|c| c.args.push("--device=".into())), "--device has an empty value");
    assert_one_error(worker_errors(|c| c.args[4] = "--stack-batches=true".into()), "--stack-batches is a switch and takes no value");
    assert_one_error(worker_errors(|c| c.args.push("--max-batch=3".into())), "--max-batch given more than once");
    assert_one_error(worker_errors(|c| c.args.push("stray".into())), "positional arg \"stray\"");
}

#[test]
fn ports_must_be_the_listen_flags_ports() {
    let errors = worker_errors(|c| c.ports[1].container_port = 9091);
    assert!(
        errors.len() == 2
            && errors.iter().any(|e| e.contains("containerPort 9091 is not the port of any listen flag"))
            && errors.iter().any(|e| e.contains("--metrics-listen port 9090 has no containerPort")),
        "{errors:#?}"
    );
    assert_one_error(worker_errors(|c| c.ports[1].name = Some("prometheus".into())), "named \"prometheus\" rather than \"metrics\"");
    // Not a socket address (the binary parses one): also leaves port 50061 and the probes
    // without a listen flag.
    let errors = worker_errors(|c| c.args[5] = "--health-listen=localhost:50061".into());
    assert!(errors.iter().any(|e| e.contains("--health-listen=localhost:50061: fmboost-worker-cfm would reject it")), "{errors:#?}");
}

#[test]
fn probes_must_be_grpc_on_the_health_port() {
    assert_one_error(
        worker_errors(|c| c.probes.get_mut("startupProbe").unwrap().port = Some(9090.into())),
        "startupProbe targets port 9090, not the gRPC health port 50061 (--health-listen)",
    );
    assert_one_error(worker_errors(|c| c.probes.get_mut("livenessProbe").unwrap().kind = "httpGet".into()), "livenessProbe is httpGet");
    let errors = worker_errors(|c| {
        c.args.retain(|a| !a.starts_with("--health-listen"));
        c.ports.remove(0);
    });
    assert_one_error(errors, "probes need the gRPC health server, but fmboost-worker-cfm gets no --health-listen");
}

#[test]
fn liveness_probes_must_not_follow_redis() {
    assert_one_error(
        worker_errors(|c| c.probes.get_mut("livenessProbe").unwrap().service = None),
        "livenessProbe asks for health service \"\", not \"liveness\" (a Redis outage must not restart the process)",
    );
    assert_one_error(
        worker_errors(|c| c.probes.get_mut("startupProbe").unwrap().service = Some(String::new())),
        "startupProbe asks for health service \"\", not \"liveness\"",
    );
    assert_one_error(
        worker_errors(|c| c.probes.get_mut("readinessProbe").unwrap().service = Some("liveness".into())),
        "readinessProbe asks for health service \"liveness\", not \"\" (readiness follows Redis)",
    );
}

#[test]
fn env_vars_must_be_read_or_expanded() {
    assert_one_error(worker_errors(|c| c.env.push("FMBOOST_ARG_UNUSED".into())), "FMBOOST_ARG_UNUSED is for $(VAR) expansion but no arg uses it");
    assert_one_error(worker_errors(|c| c.env.push("FMBOOST_PROFILES".into())), "env FMBOOST_PROFILES: fmboost-worker-cfm does not read it");
    // Read by the worker, but --redis in the args wins over it.
    assert_one_error(worker_errors(|c| c.env.push("FMBOOST_REDIS".into())), "env FMBOOST_REDIS is ignored");
    assert_eq!(
        worker_errors(|c| {
            c.args.retain(|a| !a.starts_with("--redis"));
            c.env.push("FMBOOST_REDIS".into());
        }),
        Vec::<String>::new()
    );
}

#[test]
fn the_coordinator_serves_health_on_its_listen_port_by_default() {
    let mut helps = Helps::default();
    let help = helps.get("fmboost-coordinator");
    assert!(help.flags.contains_key("--profiles") && !help.flags.contains_key("--health-listen"));
    let coordinator = |port: u16| -> Container {
        serde_json::from_value(serde_json::json!({
            "overlay": "test", "workload": "Deployment/fmboost-coordinator", "container": "coordinator",
            "binary": "fmboost-coordinator", "fmboost_binary": true,
            "args": ["--profiles=tiny"], "args_raw": ["--profiles=tiny"],
            "ports": [{"name": "grpc", "containerPort": port}],
            "probes": {"readinessProbe": {"kind": "grpc", "port": port}},
            "env": []
        }))
        .unwrap()
    };
    // No --listen: the default 0.0.0.0:50051 applies.
    assert_eq!(check_container(&coordinator(50051), help), Vec::<String>::new());
    let errors = check_container(&coordinator(50052), help);
    assert!(errors.iter().any(|e| e.contains("--listen port 50051 has no containerPort")), "{errors:#?}");
    assert!(errors.iter().any(|e| e.contains("not the gRPC health port 50051 (--listen)")), "{errors:#?}");
}
