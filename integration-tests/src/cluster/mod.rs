//! A cluster on loopback for `--local`: redis-server, the coordinator and worker pools as real
//! processes, restartable one by one for fault injection, all gone when this is dropped.

mod process;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fmboost_core::stage::StageKind;
use fmboost_proto::v1 as pb;

use crate::args::WorkerCounts;
use crate::client::Clients;
pub use process::{Managed, Spawner};

pub struct ClusterConfig {
    pub bin_dir: PathBuf,
    pub redis_server: PathBuf,
    /// Where logs (and Redis' AOF) go.
    pub dir: PathBuf,
    pub namespace: String,
    pub workers: WorkerCounts,
    /// The profile jobs name (the coordinator's `--profiles`).
    pub job_profile: String,
    /// The workers' `--profile`.
    pub worker_profile: String,
    pub max_batch: u32,
    pub batch_wait_ms: u64,
    pub worker_idle_timeout_ms: u64,
    pub max_queued: u64,
    pub append_only: bool,
    pub auth_token_file: Option<PathBuf>,
    pub startup_timeout: Duration,
}

pub struct LocalCluster {
    config: ClusterConfig,
    // Fields drop in order: processes first, the spawner (whose end would SIGKILL them) last.
    coordinator: Option<Managed>,
    workers: BTreeMap<StageKind, Vec<Managed>>,
    redis: Option<Managed>,
    /// Processes replaced after faults, kept to check they were not dead before.
    retired: Vec<Managed>,
    spawner: Spawner,
    redis_port: u16,
    pub coordinator_addr: SocketAddr,
    started: u64,
}

/// Tries at a first start whose port turned out taken (a new port each time).
const PORT_ATTEMPTS: usize = 4;

/// A server found its port taken at startup (see [`fmboost_core::net::free_loopback_port`]).
#[derive(Debug)]
struct PortTaken {
    server: &'static str,
    port: u16,
    detail: String,
}

impl std::fmt::Display for PortTaken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} could not have port {}: {}", self.server, self.port, self.detail)
    }
}

impl std::error::Error for PortTaken {}

#[derive(Clone, Copy)]
enum Server {
    Redis,
    Coordinator,
}

fn free_port() -> anyhow::Result<u16> {
    fmboost_core::net::free_loopback_port().context("finding a free loopback port")
}

