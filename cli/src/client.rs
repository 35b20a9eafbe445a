//! The cluster client: `fmboost submit | watch | result | cancel | status`, over the
//! coordinator's `Pipeline` gRPC API.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::job_args::JobSpecArgs;
use fmboost_core::tensor::WireTensor;
use fmboost_proto::v1 as pb;
use fmboost_proto::v1::pipeline_client::PipelineClient;
use indicatif::{ProgressBar, ProgressStyle};
use prost::Message;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Largest message accepted from the coordinator (result chunks are at most 4 MiB).
const MAX_RESPONSE_BYTES: usize = 8 << 20;

#[derive(clap::Args, Debug)]
pub struct Connection {
    /// Coordinator address.
    #[arg(long, env = "FMBOOST_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// File holding the bearer token, when the coordinator requires one.
    #[arg(long, env = "FMBOOST_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(flatten)]
    job: JobSpecArgs,
    #[arg(long, value_enum, default_value_t = PriorityArg::Normal)]
    priority: PriorityArg,
    /// Fail the job if it has not finished starting its stages within this many seconds.
    #[arg(long)]
    deadline_secs: Option<u64>,
    /// Submitting again with the same key returns the first job.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Follow the job to the end with a progress bar (and write --out).
    #[arg(long)]
    wait: bool,
    /// Where to write the PNG (needs --wait).
    #[arg(long, requires = "wait")]
    out: Option<PathBuf>,
    /// Where to write the final latent as a protobuf Tensor (needs --wait).
    #[arg(long, requires = "wait")]
    latent_out: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum PriorityArg {
    Low,
    Normal,
    High,
}

#[derive(clap::Args, Debug)]
pub struct JobArgs {
    #[command(flatten)]
    connection: Connection,
    job_id: String,
}

#[derive(clap::Args, Debug)]
pub struct ResultArgs {
    #[command(flatten)]
    connection: Connection,
    job_id: String,
    /// Where to write the PNG.
    #[arg(long)]
    out: PathBuf,
    /// Where to write the final latent as a protobuf Tensor.
    #[arg(long)]
    latent_out: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    connection: Connection,
    /// A job to describe; without it, the cluster's status.
    job_id: Option<String>,
}

#[derive(Clone)]
struct BearerToken(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request.metadata_mut().insert("authorization", token.clone());
        }
        Ok(request)
    }
}

type Client = PipelineClient<InterceptedService<Channel, BearerToken>>;

async fn connect(connection: &Connection) -> anyhow::Result<Client> {
    let token = match &connection.token_file {
        Some(path) => {
            let token = std::fs::read_to_string(path).with_context(|| format!("--token-file {}", path.display()))?;
            let header = format!("Bearer {}", token.trim());
            Some(header.parse().with_context(|| format!("--token-file {}: not a valid header value", path.display()))?)
        }
        None => None,
    };
    let channel = Channel::from_shared(connection.addr.clone())
        .with_context(|| format!("--addr {}: not a valid URI", connection.addr))?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("cannot connect to the coordinator at {}", connection.addr))?;
    Ok(PipelineClient::with_interceptor(channel, BearerToken(token)).max_decoding_message_size(MAX_RESPONSE_BYTES))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

fn status_error(what: &str, status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{what}: {:?}: {}", status.code(), status.message())
}

/// A failed Submit, saying what the code means for the job (see the proto's retry contract).
fn submit_error(status: tonic::Status) -> anyhow::Error {
    let advice = match status.code() {
        tonic::Code::Unavailable => " (no job was created: run the command again)".to_string(),
        tonic::Code::DeadlineExceeded => match status.metadata().get("fmboost-job-id").and_then(|v| v.to_str().ok()) {
            Some(job_id) => format!(
                " (the job may exist as {job_id}: `fmboost status {job_id}` once the cluster answers; \
                 resubmitting is safe only with the same --idempotency-key)"
            ),
            None => " (the job may or may not exist: resubmitting is safe only with the same --idempotency-key)".to_string(),
        },
        _ => String::new(),
    };
    anyhow::anyhow!("submit: {:?}: {}{advice}", status.code(), status.message())
}

impl SubmitArgs {
    fn spec(&self) -> anyhow::Result<pb::JobSpec> {
        let priority = match self.priority {
            PriorityArg::Low => pb::Priority::Low,
            PriorityArg::Normal => pb::Priority::Normal,
            PriorityArg::High => pb::Priority::High,
        };
        Ok(pb::JobSpec {
            priority: priority as i32,
            deadline_unix_ms: self.deadline_secs.map_or(0, |secs| fmboost_core::now_unix_ms() + secs * 1000),
            idempotency_key: self.idempotency_key.clone().unwrap_or_default(),
            ..self.job.to_proto()?
        })
    }
}

