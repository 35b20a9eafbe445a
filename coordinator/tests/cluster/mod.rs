//! A local cluster of real processes for end-to-end tests: its own redis-server on a free
//! loopback port (`--save "" --appendonly no`), the coordinator, workers on the `sleep`
//! profile, and the `fmboost` client. Processes are killed when the cluster is dropped; on a
//! failing test their logs are printed.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use fmboost_proto::v1 as pb;
use fmboost_proto::v1::pipeline_client::PipelineClient;
use tonic::transport::Channel;

pub const STAGES: [&str; 3] = ["diffusion", "cfm", "decoder"];

/// Where cargo put the binaries (`target/debug`, next to this test's `deps/`), unless
/// `FMBOOST_BIN_DIR` names another directory.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FMBOOST_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

/// A binary of the workspace; panics (never skips) when it was not built.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build -p fmboost-coordinator -p fmboost-worker-diffusion \
         -p fmboost-worker-cfm -p fmboost-worker-decoder -p fmboost-cli), or run ./scripts/test.sh",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    fmboost_core::net::free_loopback_port().expect("finding a free loopback port")
}

fn wait_for_port(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start listening on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed (SIGKILL) on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, program: &Path, args: &[String], dir: &Path, env: &[(String, String)]) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        Proc { name: name.to_string(), child, log }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed", self.name);
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not exit within {timeout:?}", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[derive(Clone)]
pub struct Options {
    /// Sleep time per step of every worker (`--profile sleep:STEP_MS`).
    pub step_ms: u64,
    /// Serve the embedded `tiny` models instead of the `sleep` stand-in.
    pub tiny: bool,
    /// Serve this profile file instead (workers `--profile FILE`; the coordinator admits it
    /// beside `sleep` and `tiny`).
    pub profile: Option<PathBuf>,
    pub max_queued: u64,
    pub token: Option<String>,
    pub max_upload_bytes: usize,
    /// Workers per stage (diffusion, cfm, decoder) started with the cluster.
    pub workers: [usize; 3],
    pub idle_timeout_ms: u64,
    pub max_deliveries: u32,
    pub max_batch: u32,
    pub batch_wait_ms: u64,
    /// More coordinator flags.
    pub coordinator_args: Vec<String>,
    /// Environment of the coordinator and worker processes (besides RUST_LOG=info).
    pub env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            step_ms: 5,
            tiny: false,
            profile: None,
            max_queued: 100,
            token: None,
            max_upload_bytes: 1 << 20,
            workers: [1, 1, 1],
            idle_timeout_ms: 1500,
            max_deliveries: 3,
            max_batch: 1,
            batch_wait_ms: 0,
            coordinator_args: Vec::new(),
            env: Vec::new(),
        }
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub options: Options,
    pub redis_url: String,
    pub namespace: String,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub redis: Proc,
    pub coordinator: Option<Proc>,
    pub workers: Vec<(String, Proc)>,
    spawned: usize,
}

impl Cluster {
    pub fn start(options: Options) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let redis_bin = which_redis();
        let port = free_port();
        let args: Vec<String> = ["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let redis = Proc::spawn("redis", &redis_bin, &args, dir.path(), &[]);
        wait_for_port(SocketAddr::from(([127, 0, 0, 1], port)), "redis-server");
        let mut cluster = Cluster {
            redis_url: format!("redis://127.0.0.1:{port}"),
            namespace: "e2e".into(),
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            redis,
            coordinator: None,
            workers: Vec::new(),
            spawned: 0,
            options,
            dir,
        };
        cluster.start_coordinator();
        for (stage, &count) in STAGES.iter().zip(&cluster.options.workers.clone()) {
            for _ in 0..count {
                cluster.start_worker(stage);
            }
        }
        cluster
    }

    pub fn start_coordinator(&mut self) {
        let (proc, _) = self.spawn_coordinator(self.addr);
        self.coordinator = Some(proc);
    }

    /// Starts another coordinator replica on a new port; returns it and its address.
    pub fn start_replica(&mut self) -> (Proc, SocketAddr) {
        self.spawn_coordinator(SocketAddr::from(([127, 0, 0, 1], free_port())))
    }

