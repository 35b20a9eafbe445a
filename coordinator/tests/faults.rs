//! Fault handling end to end: a worker SIGKILLed mid-task, a coordinator restarted mid-job,
//! cancellation, graceful drain, dead-lettering, and corrupt or missing input blobs.

mod cluster;

use std::time::{Duration, Instant};

use cluster::{result, submit, terminal, text_spec, watch_to_end, Cluster, Options};
use fmboost_proto::v1 as pb;
use pb::job_event::Event;
use prost::Message;

/// Waits (watching) until the job starts `stage`; returns the StageStarted event.
async fn wait_started(cluster: &Cluster, job_id: &str, stage: pb::Stage) -> pb::StageStarted {
    let mut client = cluster.client().await;
    let mut stream = client.watch(pb::WatchRequest { job_id: job_id.into() }).await.unwrap().into_inner();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), stream.message()).await.expect("stalled").unwrap().expect("ended");
        match event.event {
            Some(Event::StageStarted(s)) if s.at.unwrap().stage == stage as i32 => return s,
            Some(Event::Step(s)) if s.at.unwrap().stage == stage as i32 => {
                return pb::StageStarted { at: s.at, worker: String::new(), attempt: 0 };
            }
            Some(Event::Completed(_) | Event::Failed(_) | Event::Cancelled(_)) => panic!("job ended before {stage:?}: {event:?}"),
            _ => {}
        }
    }
}