pub fn submit(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let spec = args.spec()?;
    runtime()?.block_on(async {
        let mut client = connect(&args.connection).await?;
        let response = client.submit(pb::SubmitRequest { spec: Some(spec) }).await.map_err(submit_error)?.into_inner();
        if !args.wait {
            println!("{}", response.job_id);
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!("job {}{}", response.job_id, if response.created { "" } else { " (existing, same idempotency key)" });
        let outcome = follow(&mut client, &response.job_id).await?;
        if let Some(code) = outcome {
            return Ok(code);
        }
        if let Some(out) = &args.out {
            download(&mut client, &response.job_id, out, args.latent_out.as_deref()).await?;
        }
        println!("{}", response.job_id);
        Ok(ExitCode::SUCCESS)
    })
}

pub fn watch(args: JobArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let mut client = connect(&args.connection).await?;
        Ok(follow(&mut client, &args.job_id).await?.unwrap_or(ExitCode::SUCCESS))
    })
}

pub fn result(args: ResultArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let mut client = connect(&args.connection).await?;
        download(&mut client, &args.job_id, &args.out, args.latent_out.as_deref()).await?;
        Ok(ExitCode::SUCCESS)
    })
}

pub fn cancel(args: JobArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let mut client = connect(&args.connection).await?;
        let request = pb::CancelRequest { job_id: args.job_id.clone() };
        let response = client.cancel(request).await.map_err(|s| status_error("cancel", s))?.into_inner();
        println!("{} {}", args.job_id, state_name(response.state));
        Ok(ExitCode::SUCCESS)
    })
}

pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let mut client = connect(&args.connection).await?;
        if let Some(job_id) = args.job_id {
            let job = client.get_job(pb::GetJobRequest { job_id }).await.map_err(|s| status_error("get job", s))?.into_inner();
            let at = job.at.map(|at| format!(" at {}", stage_label(&at))).unwrap_or_default();
            println!("{} {}{at}", job.job_id, state_name(job.state));
            if !job.error.is_empty() {
                println!("error: {}", job.error);
            }
            return Ok(ExitCode::SUCCESS);
        }
        let status = client.cluster_status(pb::ClusterStatusRequest {}).await.map_err(|s| status_error("cluster status", s))?.into_inner();
        println!("active jobs: {} (max {})", status.active_jobs, status.max_queued);
        println!("{:<10} {:>8} {:>10} {:>8} {:>12}", "stage", "queued", "in-flight", "workers", "dead-letters");
        for stage in status.stages {
            let name = stage_name(stage.stage);
            println!("{name:<10} {:>8} {:>10} {:>8} {:>12}", stage.queued, stage.in_flight, stage.live_workers, stage.dead_letters);
        }
        for profile in status.profiles {
            let stages: Vec<String> = profile
                .stages
                .iter()
                .map(|s| {
                    let name = stage_name(s.stage);
                    if s.live_workers == 0 { format!("{name} none") } else { format!("{name} {}", s.live_workers) }
                })
                .collect();
            let waiting = profile.stages.iter().any(|s| s.live_workers == 0);
            let note = if waiting { "  (its jobs wait where no live worker serves it)" } else { "" };
            println!("profile {}: workers {}{note}", profile.profile, stages.join(", "));
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn state_name(state: i32) -> String {
    pb::JobState::try_from(state).map(|s| s.as_str_name().trim_start_matches("JOB_STATE_").to_lowercase()).unwrap_or_else(|_| state.to_string())
}

fn stage_name(stage: i32) -> String {
    pb::Stage::try_from(stage).map(|s| s.as_str_name().trim_start_matches("STAGE_").to_lowercase()).unwrap_or_default()
}

fn stage_label(at: &pb::StageRef) -> String {
    match pb::Stage::try_from(at.stage) {
        Ok(pb::Stage::Cfm) => format!("cfm hop {}", at.hop),
        Ok(stage) => stage.as_str_name().trim_start_matches("STAGE_").to_lowercase(),
        Err(_) => format!("stage {}", at.stage),
    }
}

/// Seconds to keep trying to re-open Watch after the coordinator went away or Redis stalled.
const WATCH_RECONNECTS: u32 = 120;

/// A Watch that ends so leaves the job as it was: watch again (the proto's Watch contract).
fn is_transient(status: &tonic::Status) -> bool {
    matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled)
}

/// Opens Watch, retrying once a second while the answer is transient; `first` skips the
/// wait before the first try.
async fn open_watch(client: &mut Client, job_id: &str, first: bool) -> anyhow::Result<tonic::Streaming<pb::JobEvent>> {
    for attempt in 0..WATCH_RECONNECTS {
        if attempt > 0 || !first {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        match client.watch(pb::WatchRequest { job_id: job_id.to_string() }).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) if is_transient(&status) => {
                if attempt == 0 {
                    eprintln!("watch: {:?}: {}; retrying", status.code(), status.message());
                }
            }
            Err(status) => return Err(status_error("watch", status)),
        }
    }
    bail!("no coordinator could watch job {job_id} for {WATCH_RECONNECTS} s")
}

