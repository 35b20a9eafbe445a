//! Against a real 3-node Redis Cluster on loopback (`redis-server --cluster-enabled yes`,
//! joined by `redis-cli --cluster create`): the slots `fmboost_core::keys::slot` computes are
//! the server's (CLUSTER KEYSLOT); one job's own keys are accepted together in one script and
//! one MULTI; and the routing scripts and transactions that mix a job's keys with the shared
//! queues, events stream and active set are refused CROSSSLOT, as docs/architecture.md
//! ("Redis Cluster") lists. Fails, never skips, without redis-server and redis-cli.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fmboost_core::keys::{self, Keys, WORKER_GROUP};
use fmboost_core::spec::Priority;
use fmboost_core::stage::{StageKind, StageRef};

use crate::store::{ADVANCE, CANCEL, FAIL, START, SUBMIT};

struct Node {
    child: Child,
    port: u16,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_node(dir: &Path) -> Node {
    // The cluster bus listens on port + 10000: keep both free and in range.
    let port = loop {
        let port = fmboost_core::net::free_loopback_port().expect("a free port");
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            break port;
        }
    };
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--cluster-enabled", "yes", "--cluster-config-file", &format!("nodes-{port}.conf")])
        .current_dir(dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("starting redis-server (install Debian's redis-server; ./scripts/test.sh does)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Node { child, port }
}

async fn conn(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// Three masters sharing the 16384 slots, state ok on each.
async fn cluster(dir: &Path) -> Vec<Node> {
    let nodes: Vec<Node> = (0..3).map(|_| start_node(dir)).collect();
    let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
    let output = Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("running redis-cli (Debian's redis-tools, installed with redis-server)");
    assert!(output.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&output.stdout));
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in &nodes {
        let mut c = conn(node.port).await;
        loop {
            let info: String = redis::cmd("CLUSTER").arg("INFO").query_async(&mut c).await.unwrap();
            if info.contains("cluster_state:ok") {
                break;
            }
            assert!(Instant::now() < deadline, "the cluster did not reach state ok: {info}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    nodes
}

/// The node serving `key`'s slot (the others answer MOVED).
async fn owner(nodes: &[Node], key: &str) -> redis::aio::MultiplexedConnection {
    for node in nodes {
        let mut c = conn(node.port).await;
        let answer: redis::RedisResult<bool> = redis::cmd("EXISTS").arg(key).query_async(&mut c).await;
        match answer {
            Ok(_) => return c,
            Err(err) if err.code() == Some("MOVED") => continue,
            Err(err) => panic!("EXISTS {key}: {err}"),
        }
    }
    panic!("no node serves {key}")
}

fn job_keys(keys: &Keys, job: &str) -> Vec<String> {
    let mut own = vec![keys.job(job), keys.upload_blob(job), keys.cancel_flag(job)];
    for (kind, hop) in [(StageKind::Diffusion, 0), (StageKind::Cfm, 1), (StageKind::Cfm, 2), (StageKind::Decoder, 0)] {
        own.push(keys.output_blob(job, StageRef { kind, hop }, 1));
    }
    own
}

fn assert_crossslot<T: std::fmt::Debug>(what: &str, result: redis::RedisResult<T>) {
    match result {
        Err(err) if err.code() == Some("CROSSSLOT") || format!("{err}").contains("CROSSSLOT") => {}
        other => panic!("{what}: expected CROSSSLOT, got {other:?}"),
    }
}

#[tokio::test]
async fn a_jobs_own_keys_share_a_slot_in_a_real_cluster_and_the_shared_keys_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path()).await;
    let keys = Keys::new("fmboost");
    let mut any = conn(nodes[0].port).await;
    for job in ["0b8e7f3c-2f4e-4a8e-9d1e-5c2f0a9b7d11", "4d3c2b1a-0000-4000-8000-000000000001", "j"] {
        for key in job_keys(&keys, job).iter().chain([keys.events(), keys.active(), keys.queue(StageKind::Cfm, Priority::Normal)].iter()) {
            let server: u16 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query_async(&mut any).await.unwrap();
            assert_eq!(server, keys::slot(key), "slot of {key}");
        }
    }

    let job = "0b8e7f3c-2f4e-4a8e-9d1e-5c2f0a9b7d11";
    let own = job_keys(&keys, job);
    let mut node = owner(&nodes, &keys.job(job)).await;
    // One MULTI over the job's record, blobs and cancel flag: accepted.
    let mut pipe = redis::pipe();
    pipe.atomic();
    pipe.cmd("HSET").arg(&own[0]).arg("state").arg("running").ignore();
    for blob in &own[1..] {
        pipe.cmd("SET").arg(blob).arg("bytes").arg("PX").arg(60_000).ignore();
    }
    pipe.query_async::<()>(&mut node).await.expect("a MULTI over one job's keys");
    // A script over them too; START touches only the record (the job is not at cfm 1: stale).
    let own_script = redis::Script::new("for i, k in ipairs(KEYS) do redis.call('PEXPIRE', k, 120000) end return #KEYS");
    let mut invocation = own_script.prepare_invoke();
    for key in &own {
        invocation.key(key);
    }
    assert_eq!(invocation.invoke_async::<usize>(&mut node).await.unwrap(), own.len());
    let start: String = START.key(keys.job(job)).arg("cfm").arg(1).arg(0).invoke_async(&mut node).await.unwrap();
    assert_eq!(start, "stale");

    // The scripts that join the job to shared keys are refused (keys as `JobStore` passes them).
    let queue = keys.queue(StageKind::Cfm, Priority::Normal);
    assert_crossslot(
        "SUBMIT",
        SUBMIT.key(keys.active()).key(keys.job(job)).key(keys.idempotency("k")).key(&queue).invoke_async::<(String, String)>(&mut node).await,
    );
    assert_crossslot("ADVANCE", ADVANCE.key(keys.job(job)).key(&queue).key(keys.active()).invoke_async::<String>(&mut node).await);
    assert_crossslot("FAIL", FAIL.key(keys.job(job)).key(keys.active()).invoke_async::<String>(&mut node).await);
    assert_crossslot(
        "CANCEL",
        CANCEL.key(keys.job(job)).key(keys.active()).key(keys.cancel_flag(job)).key(keys.cancel_channel()).invoke_async::<String>(&mut node).await,
    );
    // The worker's settle transaction: blob + event + ack.
    let mut settle = redis::pipe();
    settle.atomic();
    settle.cmd("SET").arg(&own[4]).arg("settled").ignore();
    settle.cmd("XADD").arg(keys.events()).arg("*").arg("event").arg("x").ignore();
    settle.cmd("XACK").arg(&queue).arg(WORKER_GROUP).arg("0-1").ignore();
    // In a MULTI each command is checked as it is queued: MOVED for a key another node
    // serves, CROSSSLOT for another slot of this node; EXEC then aborts.
    match settle.query_async::<()>(&mut node).await {
        // redis-rs words it "Transaction aborted: [(Index 1, error: Moved: …)]".
        Err(err) if ["MOVED", "CROSSSLOT", "EXECABORT"].iter().any(|code| format!("{err}").to_uppercase().contains(code)) => {}
        other => panic!("settle MULTI: expected MOVED/CROSSSLOT/EXECABORT, got {other:?}"),
    }
    let value: String = redis::cmd("GET").arg(&own[4]).query_async(&mut node).await.unwrap();
    assert_eq!(value, "bytes", "the refused transaction wrote nothing");
}
