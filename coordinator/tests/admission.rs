//! Admission that knows each profile's capabilities, through the real binaries and a real
//! redis-server: what the `tiny` workers would fail is INVALID_ARGUMENT naming the field,
//! with nothing queued; a profile without live workers shows in ClusterStatus; a worker whose
//! models disagree with its profile's `[capabilities]` refuses to start; an idempotency key
//! reused with another spec is ALREADY_EXISTS.

mod cluster;

use std::path::{Path, PathBuf};
use std::time::Duration;

use cluster::{submit, text_spec, Cluster, Options};
use fmboost_core::tensor::WireTensor;
use fmboost_proto::v1 as pb;
use fmboost_proto::v1::pipeline_client::PipelineClient;
use tonic::transport::Channel;
use tonic::Code;

/// A tiny job with every setting left to the profile.
fn tiny_spec() -> pb::JobSpec {
    pb::JobSpec {
        source: Some(pb::job_spec::Source::Text(pb::TextSource::default())),
        seed: 1,
        profile: "tiny".into(),
        ..Default::default()
    }
}

fn png(width: u32, height: u32) -> Vec<u8> {
    let mut png = Vec::new();
    image::RgbImage::new(width, height).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    png
}

fn latent(shape: [usize; 4]) -> Option<pb::job_spec::Source> {
    let values = vec![0.25; shape.iter().product()];
    Some(pb::job_spec::Source::Latent(WireTensor::from_f32(shape.to_vec(), &values).to_proto()))
}

fn text(prompt: &str, negative_prompt: &str) -> Option<pb::job_spec::Source> {
    Some(pb::job_spec::Source::Text(pb::TextSource { prompt: prompt.into(), negative_prompt: negative_prompt.into() }))
}

fn base(mutate: impl Fn(&mut pb::BaseSettings)) -> Option<pb::BaseSettings> {
    let mut settings = pb::BaseSettings::default();
    mutate(&mut settings);
    Some(settings)
}

fn hops(n: u32) -> Option<pb::CfmSettings> {
    Some(pb::CfmSettings { hops: Some(n), ..Default::default() })
}

async fn status(client: &mut PipelineClient<Channel>) -> pb::ClusterStatusResponse {
    client.cluster_status(pb::ClusterStatusRequest {}).await.expect("cluster status").into_inner()
}