/// Follows Watch to the terminal event with a progress bar. None when completed, else the
/// exit code for failed/cancelled.
async fn follow(client: &mut Client, job_id: &str) -> anyhow::Result<Option<ExitCode>> {
    use pb::job_event::Event;
    let bar = ProgressBar::new(1);
    bar.set_style(ProgressStyle::with_template("{spinner} {msg:<28} [{bar:30}] {pos}/{len} {elapsed}").expect("valid template"));
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut events = open_watch(client, job_id, true).await?;
    loop {
        let event = match events.message().await {
            Ok(Some(event)) => event,
            // The coordinator went away (restart, rolling update) before the job ended: the
            // job lives in Redis, so watch it again through whichever replica answers.
            Ok(None) => {
                bar.suspend(|| eprintln!("watch ended by the coordinator; reconnecting"));
                events = open_watch(client, job_id, false).await?;
                continue;
            }
            Err(status) if is_transient(&status) => {
                bar.suspend(|| eprintln!("watch interrupted ({}); reconnecting", status.message()));
                events = open_watch(client, job_id, false).await?;
                continue;
            }
            Err(status) => return Err(status_error("watch", status)),
        };
        match event.event {
            Some(Event::Queued(q)) => bar.set_message(format!("queued for {} (#{})", q.at.as_ref().map(stage_label).unwrap_or_default(), q.position)),
            Some(Event::StageStarted(s)) => {
                bar.set_message(s.at.as_ref().map(stage_label).unwrap_or_default());
                bar.set_position(0);
            }
            Some(Event::Step(step)) => {
                bar.set_message(step.at.as_ref().map(stage_label).unwrap_or_default());
                bar.set_length(step.total as u64);
                bar.set_position(step.step as u64);
            }
            Some(Event::StageFinished(f)) => {
                let at = f.at.as_ref().map(stage_label).unwrap_or_default();
                bar.println(format!("{at}: done in {} ms (queued {} ms, batch of {})", f.service_ms, f.queue_wait_ms, f.batch_size));
            }
            Some(Event::Completed(c)) => {
                bar.finish_and_clear();
                eprintln!("completed: {} bytes of PNG", c.png_bytes);
                return Ok(None);
            }
            Some(Event::Failed(f)) => {
                bar.finish_and_clear();
                eprintln!("job {job_id} failed: {}", f.reason);
                return Ok(Some(ExitCode::FAILURE));
            }
            Some(Event::Cancelled(_)) => {
                bar.finish_and_clear();
                eprintln!("job {job_id} was cancelled");
                return Ok(Some(ExitCode::FAILURE));
            }
            None => {}
        }
    }
}

/// Streams the result and writes the PNG (and the final latent when asked).
async fn download(client: &mut Client, job_id: &str, out: &Path, latent_out: Option<&Path>) -> anyhow::Result<()> {
    use pb::result_chunk::Part;
    let request = pb::GetResultRequest { job_id: job_id.to_string(), include_latent: latent_out.is_some(), chunk_bytes: 0 };
    let mut chunks = client.get_result(request).await.map_err(|s| status_error("get result", s))?.into_inner();
    let mut png = Vec::new();
    let mut latent: Option<pb::Tensor> = None;
    while let Some(chunk) = chunks.message().await.map_err(|s| status_error("get result", s))? {
        match chunk.part {
            Some(Part::Png(part)) => {
                if part.offset != png.len() as u64 {
                    bail!("PNG chunk at offset {} after {} bytes", part.offset, png.len());
                }
                png.extend_from_slice(&part.data);
            }
            Some(Part::Latent(part)) => {
                let tensor = latent.get_or_insert_with(|| pb::Tensor { dtype: part.dtype, shape: part.shape.clone(), data: Vec::new(), crc32c: part.crc32c });
                if part.offset != tensor.data.len() as u64 {
                    bail!("latent chunk at offset {} after {} bytes", part.offset, tensor.data.len());
                }
                tensor.data.extend_from_slice(&part.data);
            }
            None => {}
        }
    }
    if png.is_empty() {
        bail!("the result of job {job_id} had no PNG");
    }
    std::fs::write(out, &png).with_context(|| format!("--out {}", out.display()))?;
    eprintln!("wrote {} ({} bytes)", out.display(), png.len());
    if let Some(path) = latent_out {
        let tensor = latent.with_context(|| format!("the result of job {job_id} had no latent"))?;
        let checked = WireTensor::from_proto(tensor).context("downloaded latent")?;
        std::fs::write(path, checked.to_proto().encode_to_vec()).with_context(|| format!("--latent-out {}", path.display()))?;
        eprintln!("wrote {} (latent {:?})", path.display(), checked.shape);
    }
    Ok(())
}
