//! First starts whose port turns out taken. These start real servers: redis-server must be on
//! PATH and the coordinator built (`cargo build --workspace --bins`, as scripts/test.sh does).

use std::net::TcpListener;

use super::*;

/// A cluster with nothing started, its files in `dir`.
fn bare_cluster(dir: &Path) -> LocalCluster {
    let test_exe = std::env::current_exe().unwrap();
    let config = ClusterConfig {
        // Unit tests run from target/<profile>/deps; the binaries are one level up.
        bin_dir: test_exe.parent().and_then(Path::parent).unwrap().to_path_buf(),
        redis_server: PathBuf::from("redis-server"),
        dir: dir.to_path_buf(),
        namespace: "porttest".into(),
        workers: WorkerCounts(BTreeMap::new()),
        job_profile: "sleep".into(),
        worker_profile: "sleep".into(),
        max_batch: 1,
        batch_wait_ms: 0,
        worker_idle_timeout_ms: 1000,
        max_queued: 10,
        append_only: false,
        auth_token_file: None,
        startup_timeout: Duration::from_secs(20),
    };
    LocalCluster {
        config,
        coordinator: None,
        workers: BTreeMap::new(),
        redis: None,
        retired: Vec::new(),
        spawner: Spawner::start().unwrap(),
        redis_port: free_port().unwrap(),
        coordinator_addr: SocketAddr::from(([127, 0, 0, 1], free_port().unwrap())),
        started: 0,
    }
}

#[tokio::test]
async fn a_taken_port_moves_a_first_start_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = bare_cluster(dir.path());
    let coordinator = cluster.config.bin_dir.join("fmboost-coordinator");
    assert!(coordinator.is_file(), "{} missing: run `cargo build --workspace --bins` first", coordinator.display());
    let redis_squatter = TcpListener::bind("127.0.0.1:0").unwrap();
    let coordinator_squatter = TcpListener::bind("127.0.0.1:0").unwrap();
    cluster.redis_port = redis_squatter.local_addr().unwrap().port();
    cluster.coordinator_addr = coordinator_squatter.local_addr().unwrap();

    cluster.first_start(Server::Redis).await.expect("redis on another port");
    assert_ne!(cluster.redis_port, redis_squatter.local_addr().unwrap().port());
    assert_eq!(Some(redis_pid(cluster.redis_port).unwrap()), cluster.redis.as_ref().unwrap().pid(), "our redis answers");
    cluster.first_start(Server::Coordinator).await.expect("coordinator on another port");
    assert_ne!(cluster.coordinator_addr, coordinator_squatter.local_addr().unwrap());
    assert!(cluster.unexpected_exits().unwrap().is_empty());
    // One failed try each, which said why.
    let logs: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    for server in ["redis", "coordinator"] {
        let mut tries: Vec<&String> = logs.iter().filter(|name| name.ends_with(&format!("-{server}.log"))).collect();
        tries.sort();
        assert_eq!(tries.len(), 2, "{logs:?}");
        let failed = std::fs::read_to_string(dir.path().join(tries[0])).unwrap();
        assert!(fmboost_core::net::says_address_in_use(&failed), "{failed}");
    }
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn another_redis_on_the_port_is_never_taken_for_ours() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut first = bare_cluster(dir_a.path());
    first.first_start(Server::Redis).await.unwrap();
    let mut second = bare_cluster(dir_b.path());
    second.redis_port = first.redis_port;
    let err = second.start_redis().await.expect_err("the port is the first cluster's");
    assert!(err.is::<PortTaken>(), "{err:#}");
    assert!(format!("{err}").contains(&format!("port {}", first.redis_port)), "{err}");
    first.shutdown().await.unwrap();
}

/// One inline Redis command on a fresh connection; the first reply read.
fn redis_command(port: u16, command: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    stream.write_all(format!("{command}\r\n").as_bytes()).unwrap();
    let mut reply = [0u8; 256];
    let n = stream.read(&mut reply).unwrap();
    String::from_utf8_lossy(&reply[..n]).into_owned()
}

#[tokio::test]
async fn a_redis_restart_comes_back_on_its_port_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = bare_cluster(dir.path());
    cluster.config.append_only = true;
    cluster.first_start(Server::Redis).await.unwrap();
    let (port, first_pid) = (cluster.redis_port, cluster.redis.as_ref().unwrap().pid());
    assert_eq!(redis_command(port, "SET job:1 queued"), "+OK\r\n");
    cluster.restart_redis(Duration::from_millis(50)).await.unwrap();
    assert_eq!(cluster.redis_port, port, "a restart keeps the address");
    assert_ne!(cluster.redis.as_ref().unwrap().pid(), first_pid);
    assert_eq!(redis_command(port, "GET job:1"), "$6\r\nqueued\r\n", "the AOF kept the write");
    assert!(cluster.unexpected_exits().unwrap().is_empty(), "the killed Redis was ours to kill");
    cluster.shutdown().await.unwrap();
}
