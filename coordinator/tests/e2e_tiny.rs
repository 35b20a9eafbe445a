//! The embedded `tiny` models through the real cluster: `fmboost submit` gives the very bytes
//! `fmboost generate` makes in process, also when a CFM worker is SIGKILLed mid-hop and another
//! one reclaims the task.

mod cluster;

use std::time::Duration;

use cluster::{Cluster, Options};
use fmboost_proto::v1 as pb;

fn tiny_cluster(workers: [usize; 3]) -> Cluster {
    Cluster::start(Options { tiny: true, workers, idle_timeout_ms: 2000, ..Options::default() })
}

/// `fmboost generate` with `args`, in process.
fn generate(cluster: &Cluster, out: &str, args: &[&str]) -> Vec<u8> {
    let path = cluster.dir.path().join(out);
    let output = std::process::Command::new(cluster::binary("fmboost"))
        .args(["generate", "--out", path.to_str().unwrap()])
        .args(args)
        .output()
        .expect("running fmboost generate");
    assert!(output.status.success(), "generate failed: {}", String::from_utf8_lossy(&output.stderr));
    std::fs::read(path).expect("generate wrote the PNG")
}

/// `fmboost submit --wait` with `args`, through the cluster.
fn submit(cluster: &Cluster, out: &str, args: &[&str]) -> Vec<u8> {
    let path = cluster.dir.path().join(out);
    let mut all = vec!["submit", "--wait", "--out", path.to_str().unwrap()];
    all.extend_from_slice(args);
    let output = cluster.cli(&all);
    assert!(output.status.success(), "submit failed: {}", String::from_utf8_lossy(&output.stderr));
    std::fs::read(path).expect("submit wrote the PNG")
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_png_equals_the_in_process_png() {
    let cluster = tiny_cluster([1, 1, 1]);
    cluster.wait_for_workers([1, 1, 1]).await;
    let a = submit(&cluster, "a.png", &["--seed", "7"]);
    let b = generate(&cluster, "b.png", &["--seed", "7"]);
    assert_eq!(a, b, "fmboost submit --seed 7 and fmboost generate --seed 7 must give the same bytes");
    let image = image::load_from_memory(&a).expect("a PNG");
    assert_eq!((image.width(), image.height()), (256, 256));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cfm_worker_killed_mid_hop_changes_nothing() {
    let mut cluster = tiny_cluster([1, 1, 1]);
    cluster.wait_for_workers([1, 1, 1]).await;
    // Enough CFM steps that the hop is still running when the worker dies.
    let args = ["--seed", "11", "--cfm-steps", "60"];
    let expected = generate(&cluster, "expected.png", &args);

    let mut client = cluster.client().await;
    let spec = pb::JobSpec {
        source: Some(pb::job_spec::Source::Text(pb::TextSource::default())),
        seed: 11,
        cfm: Some(pb::CfmSettings { steps: Some(60), ..Default::default() }),
        profile: "tiny".into(),
        ..Default::default()
    };
    let job_id = cluster::submit(&cluster, &mut client, spec).await;
    let mut events = client.watch(cluster.req(pb::WatchRequest { job_id: job_id.clone() })).await.expect("watch").into_inner();
    // Wait until hop 1 has made some progress, then SIGKILL the only CFM worker.
    loop {
        let event = tokio::time::timeout(Duration::from_secs(60), events.message()).await.expect("progress in time").expect("stream").expect("event");
        if let Some(pb::job_event::Event::Step(step)) = &event.event {
            let at = step.at.as_ref().expect("stage");
            if at.stage == pb::Stage::Cfm as i32 && step.step >= 3 {
                break;
            }
        }
    }
    let cfm = cluster.workers.iter().position(|(stage, _)| stage == "cfm").expect("a cfm worker");
    cluster.workers[cfm].1.signal(libc::SIGKILL);
    cluster.start_worker("cfm");
    let events = cluster::watch_to_end(&cluster, &mut client, &job_id).await;
    assert!(matches!(cluster::terminal(&events), pb::job_event::Event::Completed(_)), "{events:?}");
    let (png, _) = cluster::result(&cluster, &mut client, &job_id, false).await;
    assert_eq!(png, expected, "the reclaimed job must give the undisturbed bytes");
}