    fn spawn_coordinator(&mut self, addr: SocketAddr) -> (Proc, SocketAddr) {
        let metrics_addr = if addr == self.addr { self.metrics_addr } else { SocketAddr::from(([127, 0, 0, 1], free_port())) };
        let mut args = vec![
            "--listen".into(),
            addr.to_string(),
            "--redis".into(),
            self.redis_url.clone(),
            "--namespace".into(),
            self.namespace.clone(),
            "--profiles".into(),
            match &self.options.profile {
                Some(file) => format!("sleep,tiny,{}", file.display()),
                None => "sleep,tiny".into(),
            },
            "--max-queued".into(),
            self.options.max_queued.to_string(),
            "--max-upload-bytes".into(),
            self.options.max_upload_bytes.to_string(),
            "--metrics-listen".into(),
            metrics_addr.to_string(),
            "--event-claim-idle-ms".into(),
            "1000".into(),
        ];
        if let Some(token) = &self.options.token {
            let path = self.dir.path().join("token");
            std::fs::write(&path, format!("{token}\n")).expect("token file");
            args.extend(["--auth-token-file".into(), path.display().to_string()]);
        }
        args.extend(self.options.coordinator_args.iter().cloned());
        self.spawned += 1;
        let name = format!("coordinator-{}", self.spawned);
        let proc = Proc::spawn(&name, &binary("fmboost-coordinator"), &args, self.dir.path(), &self.options.env);
        wait_for_port(addr, "the coordinator");
        (proc, addr)
    }

    /// Starts a worker of `stage`; returns its index in `workers`.
    pub fn start_worker(&mut self, stage: &str) -> usize {
        self.start_worker_with(stage, &[])
    }

    /// Starts a worker of `stage` with extra flags.
    pub fn start_worker_with(&mut self, stage: &str, extra: &[String]) -> usize {
        let profile = match &self.options.profile {
            Some(file) => file.display().to_string(),
            None if self.options.tiny => "tiny".into(),
            None => format!("sleep:{}", self.options.step_ms),
        };
        self.start_worker_on(stage, &profile, extra)
    }

    /// Starts a worker of `stage` serving `profile` (a name or a profile file), with extra flags.
    pub fn start_worker_on(&mut self, stage: &str, profile: &str, extra: &[String]) -> usize {
        let o = &self.options;
        let mut args: Vec<String> = vec![
            "--redis".into(),
            self.redis_url.clone(),
            "--namespace".into(),
            self.namespace.clone(),
            "--profile".into(),
            profile.to_string(),
            "--idle-timeout-ms".into(),
            o.idle_timeout_ms.to_string(),
            "--heartbeat-ms".into(),
            (o.idle_timeout_ms / 5).to_string(),
            "--max-deliveries".into(),
            o.max_deliveries.to_string(),
            "--max-batch".into(),
            o.max_batch.to_string(),
            "--batch-wait-ms".into(),
            o.batch_wait_ms.to_string(),
        ];
        args.extend_from_slice(extra);
        self.spawned += 1;
        let name = format!("worker-{stage}-{}", self.spawned);
        let proc = Proc::spawn(&name, &binary(&format!("fmboost-worker-{stage}")), &args, self.dir.path(), &self.options.env);
        self.workers.push((stage.to_string(), proc));
        self.workers.len() - 1
    }

    pub async fn client(&self) -> PipelineClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.addr)).expect("uri").connect().await.expect("connect to the coordinator");
        PipelineClient::new(channel).max_decoding_message_size(8 << 20)
    }

    /// Waits until ClusterStatus reports at least `counts` live workers per stage.
    pub async fn wait_for_workers(&self, counts: [u32; 3]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut client = self.client().await;
        loop {
            let request = tonic::Request::new(pb::ClusterStatusRequest {});
            let status = client.cluster_status(self.authorize(request)).await.expect("cluster status").into_inner();
            let live: Vec<u32> = status.stages.iter().map(|s| s.live_workers).collect();
            if live.iter().zip(counts).all(|(&l, c)| l >= c) {
                return;
            }
            assert!(Instant::now() < deadline, "workers did not come up: live {live:?}, want {counts:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Adds the bearer token when the cluster has one.
    pub fn authorize<T>(&self, mut request: tonic::Request<T>) -> tonic::Request<T> {
        if let Some(token) = &self.options.token {
            request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
        }
        request
    }

    /// A request carrying the token when the cluster has one.
    pub fn req<T>(&self, message: T) -> tonic::Request<T> {
        self.authorize(tonic::Request::new(message))
    }

    /// Runs the `fmboost` client with `--addr` set.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut command = Command::new(binary("fmboost"));
        command.args(args).arg("--addr").arg(format!("http://{}", self.addr)).stdin(Stdio::null());
        command.output().expect("running fmboost")
    }

    pub async fn metrics(&self) -> String {
        http_get_metrics(self.metrics_addr).await
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url.as_str()).expect("url").get_multiplexed_async_connection().await.expect("redis")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut logs: Vec<&Path> = self.workers.iter().map(|(_, p)| p.log.as_path()).collect();
            if let Some(c) = &self.coordinator {
                logs.push(&c.log);
            }
            for path in logs.into_iter().chain(std::iter::once(self.redis.log.as_path())) {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                eprintln!("---- {} (last lines)\n{}", path.display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
        }
    }
}

fn which_redis() -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|p| p.join("redis-server")).collect::<Vec<_>>())
        .unwrap_or_default();
    candidates.into_iter().chain([PathBuf::from("/usr/bin/redis-server")]).find(|p| p.exists()).expect(
        "redis-server not found on PATH: install Debian's redis-server package (./scripts/test.sh does) — these tests never skip",
    )
}

