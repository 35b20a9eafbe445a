//! Issue 12's protocol edges through the real binaries and a real redis-server: a stalled
//! Redis (SIGSTOP) and an unanswered write (CLIENT PAUSE WRITE) during Submit, health that
//! follows Redis, Watch clients that resume, GetResult in ranges with bounded chunks, one
//! status for oversized messages, reflection v1alpha, one-line failure reasons with
//! RUST_BACKTRACE=1, bearer-scheme case and token files, and guidance −0.

mod cluster;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster::{free_addr, submit, terminal, text_spec, watch_to_end, Cluster, Options};
use fmboost_core::tensor::WireTensor;
use fmboost_proto::v1 as pb;
use pb::job_event::Event;
use prost::Message;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const REDIS_TIMEOUT_MS: &str = "500";

fn short_redis_timeout() -> Vec<String> {
    vec!["--redis-timeout-ms".into(), REDIS_TIMEOUT_MS.into()]
}

async fn health(addr: SocketAddr, service: &str) -> ServingStatus {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("health port");
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest { service: service.into() };
    let status = client.check(request).await.unwrap_or_else(|e| panic!("health check {service:?} at {addr}: {e}")).into_inner().status;
    ServingStatus::try_from(status).expect("a known serving status")
}

/// Waits (20 s at most) until `service` at `addr` reports `want`.
async fn wait_health(addr: SocketAddr, service: &str, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = health(addr, service).await;
        if status == want {
            return;
        }
        assert!(Instant::now() < deadline, "{addr} {service:?} stayed {status:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Seed of every job record in Redis, by job id.
async fn job_seeds(cluster: &Cluster) -> BTreeMap<String, u64> {
    let mut redis = cluster.redis().await;
    let prefix = format!("{}:job:", cluster.namespace);
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut redis).await.unwrap();
    let mut seeds = BTreeMap::new();
    for key in keys {
        let spec: Vec<u8> = redis::cmd("HGET").arg(&key).arg("spec").query_async(&mut redis).await.unwrap();
        let id = key.trim_start_matches(&prefix).trim_start_matches('{').trim_end_matches('}');
        seeds.insert(id.to_string(), pb::JobSpec::decode(spec.as_slice()).unwrap().seed);
    }
    seeds
}

/// Runs `fmboost ARGS --addr …` in the background, stderr captured.
fn spawn_cli(cluster: &Cluster, args: &[&str]) -> std::process::Child {
    Command::new(cluster::binary("fmboost"))
        .args(args)
        .args(["--addr", &format!("http://{}", cluster.addr)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running fmboost")
}

fn finish_cli(child: std::process::Child, what: &str) -> String {
    let output = child.wait_with_output().expect("fmboost output");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{what} failed: {stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_redis_fails_fast_turns_readiness_off_and_watchers_resume() {
    let mut cluster = Cluster::start(Options { step_ms: 30, workers: [1, 1, 0], coordinator_args: short_redis_timeout(), ..Options::default() });
    let worker_health = free_addr();
    cluster.start_worker_with("decoder", &["--health-listen".into(), worker_health.to_string()]);
    cluster.wait_for_workers([1, 1, 1]).await;
    let coordinator = cluster.addr;
    for (addr, service) in [(coordinator, ""), (coordinator, "fmboost.v1.Pipeline"), (coordinator, "liveness"), (worker_health, ""), (worker_health, "liveness")] {
        assert_eq!(health(addr, service).await, ServingStatus::Serving, "{addr} {service:?} before the stall");
    }

    // Two jobs in flight, each followed by a CLI: `submit --wait` and `watch`.
    let out = cluster.dir.path().join("stalled.png");
    let job_args = ["--profile", "sleep", "--width", "64", "--height", "64", "--steps", "100", "--hops", "1", "--cfm-steps", "2"];
    let mut submit_args = vec!["submit", "--seed", "1", "--wait", "--out", out.to_str().unwrap()];
    submit_args.extend(job_args);
    let waiting = spawn_cli(&cluster, &submit_args);
    let mut client = cluster.client().await;
    let watched = submit(&cluster, &mut client, text_spec(2, 100, 1, 2)).await;
    let watching = spawn_cli(&cluster, &["watch", &watched]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = client.cluster_status(pb::ClusterStatusRequest {}).await.unwrap().into_inner();
        if status.active_jobs == 2 && status.stages[0].in_flight > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the two jobs did not start: {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A Watch of our own, open before the stall; the CLIs get a moment to open theirs.
    let mut open_watch = client.watch(pb::WatchRequest { job_id: watched.clone() }).await.unwrap().into_inner();
    open_watch.message().await.unwrap().expect("the snapshot event");
    tokio::time::sleep(Duration::from_millis(500)).await;

    cluster.redis.signal(libc::SIGSTOP);
    // Submits while Redis is stalled: each answers within the bound, and never OK.
    let mut answers = Vec::new();
    for seed in 100..105u64 {
        let mut client = client.clone();
        answers.push(tokio::spawn(async move {
            let request = pb::SubmitRequest { spec: Some(text_spec(seed, 2, 1, 2)) };
            (seed, tokio::time::timeout(Duration::from_secs(8), client.submit(request)).await)
        }));
    }
    let mut unknown = BTreeMap::new();
    let mut refused = Vec::new();
    for answer in answers {
        let (seed, answer) = answer.await.unwrap();
        let status = answer.unwrap_or_else(|_| panic!("Submit of seed {seed} hung on a stalled Redis")).expect_err("no Submit can succeed");
        match status.code() {
            Code::Unavailable => refused.push(seed),
            Code::DeadlineExceeded => {
                let id = status.metadata().get("fmboost-job-id").expect("the job id of an unknown outcome");
                unknown.insert(id.to_str().unwrap().to_string(), seed);
            }
            other => panic!("seed {seed}: {other:?} {}", status.message()),
        }
    }
    // Readiness follows Redis; liveness does not.
    wait_health(coordinator, "", ServingStatus::NotServing).await;
    wait_health(worker_health, "", ServingStatus::NotServing).await;
    assert_eq!(health(coordinator, "fmboost.v1.Pipeline").await, ServingStatus::NotServing);
    assert_eq!(health(coordinator, "liveness").await, ServingStatus::Serving);
    assert_eq!(health(worker_health, "liveness").await, ServingStatus::Serving);
    // Once the outage is known, every RPC is refused before it touches Redis (the guard's
    // message, not a timeout's), saying nothing was done.
    let status = client.submit(pb::SubmitRequest { spec: Some(text_spec(105, 2, 1, 2)) }).await.unwrap_err();
    refused.push(105);
    let get_job = client.get_job(pb::GetJobRequest { job_id: watched.clone() }).await.unwrap_err();
    let cluster_status = client.cluster_status(pb::ClusterStatusRequest {}).await.unwrap_err();
    let watch = client.watch(pb::WatchRequest { job_id: watched.clone() }).await.unwrap_err();
    for status in [status, get_job, cluster_status, watch] {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("unreachable") && status.message().contains("nothing was done"), "{status:?}");
    }
    // The open Watch ends with UNAVAILABLE, saying what to do.
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(10), open_watch.message()).await.expect("the open Watch hung") {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the open Watch ended OK without a terminal event"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("Watch again"), "{ended:?}");
    // Long enough for the CLIs' streams to end the same way.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    cluster.redis.signal(libc::SIGCONT);

    wait_health(coordinator, "", ServingStatus::Serving).await;
    wait_health(worker_health, "", ServingStatus::Serving).await;
    // Both CLIs got UNAVAILABLE (their stream ended, or, had they opened it late, the open
    // was refused), watched again, and followed their job to the end.
    let rewatched = |stderr: &str| stderr.contains("reconnecting") || stderr.contains("retrying");
    let stderr = finish_cli(waiting, "submit --wait");
    assert!(rewatched(&stderr), "submit --wait did not re-watch: {stderr}");
    assert_eq!(image::load_from_memory(&std::fs::read(&out).unwrap()).unwrap().width(), 128);
    let stderr = finish_cli(watching, "watch");
    assert!(rewatched(&stderr) && stderr.contains("completed"), "watch did not re-watch: {stderr}");

    // No job exists that its client was told was refused; an unknown outcome may exist.
    let seeds = job_seeds(&cluster).await;
    for seed in &refused {
        assert!(!seeds.values().any(|s| s == seed), "seed {seed} was answered UNAVAILABLE but has a job: {seeds:?}");
    }
    for (job_id, seed) in &unknown {
        if let Some(found) = seeds.get(job_id) {
            assert_eq!(found, seed, "the unknown-outcome id names another job");
        }
    }
    let expected = 2 + unknown.keys().filter(|id| seeds.contains_key(*id)).count();
    assert_eq!(seeds.len(), expected, "records {seeds:?}, unknown outcomes {unknown:?}, refused {refused:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unanswered_submit_write_is_an_unknown_outcome_that_the_key_resolves() {
    let cluster = Cluster::start(Options { workers: [0, 0, 0], coordinator_args: short_redis_timeout(), ..Options::default() });
    let mut client = cluster.client().await;
    let mut redis = cluster.redis().await;
    // Writes (the submit script) wait; reads and PINGs are answered: Redis is up but the
    // write goes unanswered past --redis-timeout-ms.
    let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(3000).arg("WRITE").query_async(&mut redis).await.unwrap();
    let spec = pb::JobSpec { idempotency_key: "paused-1".into(), ..text_spec(21, 2, 1, 2) };
    let status = client.submit(pb::SubmitRequest { spec: Some(spec.clone()) }).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("outcome unknown") && status.message().contains("idempotency_key"), "{status:?}");
    let job_id = status.metadata().get("fmboost-job-id").expect("job id trailer").to_str().unwrap().to_string();
    assert!(status.message().contains(&job_id), "{status:?}");
    assert_eq!(health(cluster.addr, "").await, ServingStatus::Serving, "Redis answers: still ready");
    // Behind the unanswered write, the next Submit's PING goes unanswered too: UNAVAILABLE,
    // and indeed nothing of it is written.
    let status = client.submit(pb::SubmitRequest { spec: Some(text_spec(22, 2, 1, 2)) }).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("nothing was written"), "{status:?}");

    let _: () = redis::cmd("CLIENT").arg("UNPAUSE").query_async(&mut redis).await.unwrap();
    // The write ran once Redis resumed: the job exists under the id given, and resubmitting
    // with the key returns it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let info = loop {
        match client.get_job(pb::GetJobRequest { job_id: job_id.clone() }).await {
            Ok(info) => break info.into_inner(),
            Err(status) if Instant::now() < deadline => {
                assert!(matches!(status.code(), Code::NotFound | Code::Unavailable), "{status:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("the job of the unknown outcome never appeared: {status:?}"),
        }
    };
    assert_eq!(info.spec.unwrap().seed, 21);
    let again = client.submit(pb::SubmitRequest { spec: Some(spec) }).await.unwrap().into_inner();
    assert_eq!((again.job_id.as_str(), again.created), (job_id.as_str(), false));
    assert!(!job_seeds(&cluster).await.values().any(|&seed| seed == 22), "the Submit answered UNAVAILABLE left a job");

    // The CLI says what an unknown outcome means.
    let _: () = redis::cmd("CLIENT").arg("PAUSE").arg(3000).arg("WRITE").query_async(&mut redis).await.unwrap();
    let output = cluster.cli(&["submit", "--profile", "sleep", "--idempotency-key", "paused-2"]);
    let _: () = redis::cmd("CLIENT").arg("UNPAUSE").query_async(&mut redis).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("DeadlineExceeded") && stderr.contains("the job may exist as"), "{stderr}");
    let metrics = cluster.metrics().await;
    assert!(metrics.contains("fmboost_submissions_total{result=\"outcome_unknown\"} 2"), "{metrics}");
}

const TOKEN: &str = "edge-T0ken_/+=";

fn with_auth<T>(message: T, value: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", value.parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread")]
async fn protocol_edges_auth_reflection_oversize_chunks_and_negative_zero() {
    let cluster = Cluster::start(Options { step_ms: 1, token: Some(TOKEN.into()), max_upload_bytes: 64 << 10, ..Options::default() });
    cluster.wait_for_workers([1, 1, 1]).await;
    let mut client = cluster.client().await;

    // Auth: the scheme is case-insensitive; anything but `Bearer <token>` is refused.
    let unknown = "00000000-0000-4000-8000-000000000000".to_string();
    for header in [format!("bearer {TOKEN}"), format!("BEARER   {TOKEN}")] {
        let status = client.get_job(with_auth(pb::GetJobRequest { job_id: unknown.clone() }, &header)).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{header}: {status:?}");
    }
    for header in [format!("Basic {TOKEN}"), format!("Bearer{TOKEN}"), "Bearer wrong".into()] {
        let status = client.get_job(with_auth(pb::GetJobRequest { job_id: unknown.clone() }, &header)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{header}: {status:?}");
    }

    // Reflection: v1alpha as well as v1, each listing both.
    for names in [list_services_v1alpha(cluster.addr).await, list_services_v1(cluster.addr).await] {
        for want in ["fmboost.v1.Pipeline", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
    }

    // Oversized: one code, whether the upload is over --max-upload-bytes or the message over
    // the transport limit, on Pipeline and on health alike.
    let upload = |bytes: usize| {
        let side = ((bytes / 16) as f64).sqrt() as usize;
        let latent = WireTensor::from_f32(vec![1, 4, side, side], &vec![0.5; 4 * side * side]).to_proto();
        let spec = pb::JobSpec { source: Some(pb::job_spec::Source::Latent(latent)), base: None, ..text_spec(3, 2, 1, 2) };
        cluster.req(pb::SubmitRequest { spec: Some(spec) })
    };
    let status = client.submit(upload(80 << 10)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().starts_with("source.latent: ") && status.message().contains("--max-upload-bytes"), "{status:?}");
    let image = pb::JobSpec {
        source: Some(pb::job_spec::Source::Image(pb::ImageSource { data: vec![0x89; 70 << 10] })),
        base: None,
        ..text_spec(3, 2, 1, 2)
    };
    let status = client.submit(cluster.req(pb::SubmitRequest { spec: Some(image) })).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().starts_with("source.image.data: "), "{status:?}");
    let status = client.submit(upload(2 << 20)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().starts_with("request message too large"), "{status:?}");
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", cluster.addr)).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health.check(tonic_health::pb::HealthCheckRequest { service: "x".repeat(5 << 20) }).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "health: {status:?}");

    // Guidance −0 is admitted as +0.
    let mut spec = text_spec(4, 2, 1, 2);
    spec.base.as_mut().unwrap().guidance = Some(-0.0);
    let job = submit(&cluster, &mut client, spec).await;
    let info = client.get_job(cluster.req(pb::GetJobRequest { job_id: job.clone() })).await.unwrap().into_inner();
    let guidance = info.spec.unwrap().base.unwrap().guidance.unwrap();
    assert!(guidance == 0.0 && guidance.is_sign_positive(), "guidance {guidance:?}");
    assert!(matches!(terminal(&watch_to_end(&cluster, &mut client, &job).await), Event::Completed(_)));

    // GetResult: chunk_bytes bounded, results read in ranges. 128 px → 16² latent → two hops →
    // a 64² latent of 64 KiB and a 512² PNG.
    let mut big = text_spec(5, 2, 2, 2);
    big.base.as_mut().unwrap().width = Some(128);
    big.base.as_mut().unwrap().height = Some(128);
    let job = submit(&cluster, &mut client, big).await;
    assert!(matches!(terminal(&watch_to_end(&cluster, &mut client, &job).await), Event::Completed(_)));
    for bad in [1u32, (16 << 10) - 1, (4 << 20) + 1] {
        let request = pb::GetResultRequest { job_id: job.clone(), include_latent: false, chunk_bytes: bad };
        let status = client.get_result(cluster.req(request)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad}: {status:?}");
        assert!(status.message().starts_with("chunk_bytes: ") && status.message().contains("16384..=4194304"), "{status:?}");
    }
    let mut redis = cluster.redis().await;
    let gets_before = command_calls(&mut redis, "get").await;
    let ranges_before = command_calls(&mut redis, "getrange").await;
    let chunk = 16 << 10;
    let request = pb::GetResultRequest { job_id: job.clone(), include_latent: true, chunk_bytes: chunk as u32 };
    let mut stream = client.get_result(cluster.req(request)).await.unwrap().into_inner();
    let (mut png, mut latent, mut messages) = (Vec::new(), None::<pb::Tensor>, 0);
    while let Some(message) = stream.message().await.unwrap() {
        messages += 1;
        match message.part.unwrap() {
            pb::result_chunk::Part::Png(part) => {
                assert!(part.data.len() <= chunk && part.offset == png.len() as u64);
                png.extend(part.data);
                assert!(png.len() as u64 <= part.total_bytes);
            }
            pb::result_chunk::Part::Latent(part) => {
                assert!(part.data.len() <= chunk);
                let tensor = latent.get_or_insert_with(|| pb::Tensor { dtype: part.dtype, shape: part.shape.clone(), data: vec![], crc32c: part.crc32c });
                assert_eq!(part.offset, tensor.data.len() as u64);
                tensor.data.extend(part.data);
            }
        }
    }
    assert_eq!(image::load_from_memory(&png).unwrap().width(), 512);
    let latent = WireTensor::from_proto(latent.expect("the latent")).expect("the latent's CRC32C holds over the chunks");
    assert_eq!(latent.shape, vec![1, 4, 64, 64]);
    assert_eq!(messages, png.len().div_ceil(chunk) + latent.data.len().div_ceil(chunk));
    assert_eq!(command_calls(&mut redis, "get").await, gets_before, "GetResult read a whole blob with GET");
    assert!(command_calls(&mut redis, "getrange").await >= ranges_before + messages as u64);
}

/// Calls of `command` so far, from INFO commandstats.
async fn command_calls(redis: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(redis).await.unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map(|rest| rest.split(',').next().unwrap().parse().unwrap())
        .unwrap_or(0)
}

async fn list_services_v1alpha(addr: SocketAddr) -> Vec<String> {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut responses = reflection.server_reflection_info(futures::stream::iter([request])).await.expect("v1alpha reflection").into_inner();
    let response = responses.message().await.unwrap().expect("a response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else { panic!("unexpected {response:?}") };
    list.service.into_iter().map(|s| s.name).collect()
}

async fn list_services_v1(addr: SocketAddr) -> Vec<String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut responses = reflection.server_reflection_info(futures::stream::iter([request])).await.expect("v1 reflection").into_inner();
    let response = responses.message().await.unwrap().expect("a response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else { panic!("unexpected {response:?}") };
    list.service.into_iter().map(|s| s.name).collect()
}

#[test]
fn token_files_no_client_can_send_are_refused_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    for (name, token, what) in [("newline", &b"abc\ndef\n"[..], "a line break"), ("nul", b"abc\0def", "a control character")] {
        let path = dir.path().join(name);
        std::fs::write(&path, token).unwrap();
        // No Redis needed: the token file is read first.
        let mut child = Command::new(cluster::binary("fmboost-coordinator"))
            .args(["--listen", &free_addr().to_string(), "--redis", "redis://127.0.0.1:1", "--auth-token-file"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the coordinator started with token file {name}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "{name}: {stderr}");
        assert!(stderr.contains(&format!("--auth-token-file {}", path.display())) && stderr.contains(what), "{name}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn failure_reasons_are_one_line_with_backtraces_on() {
    let env = vec![("RUST_BACKTRACE".to_string(), "1".to_string())];
    let mut cluster = Cluster::start(Options { tiny: true, workers: [0, 0, 0], env, ..Options::default() });
    let mut client = cluster.client().await;

    // Worker-made: a 3-channel latent where the tiny CFM takes 4 fails inside candle, whose
    // error carries a backtrace with RUST_BACKTRACE=1. It is written to the job's input blob
    // directly, past admission.
    let good = WireTensor::from_f32(vec![1, 4, 8, 8], &[0.1; 256]).to_proto();
    let spec = pb::JobSpec {
        source: Some(pb::job_spec::Source::Latent(good)),
        base: None,
        cfm: Some(pb::CfmSettings { hops: Some(1), solver: Some("euler".into()), steps: Some(2) }),
        profile: "tiny".into(),
        ..text_spec(8, 1, 1, 2)
    };
    let job = submit(&cluster, &mut client, spec).await;
    let wrong = WireTensor::from_f32(vec![1, 3, 8, 8], &[0.1; 192]).to_proto();
    let blob = fmboost_proto::internal::BlobPayload { payload: Some(fmboost_proto::internal::blob_payload::Payload::Latent(wrong)) };
    let mut redis = cluster.redis().await;
    let key = format!("{}:blob:{{{job}}}:upload", cluster.namespace);
    let _: () = redis::cmd("SET").arg(&key).arg(blob.encode_to_vec()).query_async(&mut redis).await.unwrap();
    let worker = cluster.start_worker("cfm");
    let reason = match terminal(&watch_to_end(&cluster, &mut client, &job).await) {
        Event::Failed(failed) => failed.reason.clone(),
        other => panic!("expected a failure, got {other:?}"),
    };
    assert_one_line(&reason);
    assert!(reason.starts_with("cfm hop 1: "), "{reason}");
    let info = client.get_job(pb::GetJobRequest { job_id: job.clone() }).await.unwrap().into_inner();
    assert_eq!(info.error, reason);
    // The full error, backtrace included, is in the worker's log.
    let log = std::fs::read_to_string(&cluster.workers[worker].1.log).unwrap();
    assert!(log.contains("full error follows"), "the worker logged no full error:\n{log}");

    // Coordinator-made: a multi-line reason from a (say, older) worker is cut to its first
    // line before it is stored or sent.
    let sleeping = submit(&cluster, &mut client, text_spec(9, 2, 1, 2)).await;
    let event = fmboost_proto::internal::StageEvent {
        job_id: sleeping.clone(),
        stage: pb::Stage::Diffusion as i32,
        hop: 0,
        worker: "old-worker".into(),
        attempt: 1,
        kind: Some(fmboost_proto::internal::stage_event::Kind::Failed(fmboost_proto::internal::TaskFailed {
            reason: "diffusion: stage failed: out of memory\nStack backtrace:\n   0: std::backtrace::Backtrace::create\n".into(),
        })),
    };
    let events = format!("{}:events", cluster.namespace);
    let _: String = redis::cmd("XADD").arg(&events).arg("*").arg("event").arg(event.encode_to_vec()).query_async(&mut redis).await.unwrap();
    match terminal(&watch_to_end(&cluster, &mut client, &sleeping).await) {
        Event::Failed(failed) => assert_eq!(failed.reason, "diffusion: stage failed: out of memory"),
        other => panic!("expected a failure, got {other:?}"),
    }
    let info = client.get_job(pb::GetJobRequest { job_id: sleeping }).await.unwrap().into_inner();
    assert_eq!(info.error, "diffusion: stage failed: out of memory");
}

fn assert_one_line(reason: &str) {
    assert!(!reason.is_empty() && !reason.contains('\n') && reason.chars().count() <= 500, "not one line: {reason:?}");
    assert!(!reason.contains("backtrace") && !reason.contains(".rs:"), "a backtrace in {reason:?}");
}
