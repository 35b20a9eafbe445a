//! `--blob-store redis://…`: blobs in a Redis of their own, through the real binaries. The
//! routing Redis then holds no blob; results are still streamed, kept for `--result-ttl-ms`,
//! and uploads land beside the stage outputs. A bad value stops the binaries naming the flag.

mod cluster;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cluster::{result, submit, terminal, text_spec, watch_to_end, Cluster, Options};
use fmboost_core::tensor::WireTensor;
use fmboost_proto::v1 as pb;

/// The blob Redis, killed on drop.
struct BlobRedis {
    child: Child,
    url: String,
}

impl BlobRedis {
    fn start() -> BlobRedis {
        let port = fmboost_core::net::free_loopback_port().expect("a free port");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("starting redis-server (never skipped: install it, ./scripts/test.sh does)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the blob redis-server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        BlobRedis { child, url: format!("redis://127.0.0.1:{port}") }
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap()
    }
}

impl Drop for BlobRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn keys(conn: &mut redis::aio::MultiplexedConnection, pattern: &str) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query_async(conn).await.unwrap();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread")]
async fn blobs_go_to_their_own_redis_and_results_are_kept() {
    let blobs = BlobRedis::start();
    let flag = vec!["--blob-store".to_string(), blobs.url.clone()];
    let mut options = Options { workers: [0, 0, 0], ..Options::default() };
    // Results outlive the stage blobs' hour, as the ADVANCE script makes them in one Redis.
    options.coordinator_args = [flag.clone(), vec!["--result-ttl-ms".into(), "7200000".into()]].concat();
    let mut cluster = Cluster::start(options);
    for stage in cluster::STAGES {
        cluster.start_worker_with(stage, &flag);
    }
    cluster.wait_for_workers([1, 1, 1]).await;
    let mut client = cluster.client().await;

    let job = submit(&cluster, &mut client, text_spec(3, 2, 2, 2)).await;
    let events = watch_to_end(&cluster, &mut client, &job).await;
    assert!(matches!(terminal(&events), pb::job_event::Event::Completed(_)), "{events:?}");
    let (png, latent) = result(&cluster, &mut client, &job, true).await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG came back ({} bytes)", png.len());
    let latent = WireTensor::from_proto(latent.expect("the latent")).expect("a consistent tensor");
    assert_eq!(latent.shape, [1, 4, 32, 32]);

    // The same job on the routing Redis alone gives the same bytes (tested elsewhere for one
    // Redis); here: where the bytes are.
    let mut routing = cluster.redis().await;
    assert_eq!(keys(&mut routing, "e2e:blob:*").await, Vec::<String>::new(), "no blob in the routing Redis");
    let mut blob_conn = blobs.conn().await;
    let stored = keys(&mut blob_conn, &format!("e2e:blob:{{{job}}}:*")).await;
    let expected: Vec<String> = ["cfm:1:1", "cfm:2:1", "decoder:0:1", "diffusion:0:1"].iter().map(|s| format!("e2e:blob:{{{job}}}:{s}")).collect();
    assert_eq!(stored, expected);
    let ttl = |key: String| {
        let mut conn = blob_conn.clone();
        async move { redis::cmd("PTTL").arg(key).query_async::<i64>(&mut conn).await.unwrap() }
    };
    for (suffix, longer) in [("decoder:0:1", true), ("cfm:2:1", true), ("cfm:1:1", false)] {
        let left = ttl(format!("e2e:blob:{{{job}}}:{suffix}")).await;
        if longer {
            assert!(left > 3_600_000, "{suffix} is a result: kept for --result-ttl-ms, {left} ms left");
        } else {
            assert!(left > 0 && left <= 3_600_000, "{suffix} keeps the stage blob TTL, {left} ms left");
        }
    }

    // An upload is written through the blob store too.
    let mut spec = text_spec(4, 2, 1, 2);
    spec.source = Some(pb::job_spec::Source::Latent(WireTensor::from_f32(vec![1, 4, 8, 8], &[0.25; 256]).to_proto()));
    spec.base = None;
    let uploaded = submit(&cluster, &mut client, spec).await;
    let events = watch_to_end(&cluster, &mut client, &uploaded).await;
    assert!(matches!(terminal(&events), pb::job_event::Event::Completed(_)), "{events:?}");
    let stored = keys(&mut blob_conn, &format!("e2e:blob:{{{uploaded}}}:*")).await;
    assert!(stored.contains(&format!("e2e:blob:{{{uploaded}}}:upload")), "{stored:?}");
    assert_eq!(keys(&mut routing, "e2e:blob:*").await, Vec::<String>::new());
}

#[test]
fn a_bad_blob_store_stops_the_binaries_naming_the_flag() {
    for binary in ["fmboost-coordinator", "fmboost-worker-cfm"] {
        for (value, says) in [("s3://bucket", "not built"), ("ftp://x", "unknown store")] {
            let output = Command::new(cluster::binary(binary)).args(["--blob-store", value]).output().expect("running the binary");
            assert!(!output.status.success());
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(stderr.contains("--blob-store") && stderr.contains(says), "{binary} {value}: {stderr}");
        }
    }
}