/// GET http://ADDR/metrics.
pub async fn http_get_metrics(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to metrics");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).await.expect("response");
    body
}

/// A free loopback address.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A text-prompt spec on the sleep profile: 64² px base → 8² latent, `hops` CFM hops.
pub fn text_spec(seed: u64, steps: u32, hops: u32, cfm_steps: u32) -> pb::JobSpec {
    pb::JobSpec {
        source: Some(pb::job_spec::Source::Text(pb::TextSource { prompt: "a lighthouse".into(), negative_prompt: String::new() })),
        seed,
        base: Some(pb::BaseSettings { width: Some(64), height: Some(64), steps: Some(steps), scheduler: Some("ddim".into()), guidance: Some(7.5) }),
        cfm: Some(if hops == 0 {
            pb::CfmSettings { hops: Some(0), ..Default::default() }
        } else {
            pb::CfmSettings { hops: Some(hops), solver: Some("euler".into()), steps: Some(cfm_steps) }
        }),
        decode: Some(pb::DecodeSettings::default()),
        profile: "sleep".into(),
        priority: pb::Priority::Normal as i32,
        deadline_unix_ms: 0,
        idempotency_key: String::new(),
    }
}

/// Submits and returns the job id.
pub async fn submit(cluster: &Cluster, client: &mut PipelineClient<Channel>, spec: pb::JobSpec) -> String {
    let request = cluster.authorize(tonic::Request::new(pb::SubmitRequest { spec: Some(spec) }));
    client.submit(request).await.expect("submit").into_inner().job_id
}

/// Follows Watch until the terminal event; returns all events.
pub async fn watch_to_end(cluster: &Cluster, client: &mut PipelineClient<Channel>, job_id: &str) -> Vec<pb::JobEvent> {
    let request = cluster.authorize(tonic::Request::new(pb::WatchRequest { job_id: job_id.into() }));
    let mut stream = client.watch(request).await.expect("watch").into_inner();
    let mut events = Vec::new();
    let deadline = Duration::from_secs(60);
    while let Some(event) = tokio::time::timeout(deadline, stream.message()).await.expect("watch stalled").expect("watch stream") {
        events.push(event);
    }
    events
}

pub fn terminal(events: &[pb::JobEvent]) -> &pb::job_event::Event {
    events.last().and_then(|e| e.event.as_ref()).expect("a terminal event")
}

/// Downloads the PNG (and the final latent when `latent`).
pub async fn result(cluster: &Cluster, client: &mut PipelineClient<Channel>, job_id: &str, latent: bool) -> (Vec<u8>, Option<pb::Tensor>) {
    // The smallest chunk allowed, so that larger results come in several.
    let request = pb::GetResultRequest { job_id: job_id.into(), include_latent: latent, chunk_bytes: 16 << 10 };
    let mut stream = client.get_result(cluster.authorize(tonic::Request::new(request))).await.expect("get result").into_inner();
    let (mut png, mut tensor) = (Vec::new(), None::<pb::Tensor>);
    while let Some(chunk) = stream.message().await.expect("result stream") {
        match chunk.part.expect("chunk part") {
            pb::result_chunk::Part::Png(part) => {
                assert_eq!(part.offset, png.len() as u64);
                png.extend(part.data);
            }
            pb::result_chunk::Part::Latent(part) => {
                let t = tensor.get_or_insert_with(|| pb::Tensor { dtype: part.dtype, shape: part.shape.clone(), data: vec![], crc32c: part.crc32c });
                t.data.extend(part.data);
            }
        }
    }
    (png, tensor)
}
