//! Whole SD profiles through the real cluster (redis-server, coordinator, one worker per stage,
//! the `fmboost` client) on the fixture directories of ../shared/fixtures, unchanged: a text
//! prompt (with a negative prompt and guidance) → base latent → one CFM hop → PNG gives the
//! very bytes `fmboost generate` makes in process. The profiles are engine/tests/support's.

mod cluster;

#[path = "../../engine/tests/support/sd_profile.rs"]
mod sd_profile;

use cluster::{Cluster, Options};
use sd_profile::Fixture;

async fn cluster_equals_in_process(fixture: Fixture) {
    let profile_dir = tempfile::tempdir().expect("temp dir");
    let profile = sd_profile::write_profile(profile_dir.path(), fixture);
    let cluster = Cluster::start(Options { profile: Some(profile.clone()), workers: [1, 1, 1], idle_timeout_ms: 5000, ..Options::default() });
    cluster.wait_for_workers([1, 1, 1]).await;
    let job = ["--prompt", "a photo of a cat", "--negative-prompt", "blurry", "--guidance", "5", "--seed", "9"];

    let a = cluster.dir.path().join("cluster.png");
    let mut args = vec!["submit", "--wait", "--profile", fixture.profile_name(), "--out", a.to_str().unwrap()];
    args.extend(job);
    let output = cluster.cli(&args);
    assert!(output.status.success(), "{fixture:?}: submit failed: {}", String::from_utf8_lossy(&output.stderr));

    // Admission reads the profile's [capabilities]: a flow scheduler and a second hop are
    // refused before anything is queued, naming the field.
    for (extra, field) in [(["--scheduler", "euler"], "base.scheduler"), (["--hops", "2"], "cfm.hops")] {
        let mut args = vec!["submit", "--profile", fixture.profile_name(), "--prompt", "a cat"];
        args.extend(extra);
        let output = cluster.cli(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && stderr.contains(field), "{fixture:?} {extra:?}: {stderr}");
    }

    let b = cluster.dir.path().join("local.png");
    let output = std::process::Command::new(cluster::binary("fmboost"))
        .args(["generate", "--profile", profile.to_str().unwrap(), "--out", b.to_str().unwrap()])
        .args(job)
        .output()
        .expect("running fmboost generate");
    assert!(output.status.success(), "{fixture:?}: generate failed: {}", String::from_utf8_lossy(&output.stderr));

    let (a, b) = (std::fs::read(&a).expect("submit wrote the PNG"), std::fs::read(&b).expect("generate wrote the PNG"));
    assert_eq!(a, b, "{fixture:?}: the cluster's PNG must equal the in-process one");
    let image = image::load_from_memory(&a).expect("a PNG");
    assert_eq!((image.width(), image.height()), (128, 128), "{fixture:?}: 64 px base, one CFM hop");
}

#[tokio::test(flavor = "multi_thread")]
async fn f32_directory_with_vocab_and_merges() {
    cluster_equals_in_process(Fixture::F32).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fp16_variant_directory_with_tokenizer_json() {
    cluster_equals_in_process(Fixture::Fp16).await;
}