async fn run_to_png(cluster: &Cluster, spec: pb::JobSpec) -> Vec<u8> {
    let mut client = cluster.client().await;
    let job = submit(cluster, &mut client, spec).await;
    let events = watch_to_end(cluster, &mut client, &job).await;
    assert!(matches!(terminal(&events), Event::Completed(_)), "{events:?}");
    result(cluster, &mut client, &job, false).await.0
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_killed_mid_task_is_reclaimed_with_identical_output() {
    let mut cluster = Cluster::start(Options { step_ms: 40, ..Options::default() });
    cluster.wait_for_workers([1, 1, 1]).await;
    let spec = text_spec(11, 2, 2, 25);
    let undisturbed = run_to_png(&cluster, spec.clone()).await;

    let mut client = cluster.client().await;
    let job = submit(&cluster, &mut client, spec).await;
    wait_started(&cluster, &job, pb::Stage::Cfm).await;
    let cfm = cluster.workers.iter().position(|(s, _)| s == "cfm").unwrap();
    cluster.workers[cfm].1.signal(libc::SIGKILL);
    cluster.workers[cfm].1.wait_exit(Duration::from_secs(5));
    cluster.start_worker("cfm");
    let events = watch_to_end(&cluster, &mut client, &job).await;
    assert!(matches!(terminal(&events), Event::Completed(_)), "{events:?}");
    let retried = events.iter().any(|e| matches!(&e.event, Some(Event::StageStarted(s)) if s.attempt >= 2));
    assert!(retried, "no second delivery seen: {events:?}");
    assert_eq!(result(&cluster, &mut client, &job, false).await.0, undisturbed);
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_restarted_mid_job_completes_it() {
    let mut cluster = Cluster::start(Options { step_ms: 30, ..Options::default() });
    cluster.wait_for_workers([1, 1, 1]).await;
    let spec = text_spec(12, 20, 2, 10);
    let undisturbed = run_to_png(&cluster, spec.clone()).await;

    let mut client = cluster.client().await;
    let job = submit(&cluster, &mut client, spec).await;
    wait_started(&cluster, &job, pb::Stage::Diffusion).await;
    let coordinator = cluster.coordinator.as_mut().unwrap();
    coordinator.signal(libc::SIGKILL);
    coordinator.wait_exit(Duration::from_secs(5));
    // The diffusion stage finishes while no coordinator runs; its event waits in Redis.
    tokio::time::sleep(Duration::from_millis(800)).await;
    cluster.start_coordinator();
    let mut client = cluster.client().await;
    let events = watch_to_end(&cluster, &mut client, &job).await;
    assert!(matches!(terminal(&events), Event::Completed(_)), "{events:?}");
    assert_eq!(result(&cluster, &mut client, &job, false).await.0, undisturbed);
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_a_running_job_and_removes_queued_work() {
    let cluster = Cluster::start(Options { step_ms: 50, workers: [1, 0, 0], ..Options::default() });
    cluster.wait_for_workers([1, 0, 0]).await;
    let mut client = cluster.client().await;
    // 400 steps of 50 ms: 20 s of work if it were not stopped.
    let running = submit(&cluster, &mut client, text_spec(1, 400, 1, 2)).await;
    wait_started(&cluster, &running, pb::Stage::Diffusion).await;
    let queued = submit(&cluster, &mut client, text_spec(2, 400, 1, 2)).await;
    let status = client.cluster_status(pb::ClusterStatusRequest {}).await.unwrap().into_inner();
    assert_eq!((status.stages[0].queued, status.stages[0].in_flight), (1, 1), "{status:?}");

    let cancelled = client.cancel(pb::CancelRequest { job_id: queued.clone() }).await.unwrap().into_inner();
    assert_eq!(cancelled.state, pb::JobState::Cancelled as i32);
    let status = client.cluster_status(pb::ClusterStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.stages[0].queued, 0, "the cancelled job's task left the queue: {status:?}");

    let cancel_at = Instant::now();
    client.cancel(pb::CancelRequest { job_id: running.clone() }).await.unwrap();
    // The worker stops at the next step: its in-flight count drops long before 20 s.
    loop {
        let status = client.cluster_status(pb::ClusterStatusRequest {}).await.unwrap().into_inner();
        if status.stages[0].in_flight == 0 {
            break;
        }
        assert!(cancel_at.elapsed() < Duration::from_secs(5), "the running task was not stopped: {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for job in [&running, &queued] {
        let info = client.get_job(pb::GetJobRequest { job_id: job.to_string() }).await.unwrap().into_inner();
        assert_eq!(info.state, pb::JobState::Cancelled as i32);
        assert!(matches!(terminal(&watch_to_end(&cluster, &mut client, job).await), Event::Cancelled(_)));
    }
    // Cancelling a finished job changes nothing.
    let again = client.cancel(pb::CancelRequest { job_id: running }).await.unwrap().into_inner();
    assert_eq!(again.state, pb::JobState::Cancelled as i32);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_work_and_exits_zero() {
    let mut cluster = Cluster::start(Options { step_ms: 40, ..Options::default() });
    cluster.wait_for_workers([1, 1, 1]).await;
    let mut client = cluster.client().await;
    let job = submit(&cluster, &mut client, text_spec(5, 2, 1, 20)).await;
    wait_started(&cluster, &job, pb::Stage::Cfm).await;
    let cfm = cluster.workers.iter().position(|(s, _)| s == "cfm").unwrap();
    cluster.workers[cfm].1.signal(libc::SIGTERM);
    let status = cluster.workers[cfm].1.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "drained worker exited with {status}");
    // The hop finished before the exit: the job moved on without a reclaim.
    let events = watch_to_end(&cluster, &mut client, &job).await;
    assert!(matches!(terminal(&events), Event::Completed(_)), "{events:?}");
    assert!(!events.iter().any(|e| matches!(&e.event, Some(Event::StageStarted(s)) if s.attempt >= 2)));
}

#[tokio::test(flavor = "multi_thread")]
async fn repeated_worker_deaths_dead_letter_the_task_and_fail_the_job() {
    let mut cluster = Cluster::start(Options { step_ms: 40, max_deliveries: 1, ..Options::default() });
    cluster.wait_for_workers([1, 1, 1]).await;
    let mut client = cluster.client().await;
    let job = submit(&cluster, &mut client, text_spec(6, 2, 1, 50)).await;
    wait_started(&cluster, &job, pb::Stage::Cfm).await;
    let cfm = cluster.workers.iter().position(|(s, _)| s == "cfm").unwrap();
    cluster.workers[cfm].1.signal(libc::SIGKILL);
    cluster.workers[cfm].1.wait_exit(Duration::from_secs(5));
    cluster.start_worker("cfm");
    let events = watch_to_end(&cluster, &mut client, &job).await;
    match terminal(&events) {
        Event::Failed(f) => assert!(f.reason.contains("dead-lettered after 1 deliveries"), "{}", f.reason),
        other => panic!("expected a failure, got {other:?}"),
    }
    let status = client.cluster_status(pb::ClusterStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.stages[1].dead_letters, 1, "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_or_corrupt_input_blob_fails_the_job_with_the_reason() {
    let mut cluster = Cluster::start(Options { workers: [0, 0, 0], ..Options::default() });
    let mut client = cluster.client().await;
    let latent = fmboost_core::tensor::WireTensor::from_f32(vec![1, 4, 8, 8], &[0.25; 256]).to_proto();
    let spec = |seed| pb::JobSpec {
        source: Some(pb::job_spec::Source::Latent(latent.clone())),
        base: None,
        ..text_spec(seed, 1, 1, 2)
    };
    let missing = submit(&cluster, &mut client, spec(1)).await;
    let corrupt = submit(&cluster, &mut client, spec(2)).await;
    let mut redis = cluster.redis().await;
    let _: () = redis::cmd("DEL").arg(format!("e2e:blob:{{{missing}}}:upload")).query_async(&mut redis).await.unwrap();
    let key = format!("e2e:blob:{{{corrupt}}}:upload");
    let bytes: Vec<u8> = redis::cmd("GET").arg(&key).query_async(&mut redis).await.unwrap();
    let mut payload = fmboost_proto::internal::BlobPayload::decode(bytes.as_slice()).unwrap();
    if let Some(fmboost_proto::internal::blob_payload::Payload::Latent(t)) = &mut payload.payload {
        t.data[0] ^= 0x40;
    }
    let _: () = redis::cmd("SET").arg(&key).arg(payload.encode_to_vec()).query_async(&mut redis).await.unwrap();

    cluster.start_worker("cfm");
    for (job, want) in [(&missing, "is missing"), (&corrupt, "checksum mismatch")] {
        match terminal(&watch_to_end(&cluster, &mut client, job).await) {
            Event::Failed(f) => assert!(f.reason.contains(want), "{job}: {}", f.reason),
            other => panic!("expected a failure, got {other:?}"),
        }
        let info = client.get_job(pb::GetJobRequest { job_id: job.to_string() }).await.unwrap().into_inner();
        assert!(info.error.contains(want), "{}", info.error);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_serve_one_cluster() {
    let mut cluster = Cluster::start(Options::default());
    let (_replica, replica_addr) = cluster.start_replica();
    cluster.wait_for_workers([1, 1, 1]).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{replica_addr}")).unwrap().connect().await.unwrap();
    let mut replica = pb::pipeline_client::PipelineClient::new(channel);
    let mut client = cluster.client().await;
    let mut jobs = Vec::new();
    for seed in 0..6 {
        // Submitted alternately to each replica, watched on the other.
        let target = if seed % 2 == 0 { &mut client } else { &mut replica };
        jobs.push(submit(&cluster, target, text_spec(seed, 2, 1, 2)).await);
    }
    for (i, job) in jobs.iter().enumerate() {
        let watcher = if i % 2 == 0 { &mut replica } else { &mut client };
        let events = watch_to_end(&cluster, watcher, job).await;
        assert!(matches!(terminal(&events), Event::Completed(_)), "{events:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_sigterm_ends_watches_and_the_cli_follows_the_new_one() {
    let mut cluster = Cluster::start(Options { step_ms: 30, ..Options::default() });
    cluster.wait_for_workers([1, 1, 1]).await;
    let out = cluster.dir.path().join("rolled.png");
    let cli = std::process::Command::new(cluster::binary("fmboost"))
        .args(["submit", "--profile", "sleep", "--width", "64", "--height", "64", "--steps", "40", "--hops", "1", "--cfm-steps", "5"])
        .args(["--wait", "--out", out.to_str().unwrap(), "--addr", &format!("http://{}", cluster.addr)])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut client = cluster.client().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.cluster_status(pb::ClusterStatusRequest {}).await.unwrap().into_inner().stages[0].in_flight == 0 {
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let coordinator = cluster.coordinator.as_mut().unwrap();
    coordinator.signal(libc::SIGTERM);
    // An open Watch must not hold up the graceful stop.
    assert!(coordinator.wait_exit(Duration::from_secs(5)).success());
    cluster.start_coordinator();
    let output = tokio::task::spawn_blocking(move || cli.wait_with_output()).await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("reconnecting"), "{stderr}");
    let png = std::fs::read(&out).unwrap();
    assert_eq!(image::load_from_memory(&png).unwrap().width(), 128);
}