/// Live workers per stage of `profile` in ClusterStatus.
fn profile_workers(status: &pb::ClusterStatusResponse, profile: &str) -> Vec<u32> {
    let entry = status.profiles.iter().find(|p| p.profile == profile).unwrap_or_else(|| panic!("{profile} not in {status:?}"));
    let stages: Vec<i32> = entry.stages.iter().map(|s| s.stage).collect();
    assert_eq!(stages, [pb::Stage::Diffusion as i32, pb::Stage::Cfm as i32, pb::Stage::Decoder as i32]);
    entry.stages.iter().map(|s| s.live_workers).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn tiny_jobs_its_workers_would_fail_are_refused_before_queueing() {
    let cluster = Cluster::start(Options { workers: [0, 0, 0], ..Options::default() });
    let mut client = cluster.client().await;
    type Case = (&'static str, pb::JobSpec, &'static str);
    let with = |mutate: &dyn Fn(&mut pb::JobSpec)| {
        let mut spec = tiny_spec();
        mutate(&mut spec);
        spec
    };
    let cases: Vec<Case> = vec![
        ("a prompt", with(&|s| s.source = text("a lighthouse", "")), "source.text.prompt"),
        ("a negative prompt", with(&|s| s.source = text("", "blurry")), "source.text.negative_prompt"),
        ("guidance 7.5", with(&|s| s.base = base(|b| b.guidance = Some(7.5))), "base.guidance"),
        ("ddim", with(&|s| s.base = base(|b| b.scheduler = Some("ddim".into()))), "base.scheduler"),
        ("a 128 px base", with(&|s| s.base = base(|b| b.width = Some(128))), "base.width"),
        ("a 64x128 px base", with(&|s| s.base = base(|b| b.height = Some(128))), "base.height"),
        ("a 3-channel latent", with(&|s| s.source = latent([1, 3, 8, 8])), "source.latent"),
        ("a latent side of 5", with(&|s| s.source = latent([1, 4, 5, 8])), "source.latent"),
        ("an 8x8 image", with(&|s| s.source = Some(pb::job_spec::Source::Image(pb::ImageSource { data: png(8, 8) }))), "source.image.width"),
        ("three hops", with(&|s| s.cfm = hops(3)), "cfm.hops"),
    ];
    for (name, spec, field) in cases {
        let status = client.submit(pb::SubmitRequest { spec: Some(spec) }).await.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(status.message().starts_with(&format!("{field}: ")), "{name}: {:?} should name {field}", status.message());
        assert!(status.message().contains("profile `tiny`"), "{name}: {:?} should name the profile", status.message());
    }
    let after = status(&mut client).await;
    assert_eq!(after.active_jobs, 0, "nothing was admitted: {after:?}");
    assert!(after.stages.iter().all(|s| s.queued == 0), "nothing was queued: {after:?}");

    // What the tiny models do run is admitted, also with no tiny worker alive (a pool may be
    // scaled from zero): ClusterStatus shows it waits.
    let edge_cases = [
        tiny_spec(),
        with(&|s| s.source = latent([1, 4, 6, 10])),
        with(&|s| s.source = Some(pb::job_spec::Source::Image(pb::ImageSource { data: png(16, 32) }))),
        with(&|s| {
            s.source = Some(pb::job_spec::Source::Image(pb::ImageSource { data: png(8, 8) }));
            s.cfm = hops(0);
        }),
    ];
    for spec in edge_cases {
        submit(&cluster, &mut client, spec).await;
    }
    let after = status(&mut client).await;
    assert_eq!(after.active_jobs, 4, "{after:?}");
    assert_eq!(profile_workers(&after, "tiny"), [0, 0, 0]);
    let output = cluster.cli(&["status"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("profile tiny: workers diffusion none, cfm none, decoder none"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_status_shows_each_profile_and_stage_without_live_workers() {
    let mut cluster = Cluster::start(Options::default());
    cluster.wait_for_workers([1, 1, 1]).await;
    let mut client = cluster.client().await;
    let now = status(&mut client).await;
    assert_eq!(profile_workers(&now, "sleep"), [1, 1, 1], "{now:?}");
    assert_eq!(profile_workers(&now, "tiny"), [0, 0, 0], "the sleep workers serve no tiny job: {now:?}");
    // A drained worker leaves the sets at once.
    let cfm = cluster.workers.iter_mut().find(|(stage, _)| stage == "cfm").map(|(_, p)| p).unwrap();
    cfm.signal(libc::SIGTERM);
    assert!(cfm.wait_exit(Duration::from_secs(20)).success());
    let now = status(&mut client).await;
    assert_eq!(profile_workers(&now, "sleep"), [1, 0, 1], "{now:?}");
    let stdout = String::from_utf8_lossy(&cluster.cli(&["status"]).stdout).into_owned();
    assert!(stdout.contains("profile sleep: workers diffusion 1, cfm none, decoder 1  (its jobs wait"), "{stdout}");
}

/// A copy of the tiny profile with its weights named by absolute path and `[capabilities]`
/// edited by `edit`.
fn edited_tiny_profile(dir: &Path, edit: (&str, &str)) -> PathBuf {
    let weights = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/weights/tiny").canonicalize().unwrap();
    let text = fmboost_core::profile::TINY_PROFILE_TOML;
    assert!(text.contains(edit.0), "{:?} not in the tiny profile", edit.0);
    let mut text = text.replace(edit.0, edit.1);
    for file in ["base.safetensors", "base.json", "hop1.safetensors", "hop1.json", "hop2.safetensors", "hop2.json"] {
        text = text.replace(&format!("\"{file}\""), &format!("{:?}", weights.join(file)));
    }
    text = text.replace("path = \"autoencoder\"", &format!("path = {:?}", weights.join("autoencoder")));
    let path = dir.join(format!("edited-{}.toml", edit.1.replace([' ', '='], "")));
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_refuse_a_profile_whose_capabilities_their_models_contradict() {
    let mut cluster = Cluster::start(Options { workers: [0, 0, 0], ..Options::default() });
    let dir = cluster.dir.path().to_path_buf();
    let cases = [
        ("cfm", ("latent_multiple = 2", "latent_multiple = 4"), "[capabilities] latent_multiple = 4, but the hop UNets need latents entering hop 1 to have sides a multiple of 2"),
        ("decoder", ("latent_channels = 4", "latent_channels = 3"), "[capabilities] latent_channels = 3, but the autoencoder's latents have 4"),
        ("diffusion", ("hops = 2", "hops = 3"), "[capabilities] hops = 3, but the profile has 2 [[hops]] entries"),
    ];
    for (stage, edit, needle) in cases {
        let profile = edited_tiny_profile(&dir, edit);
        let index = cluster.start_worker_on(stage, &profile.display().to_string(), &[]);
        let worker = &mut cluster.workers[index].1;
        let exit = worker.wait_exit(Duration::from_secs(60));
        assert!(!exit.success(), "{stage} worker started on a contradicting profile");
        let log = std::fs::read_to_string(&worker.log).unwrap();
        assert!(log.contains(needle), "{needle:?} not in the {stage} worker's log:\n{log}");
    }
    let now = status(&mut cluster.client().await).await;
    assert!(now.stages.iter().all(|s| s.live_workers == 0), "{now:?}");

    // The unedited copy loads: the check passes on the real models.
    let profile = edited_tiny_profile(&dir, ("latent_multiple = 2", "latent_multiple = 2"));
    cluster.start_worker_on("cfm", &profile.display().to_string(), &[]);
    cluster.wait_for_workers([0, 1, 0]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotency_key_reused_with_another_spec_is_already_exists() {
    let cluster = Cluster::start(Options { workers: [0, 0, 0], ..Options::default() });
    let mut client = cluster.client().await;
    let keyed = |spec: pb::JobSpec| pb::SubmitRequest { spec: Some(pb::JobSpec { idempotency_key: "order-7".into(), ..spec }) };
    let first = client.submit(keyed(text_spec(1, 2, 1, 2))).await.unwrap().into_inner();
    assert!(first.created);

    // Seed 2 at 128 px under the key of the seed-1 64 px job.
    let mut other = text_spec(2, 2, 1, 2);
    other.base.as_mut().unwrap().width = Some(128);
    let status = client.submit(keyed(other)).await.expect_err("another spec under the same key");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    let message = status.message();
    assert!(message.starts_with("idempotency_key \"order-7\""), "{message}");
    assert!(message.contains(&first.job_id) && message.contains("differs: seed, base"), "{message}");

    // The same spec is the same job, also with the sleep profile's default spelled out.
    let again = client.submit(keyed(text_spec(1, 2, 1, 2))).await.unwrap().into_inner();
    assert_eq!((again.job_id.as_str(), again.created), (first.job_id.as_str(), false));
    let mut explicit = text_spec(1, 2, 1, 2);
    explicit.priority = pb::Priority::Unspecified as i32; // treated as normal, as sent first
    let again = client.submit(keyed(explicit)).await.unwrap().into_inner();
    assert_eq!((again.job_id.as_str(), again.created), (first.job_id.as_str(), false));

    // Uploads: same shape, other bytes, is another spec.
    let upload = |value: f32| {
        let mut spec = text_spec(1, 2, 1, 2);
        spec.source = Some(pb::job_spec::Source::Latent(WireTensor::from_f32(vec![1, 4, 8, 8], &[value; 256]).to_proto()));
        spec.base = None;
        pb::SubmitRequest { spec: Some(pb::JobSpec { idempotency_key: "upload-1".into(), ..spec }) }
    };
    let first_upload = client.submit(upload(0.5)).await.unwrap().into_inner();
    assert_eq!(client.submit(upload(0.5)).await.unwrap().into_inner().job_id, first_upload.job_id);
    let status = client.submit(upload(0.25)).await.expect_err("other bytes under the same key");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert!(status.message().contains("differs: the uploaded payload"), "{}", status.message());

    let now = client.cluster_status(pb::ClusterStatusRequest {}).await.unwrap().into_inner();
    assert_eq!((now.active_jobs, now.stages[0].queued, now.stages[1].queued), (2, 1, 1), "only the two first jobs: {now:?}");
}