/// `bin_dir/name`, which must exist.
pub fn binary(bin_dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir.join(name);
    if !path.is_file() {
        bail!("{name} not found in {} (build it: cargo build -p {name}; or pass --bin-dir)", bin_dir.display());
    }
    Ok(path)
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

impl LocalCluster {
    /// Starts everything and waits until the coordinator answers and every pool's workers are live.
    pub async fn start(config: ClusterConfig) -> anyhow::Result<Self> {
        for kind in StageKind::ALL {
            if config.workers.get(kind) > 0 {
                binary(&config.bin_dir, &worker_binary(kind))?;
            }
        }
        binary(&config.bin_dir, "fmboost-coordinator")?;
        let spawner = Spawner::start()?;
        let redis_port = free_port()?;
        let coordinator_addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let mut cluster = LocalCluster {
            config,
            coordinator: None,
            workers: BTreeMap::new(),
            redis: None,
            retired: Vec::new(),
            spawner,
            redis_port,
            coordinator_addr,
            started: 0,
        };
        cluster.first_start(Server::Redis).await?;
        cluster.first_start(Server::Coordinator).await?;
        for kind in StageKind::ALL {
            for _ in 0..cluster.config.workers.get(kind) {
                cluster.start_worker(kind)?;
            }
        }
        cluster.wait_for_workers().await?;
        Ok(cluster)
    }

    /// Starts `server` for the first time, on another port while the chosen one turns out
    /// taken. Restarts never move: workers and clients already use the address.
    async fn first_start(&mut self, server: Server) -> anyhow::Result<()> {
        let mut attempt = 1;
        loop {
            let result = match server {
                Server::Redis => self.start_redis().await,
                Server::Coordinator => self.start_coordinator().await,
            };
            match result {
                Err(err) if attempt < PORT_ATTEMPTS && err.is::<PortTaken>() => {
                    tracing::warn!("{err}; trying another port");
                    let port = free_port()?;
                    match server {
                        Server::Redis => self.redis_port = port,
                        Server::Coordinator => self.coordinator_addr.set_port(port),
                    }
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.redis_port)
    }

    fn log_path(&mut self, name: &str) -> PathBuf {
        self.started += 1;
        self.config.dir.join(format!("{:03}-{name}.log", self.started))
    }

    pub async fn start_redis(&mut self) -> anyhow::Result<()> {
        let port = self.redis_port.to_string();
        let dir = self.config.dir.display().to_string();
        let mut list = args(&["--port", &port, "--bind", "127.0.0.1", "--dir", &dir, "--save", "", "--protected-mode", "no"]);
        // With AOF every write is on disk before Redis answers, so a SIGKILL loses nothing.
        list.extend(args(if self.config.append_only { &["--appendonly", "yes", "--appendfsync", "always"] } else { &["--appendonly", "no"] }));
        let log = self.log_path("redis");
        let mut redis = self.spawner.spawn("redis-server", &self.config.redis_server, &list, &log)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = redis.exited()? {
                let log = redis.log_excerpt();
                if fmboost_core::net::says_address_in_use(&log) {
                    bail!(PortTaken { server: "redis-server", port: self.redis_port, detail: log });
                }
                bail!("redis-server exited ({status}) at startup; its log:\n{log}");
            }
            // The pid tells our server from another one that holds the port; PING answers
            // only once an AOF is loaded (INFO answers while loading).
            if let Ok(pid) = redis_pid(self.redis_port) {
                if Some(pid) != redis.pid() {
                    redis.kill()?;
                    bail!(PortTaken { server: "redis-server", port: self.redis_port, detail: format!("redis-server pid {pid} (not ours) answers there") });
                }
                if redis_ping(self.redis_port).is_ok() {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("redis-server did not answer PING within 10 s; its log:\n{}", redis.log_excerpt());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(old) = self.redis.replace(redis) {
            self.retired.push(old);
        }
        Ok(())
    }

    pub async fn start_coordinator(&mut self) -> anyhow::Result<()> {
        let mut list = args(&[
            "--listen",
            &self.coordinator_addr.to_string(),
            "--redis",
            &self.redis_url(),
            "--namespace",
            &self.config.namespace,
            "--max-queued",
            &self.config.max_queued.to_string(),
            "--profiles",
            &self.config.job_profile,
        ]);
        if let Some(token) = &self.config.auth_token_file {
            list.extend(args(&["--auth-token-file", &token.display().to_string()]));
        }
        let program = binary(&self.config.bin_dir, "fmboost-coordinator")?;
        let log = self.log_path("coordinator");
        let mut coordinator = self.spawner.spawn("coordinator", &program, &list, &log)?;
        let status = StatusProbe::new(self.coordinator_addr, self.config.auth_token_file.as_deref())?;
        let deadline = Instant::now() + self.config.startup_timeout;
        loop {
            if let Some(exit) = coordinator.exited()? {
                let log = coordinator.log_excerpt();
                if fmboost_core::net::says_address_in_use(&log) {
                    bail!(PortTaken { server: "the coordinator", port: self.coordinator_addr.port(), detail: log });
                }
                bail!("the coordinator exited ({exit}) at startup; its log:\n{log}");
            }
            if status.get().await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("the coordinator did not answer ClusterStatus in {:?}; its log:\n{}", self.config.startup_timeout, coordinator.log_excerpt());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(old) = self.coordinator.replace(coordinator) {
            self.retired.push(old);
        }
        Ok(())
    }

    /// Starts one more worker of `kind` (not waiting for it to be ready).
    pub fn start_worker(&mut self, kind: StageKind) -> anyhow::Result<String> {
        let id = format!("{}-{}-{}", self.config.namespace, kind.name(), self.started + 1);
        let heartbeat_ms = (self.config.worker_idle_timeout_ms / 4).max(10);
        let list = args(&[
            "--redis",
            &self.redis_url(),
            "--namespace",
            &self.config.namespace,
            "--profile",
            &self.config.worker_profile,
            "--device",
            "cpu",
            "--max-batch",
            &self.config.max_batch.to_string(),
            "--batch-wait-ms",
            &self.config.batch_wait_ms.to_string(),
            "--idle-timeout-ms",
            &self.config.worker_idle_timeout_ms.to_string(),
            "--heartbeat-ms",
            &heartbeat_ms.to_string(),
            "--worker-id",
            &id,
        ]);
        let program = binary(&self.config.bin_dir, &worker_binary(kind))?;
        let log = self.log_path(&format!("worker-{}", kind.name()));
        let worker = self.spawner.spawn(&id, &program, &list, &log)?;
        self.workers.entry(kind).or_default().push(worker);
        Ok(id)
    }

    async fn wait_for_workers(&mut self) -> anyhow::Result<()> {
        let status = StatusProbe::new(self.coordinator_addr, self.config.auth_token_file.as_deref())?;
        let deadline = Instant::now() + self.config.startup_timeout;
        loop {
            self.check_alive()?;
            let live = status.get().await.map(|s| {
                s.stages.iter().filter_map(|st| Some((StageKind::from_proto(st.stage)?, st.live_workers))).collect::<BTreeMap<_, _>>()
            });
            if let Ok(live) = &live {
                if StageKind::ALL.iter().all(|k| live.get(k).copied().unwrap_or(0) >= self.config.workers.get(*k)) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("workers not all live after {:?} (ClusterStatus: {live:?}); logs in {}", self.config.startup_timeout, self.config.dir.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Errors naming any process that exited although the harness never stopped it.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.unexpected_exits()?.first() {
            Some(exit) => bail!("{exit}"),
            None => Ok(()),
        }
    }

    /// Processes (current or replaced) that exited although the harness never stopped them,
    /// with their exit status and log (head and tail).
    pub fn unexpected_exits(&mut self) -> anyhow::Result<Vec<String>> {
        let all = self.coordinator.iter_mut().chain(self.redis.iter_mut()).chain(self.workers.values_mut().flatten()).chain(self.retired.iter_mut());
        let mut exits = Vec::new();
        for process in all {
            if let Some(status) = process.died_unexpectedly()? {
                exits.push(format!("{} exited by itself ({status}); its log:\n{}", process.name, process.log_excerpt()));
            }
        }
        Ok(exits)
    }

    /// SIGKILLs the `choice`-th (modulo the pool size) worker of `kind` and starts a new one.
    /// Returns (killed id, new id).
    pub fn kill_worker(&mut self, kind: StageKind, choice: usize) -> anyhow::Result<(String, String)> {
        let pool = self.workers.get_mut(&kind).filter(|p| !p.is_empty()).with_context(|| format!("no {kind} worker to kill"))?;
        let mut victim = pool.remove(choice % pool.len());
        victim.kill()?;
        let killed = victim.name.clone();
        self.retired.push(victim);
        let started = self.start_worker(kind)?;
        Ok((killed, started))
    }

    /// SIGKILLs the coordinator, waits `down`, starts it again on the same address.
    pub async fn restart_coordinator(&mut self, down: Duration) -> anyhow::Result<()> {
        if let Some(coordinator) = self.coordinator.as_mut() {
            coordinator.kill()?;
        }
        tokio::time::sleep(down).await;
        self.start_coordinator().await
    }

    /// SIGKILLs redis-server, waits `down`, starts it again on the same port from its AOF.
    pub async fn restart_redis(&mut self, down: Duration) -> anyhow::Result<()> {
        if !self.config.append_only {
            bail!("restarting Redis without AOF would lose every job; the cluster was started without it");
        }
        if let Some(redis) = self.redis.as_mut() {
            redis.kill()?;
        }
        tokio::time::sleep(down).await;
        self.start_redis().await
    }

    /// Stops everything gracefully (workers and coordinator drain on SIGTERM).
    pub async fn shutdown(&mut self) -> anyhow::Result<()> {
        for worker in self.workers.values_mut().flatten() {
            worker.stop(Duration::from_secs(5)).await?;
        }
        if let Some(coordinator) = self.coordinator.as_mut() {
            coordinator.stop(Duration::from_secs(5)).await?;
        }
        if let Some(redis) = self.redis.as_mut() {
            redis.stop(Duration::from_secs(5)).await?;
        }
        Ok(())
    }

    pub fn log_dir(&self) -> &Path {
        &self.config.dir
    }
}

pub fn worker_binary(kind: StageKind) -> String {
    format!("fmboost-worker-{}", kind.name())
}

/// PING over a raw socket: `+PONG` once Redis serves (it answers `-LOADING` while reading its AOF).
fn redis_ping(port: u16) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.write_all(b"PING\r\n")?;
    let mut reply = [0u8; 64];
    let n = stream.read(&mut reply)?;
    if reply[..n].starts_with(b"+PONG") {
        Ok(())
    } else {
        bail!("redis answered {:?}", String::from_utf8_lossy(&reply[..n]))
    }
}

/// The process id of the redis-server answering on `port` (`INFO server`), once it serves.
fn redis_pid(port: u16) -> anyhow::Result<u32> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.write_all(b"INFO server\r\n")?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("redis closed the connection: {:?}", String::from_utf8_lossy(&reply));
        }
        reply.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&reply);
        if text.starts_with('-') {
            bail!("redis answered {text:?}");
        }
        if let Some(line) = text.split("\r\n").skip(1).find_map(|l| l.strip_prefix("process_id:")) {
            if text.contains(&format!("process_id:{line}\r\n")) {
                return line.parse().with_context(|| format!("redis INFO process_id {line:?}"));
            }
        }
    }
}

/// ClusterStatus calls for readiness checks.
struct StatusProbe(Clients);

impl StatusProbe {
    fn new(addr: SocketAddr, token_file: Option<&Path>) -> anyhow::Result<Self> {
        let token = match token_file {
            Some(path) => Some(std::fs::read_to_string(path).with_context(|| format!("--auth-token-file {}", path.display()))?.trim().to_string()),
            None => None,
        };
        Ok(StatusProbe(Clients::new(&format!("http://{addr}"), 1, token)?))
    }

    async fn get(&self) -> Result<pb::ClusterStatusResponse, tonic::Status> {
        let mut request = tonic::Request::new(pb::ClusterStatusRequest {});
        request.set_timeout(Duration::from_secs(2));
        Ok(self.0.get().cluster_status(request).await?.into_inner())
    }
}

#[cfg(test)]
mod tests;
