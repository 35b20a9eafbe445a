//! Checks one container of the rendered manifests (an entry of `container-args.json`, written
//! by `scripts/k8s_container_args.py`) against its binary's real command-line interface.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use serde::Deserialize;

use super::help::BinaryHelp;

/// `container-args.json`, format 1 (documented in `scripts/k8s_container_args.py`).
#[derive(Debug, Deserialize)]
pub struct ContainerArgs {
    pub format: u32,
    pub containers: Vec<Container>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Container {
    pub overlay: String,
    pub workload: String,
    pub container: String,
    /// `command[0]`; None when the image's entrypoint runs.
    pub binary: Option<String>,
    pub fmboost_binary: bool,
    /// `command[1..]` + `args`, after the kubelet's `$(VAR)` expansion.
    pub args: Vec<String>,
    /// The same before expansion.
    pub args_raw: Vec<String>,
    pub ports: Vec<Port>,
    pub probes: BTreeMap<String, Probe>,
    /// Names of the env vars the container sets.
    pub env: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Port {
    pub name: Option<String>,
    #[serde(rename = "containerPort")]
    pub container_port: u16,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Probe {
    /// grpc, httpGet, tcpSocket or exec.
    pub kind: String,
    /// A number or a port name; absent for exec.
    #[serde(default)]
    pub port: Option<serde_json::Value>,
    /// The grpc.health.v1 service a gRPC probe asks for (absent: `""`).
    #[serde(default)]
    pub service: Option<String>,
}

impl Container {
    pub fn describe(&self) -> String {
        format!("{}: {} container {}", self.overlay, self.workload, self.container)
    }
}

use fmboost_core::health::LIVENESS_SERVICE;

/// Env vars named `FMBOOST_ARG_*` exist only for `$(VAR)` expansion in the args; no binary
/// reads them.
const EXPANSION_PREFIX: &str = "FMBOOST_ARG_";

/// Everything in `container` that its binary (described by `help`) would reject or ignore,
/// and every port or probe that does not match the binary's listen flags. Empty when the
/// container is consistent.
pub fn check_container(container: &Container, help: &BinaryHelp) -> Vec<String> {
    let binary = container.binary.as_deref().unwrap_or("<image entrypoint>");
    let mut errors = Vec::new();
    let given = parse_args(&container.args, help, binary, &mut errors);
    check_env(container, help, &given, binary, &mut errors);
    let listens = listen_ports(help, &given, binary, &mut errors);
    check_ports(container, &listens, &mut errors);
    check_probes(container, help, &listens, binary, &mut errors);
    errors
}

/// The args as clap would read them: `--flag=value`, `--flag value` or `--switch`. Returns
/// flag → value (None for a switch).
fn parse_args(args: &[String], help: &BinaryHelp, binary: &str, errors: &mut Vec<String>) -> BTreeMap<String, Option<String>> {
    let mut given = BTreeMap::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if !arg.starts_with("--") {
            if arg.starts_with('-') && arg.len() > 1 {
                errors.push(format!("arg {arg:?}: use the long flag (the check reads long flags only)"));
            } else if !help.takes_positionals {
                errors.push(format!("positional arg {arg:?}: {binary} takes none"));
            }
            continue;
        }
        let (name, inline_value) = match arg.split_once('=') {
            Some((name, value)) => (name, Some(value.to_string())),
            None => (arg.as_str(), None),
        };
        let Some(spec) = help.flags.get(name) else {
            errors.push(format!("unknown flag {name}: `{binary} --help` has no such flag"));
            continue;
        };
        let value = if spec.takes_value {
            let value = match inline_value {
                Some(value) => Some(value),
                None if i < args.len() && !args[i].starts_with("--") => {
                    i += 1;
                    Some(args[i - 1].clone())
                }
                None => None,
            };
            match &value {
                None => {
                    errors.push(format!("{name} takes a value and has none"));
                    continue;
                }
                Some(value) if value.is_empty() => errors.push(format!("{name} has an empty value")),
                Some(value) if value.contains("$(") => errors.push(format!("{name}={value}: unexpanded $(VAR) reference")),
                Some(_) => {}
            }
            value
        } else {
            if let Some(value) = inline_value {
                errors.push(format!("{name} is a switch and takes no value (got {value:?})"));
            }
            None
        };
        if given.insert(name.to_string(), value).is_some() {
            errors.push(format!("{name} given more than once"));
        }
    }
    given
}

/// Env vars: `FMBOOST_ARG_*` must feed an arg; any other `FMBOOST_*` must be one the binary
/// reads, and not for a flag the args also set (the arg would silently win). Other names
/// (a library's, e.g. `RUST_LOG`) are not ours to check.
fn check_env(container: &Container, help: &BinaryHelp, given: &BTreeMap<String, Option<String>>, binary: &str, errors: &mut Vec<String>) {
    for name in &container.env {
        if name.starts_with(EXPANSION_PREFIX) {
            let reference = format!("$({name})");
            if !container.args_raw.iter().any(|a| a.contains(&reference)) {
                errors.push(format!("env {name} is for $(VAR) expansion but no arg uses it"));
            }
        } else if let Some(flag) = help.flag_reading_env(name) {
            if given.contains_key(flag) {
                errors.push(format!("env {name} is ignored: {binary} reads it for {flag}, which the args also set"));
            }
        } else if name.starts_with("FMBOOST_") {
            errors.push(format!("env {name}: {binary} does not read it (its env vars: {})", binary_envs(help)));
        }
    }
}

fn binary_envs(help: &BinaryHelp) -> String {
    let names: BTreeSet<_> = help.flags.values().filter_map(|spec| spec.env.as_deref()).collect();
    names.into_iter().collect::<Vec<_>>().join(", ")
}

/// Port of every listen flag of the binary (`--listen`, `--*-listen`) that is in effect: set
/// in the args, or by its default. Keyed by flag.
fn listen_ports(help: &BinaryHelp, given: &BTreeMap<String, Option<String>>, binary: &str, errors: &mut Vec<String>) -> BTreeMap<String, u16> {
    let mut ports = BTreeMap::new();
    for (flag, spec) in &help.flags {
        if flag != "--listen" && !flag.ends_with("-listen") {
            continue;
        }
        let value = match given.get(flag) {
            Some(Some(value)) => value.clone(),
            Some(None) => continue, // reported by parse_args
            None => match &spec.default {
                Some(default) => default.clone(),
                None => continue, // off
            },
        };
        // The binaries' listen flags are `SocketAddr`s: parse them the same way.
        match value.parse::<SocketAddr>() {
            Ok(addr) => {
                ports.insert(flag.clone(), addr.port());
            }
            Err(e) => errors.push(format!("{flag}={value}: {binary} would reject it ({e})")),
        }
    }
    ports
}

/// The container port a listen flag's port is published as: `--listen` as `grpc`,
/// `--<name>-listen` as `<name>`.
fn port_name(flag: &str) -> &str {
    match flag.strip_prefix("--").and_then(|f| f.strip_suffix("-listen")) {
        Some(name) => name,
        None => "grpc",
    }
}

/// Every containerPort is a listen flag's port, under that flag's port name, and back.
fn check_ports(container: &Container, listens: &BTreeMap<String, u16>, errors: &mut Vec<String>) {
    for port in &container.ports {
        let owner = listens.iter().find(|(_, &p)| p == port.container_port).map(|(flag, _)| flag);
        match (owner, port.name.as_deref()) {
            (None, _) => errors.push(format!("containerPort {} is not the port of any listen flag {listens:?}", port.container_port)),
            (Some(flag), Some(name)) if name != port_name(flag) => {
                errors.push(format!("containerPort {} is {flag}'s port, named {name:?} rather than {:?}", port.container_port, port_name(flag)))
            }
            _ => {}
        }
    }
    for (flag, port) in listens {
        if !container.ports.iter().any(|p| p.container_port == *port) {
            errors.push(format!("{flag} port {port} has no containerPort"));
        }
    }
}

/// Every probe is a native gRPC probe on the port where the binary serves grpc.health.v1:
/// `--health-listen` for binaries that have it (the workers), else `--listen` (the
/// coordinator serves health beside its API). Startup and liveness probes ask for the
/// `liveness` service, which never depends on Redis (a Redis outage must not restart healthy
/// processes); readiness asks for the default service, which follows Redis.
fn check_probes(container: &Container, help: &BinaryHelp, listens: &BTreeMap<String, u16>, binary: &str, errors: &mut Vec<String>) {
    if container.probes.is_empty() {
        return;
    }
    let health_flag = if help.flags.contains_key("--health-listen") { "--health-listen" } else { "--listen" };
    let Some(&health_port) = listens.get(health_flag) else {
        errors.push(format!("probes need the gRPC health server, but {binary} gets no {health_flag}"));
        return;
    };
    for (kind, probe) in &container.probes {
        if probe.kind != "grpc" {
            errors.push(format!("{kind} is {}, not a gRPC health probe", probe.kind));
            continue;
        }
        let port = match &probe.port {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::String(name)) => {
                container.ports.iter().find(|p| p.name.as_deref() == Some(name.as_str())).map(|p| u64::from(p.container_port))
            }
            _ => None,
        };
        match port {
            Some(port) if port == u64::from(health_port) => {}
            Some(port) => errors.push(format!("{kind} targets port {port}, not the gRPC health port {health_port} ({health_flag})")),
            None => errors.push(format!("{kind} port {:?} resolves to no containerPort", probe.port)),
        }
        let service = probe.service.as_deref().unwrap_or("");
        let wanted = if kind == "readinessProbe" { "" } else { LIVENESS_SERVICE };
        if service != wanted {
            let why = if wanted.is_empty() { "readiness follows Redis" } else { "a Redis outage must not restart the process" };
            errors.push(format!("{kind} asks for health service {service:?}, not {wanted:?} ({why})"));
        }
    }
}
