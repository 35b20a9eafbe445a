//! The API from a second language: `examples/python/run.sh` (Python grpcio, stubs generated
//! from proto/ at run time, reflection through v1alpha) against a local cluster on the
//! `sleep` profile with auth on. run.sh makes its venv on first use (PyPI); scripts/test.sh
//! makes it before the tests.

mod cluster;

use std::path::Path;
use std::process::Command;

use cluster::{Cluster, Options};

#[tokio::test(flavor = "multi_thread")]
async fn the_python_example_client_submits_watches_and_downloads() {
    let cluster = Cluster::start(Options { token: Some("py-t0ken".into()), ..Options::default() });
    cluster.wait_for_workers([1, 1, 1]).await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = cluster.dir.path().join("python.png");
    let token = cluster.dir.path().join("token");
    let output = Command::new("bash")
        .arg(root.join("examples/python/run.sh"))
        .args(["--addr", &cluster.addr.to_string(), "--out", out.to_str().unwrap(), "--token-file", token.to_str().unwrap()])
        .output()
        .expect("running bash examples/python/run.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the Python client failed ({}):\n{stdout}\n{stderr}", output.status);
    assert!(stdout.contains("reflection (v1alpha): ") && stdout.contains("fmboost.v1.Pipeline"), "{stdout}");
    assert!(stdout.contains("python client: ok job=") && stdout.contains("crc32c=ok"), "{stdout}");
    // 64 px base → 8² latent → one hop → 16² → 128 px.
    let png = std::fs::read(&out).expect("the client wrote the PNG");
    let image = image::load_from_memory(&png).expect("a PNG");
    assert_eq!((image.width(), image.height()), (128, 128));
}
