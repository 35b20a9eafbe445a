//! Local mode: what a run cost its one Redis. Sampled once when the cluster is ready and once
//! after the drain (before shutdown): CPU seconds (`INFO cpu`, the main thread apart: with
//! `io-threads 1`, Redis' default, it does all command and socket work, so its 100 % of a core
//! is the ceiling), bytes in and out (`INFO stats`), commands processed, and the blobs the run
//! left (every blob lives its TTL, an hour by default, so all of them are still there), per
//! stage and per completed job. The report's `redis` section.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

/// One reading of the counters.
#[derive(Debug, Clone)]
pub struct RedisSample {
    at: Instant,
    cpu_s: f64,
    main_thread_cpu_s: Option<f64>,
    net_input_bytes: u64,
    net_output_bytes: u64,
    commands: u64,
}

/// Blobs of one kind (`upload`, `diffusion:0`, `cfm:1`, `decoder:0`, ...).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct BlobTally {
    pub count: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PerJob {
    pub cpu_ms: f64,
    pub main_thread_cpu_ms: Option<f64>,
    pub net_input_bytes: u64,
    pub net_output_bytes: u64,
    pub commands: f64,
    pub blob_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RedisUsage {
    /// Seconds between the two samples (cluster ready → drained).
    pub window_s: f64,
    /// user + sys CPU of redis-server (all its threads) in the window.
    pub cpu_seconds: f64,
    /// The main thread's share (`used_cpu_*_main_thread`).
    pub main_thread_cpu_seconds: Option<f64>,
    /// Main-thread (else whole-process) CPU seconds per second of the window: 1.0 = a core.
    pub busy_fraction: f64,
    pub net_input_bytes: u64,
    pub net_output_bytes: u64,
    pub commands: u64,
    pub completed_jobs: u64,
    /// None when no job completed.
    pub per_job: Option<PerJob>,
    /// Completed jobs per second at which the main thread would be 100 % busy, extrapolated
    /// linearly from its CPU per job (an upper bound: queueing near saturation comes first).
    pub saturation_jobs_per_s: Option<f64>,
    pub blobs: BTreeMap<String, BlobTally>,
}

async fn connect(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url).with_context(|| format!("redis URL {url}"))?;
    client.get_multiplexed_async_connection().await.with_context(|| format!("connecting to {url}"))
}

/// `field:value` lines of an INFO reply.
fn info_fields(text: &str) -> BTreeMap<&str, &str> {
    text.lines().filter_map(|line| line.trim_end().split_once(':')).collect()
}

fn parse_sample(text: &str, at: Instant) -> anyhow::Result<RedisSample> {
    let fields = info_fields(text);
    let number = |name: &str| -> anyhow::Result<f64> {
        let value = fields.get(name).with_context(|| format!("INFO has no {name}"))?;
        value.parse::<f64>().with_context(|| format!("INFO {name} = {value:?}"))
    };
    let main_thread = match (fields.get("used_cpu_user_main_thread"), fields.get("used_cpu_sys_main_thread")) {
        (Some(_), Some(_)) => Some(number("used_cpu_user_main_thread")? + number("used_cpu_sys_main_thread")?),
        _ => None,
    };
    Ok(RedisSample {
        at,
        cpu_s: number("used_cpu_user")? + number("used_cpu_sys")?,
        main_thread_cpu_s: main_thread,
        net_input_bytes: number("total_net_input_bytes")? as u64,
        net_output_bytes: number("total_net_output_bytes")? as u64,
        commands: number("total_commands_processed")? as u64,
    })
}

/// Reads the counters now.
pub async fn sample(url: &str) -> anyhow::Result<RedisSample> {
    let mut conn = connect(url).await?;
    let cpu: String = redis::cmd("INFO").arg("cpu").query_async(&mut conn).await.context("INFO cpu")?;
    let stats: String = redis::cmd("INFO").arg("stats").query_async(&mut conn).await.context("INFO stats")?;
    parse_sample(&format!("{cpu}\n{stats}"), Instant::now())
}

/// The blob kind of a key `{ns}:blob:{<id>}:{stage}:{hop}:{attempt}` or `{ns}:blob:{<id>}:upload`.
fn blob_kind(key: &str) -> String {
    let parts: Vec<&str> = key.rsplitn(4, ':').collect();
    match parts.as_slice() {
        ["upload", ..] => "upload".into(),
        [_attempt, hop, stage, _] => format!("{stage}:{hop}"),
        _ => "other".into(),
    }
}

/// Counts and sizes the namespace's blobs (SCAN + STRLEN; run after the load, not during it).
pub async fn blobs(url: &str, namespace: &str) -> anyhow::Result<BTreeMap<String, BlobTally>> {
    let mut conn = connect(url).await?;
    let pattern = format!("{namespace}:blob:*");
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(1000).query_async(&mut conn).await.context("SCAN")?;
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let mut tally: BTreeMap<String, BlobTally> = BTreeMap::new();
    for chunk in keys.chunks(500) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.cmd("STRLEN").arg(key);
        }
        let lengths: Vec<u64> = pipe.query_async(&mut conn).await.context("STRLEN")?;
        for (key, len) in chunk.iter().zip(lengths) {
            let entry = tally.entry(blob_kind(key)).or_default();
            entry.count += 1;
            entry.bytes += len;
        }
    }
    Ok(tally)
}

fn round(x: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (x * scale).round() / scale
}

impl RedisUsage {
    pub fn between(before: &RedisSample, after: &RedisSample, completed_jobs: u64, blobs: BTreeMap<String, BlobTally>) -> RedisUsage {
        let window_s = after.at.duration_since(before.at).as_secs_f64();
        let cpu_seconds = after.cpu_s - before.cpu_s;
        let main_thread = match (before.main_thread_cpu_s, after.main_thread_cpu_s) {
            (Some(b), Some(a)) => Some(a - b),
            _ => None,
        };
        let bound = main_thread.unwrap_or(cpu_seconds);
        let net_input_bytes = after.net_input_bytes.saturating_sub(before.net_input_bytes);
        let net_output_bytes = after.net_output_bytes.saturating_sub(before.net_output_bytes);
        let commands = after.commands.saturating_sub(before.commands);
        let blob_bytes: u64 = blobs.values().map(|b| b.bytes).sum();
        let per_job = (completed_jobs > 0).then(|| {
            let n = completed_jobs as f64;
            PerJob {
                cpu_ms: round(cpu_seconds * 1000.0 / n, 4),
                main_thread_cpu_ms: main_thread.map(|m| round(m * 1000.0 / n, 4)),
                net_input_bytes: net_input_bytes / completed_jobs,
                net_output_bytes: net_output_bytes / completed_jobs,
                commands: round(commands as f64 / n, 1),
                blob_bytes: blob_bytes / completed_jobs,
            }
        });
        RedisUsage {
            window_s: round(window_s, 3),
            cpu_seconds: round(cpu_seconds, 3),
            main_thread_cpu_seconds: main_thread.map(|m| round(m, 3)),
            busy_fraction: if window_s > 0.0 { round(bound / window_s, 3) } else { 0.0 },
            net_input_bytes,
            net_output_bytes,
            commands,
            completed_jobs,
            saturation_jobs_per_s: (completed_jobs > 0 && bound > 0.0).then(|| round(completed_jobs as f64 / bound, 1)),
            per_job,
            blobs,
        }
    }

    /// The markdown lines of the report.
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "\nRedis over {:.1} s: CPU {:.2} s (main thread {}), busy {:.0} % of a core, in {} B, out {} B, {} commands",
            self.window_s,
            self.cpu_seconds,
            self.main_thread_cpu_seconds.map_or("n/a".into(), |m| format!("{m:.2} s")),
            self.busy_fraction * 100.0,
            self.net_input_bytes,
            self.net_output_bytes,
            self.commands
        );
        if let Some(p) = &self.per_job {
            out += &format!(
                "\nper job: CPU {:.3} ms (main thread {}), in {} B, out {} B, {:.1} commands, blobs {} B; one Redis saturates near {} jobs/s (extrapolated)",
                p.cpu_ms,
                p.main_thread_cpu_ms.map_or("n/a".into(), |m| format!("{m:.3} ms")),
                p.net_input_bytes,
                p.net_output_bytes,
                p.commands,
                p.blob_bytes,
                self.saturation_jobs_per_s.map_or("n/a".into(), |s| format!("{s:.0}"))
            );
        }
        let blobs: Vec<String> = self.blobs.iter().map(|(kind, t)| format!("{kind} {}×{} B", t.count, t.bytes / t.count.max(1))).collect();
        if !blobs.is_empty() {
            out += &format!("\nblobs left (kind count×mean size): {}", blobs.join(", "));
        }
        out + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const INFO: &str = "# CPU\r\nused_cpu_sys:1.500000\r\nused_cpu_user:2.250000\r\nused_cpu_sys_children:0.000000\r\n\
used_cpu_sys_main_thread:1.000000\r\nused_cpu_user_main_thread:2.000000\r\n\n# Stats\r\ntotal_commands_processed:1000\r\n\
total_net_input_bytes:5000\r\ntotal_net_output_bytes:7000\r\n";

    #[test]
    fn parses_info_and_computes_per_job_figures() {
        let start = Instant::now();
        let before = parse_sample(INFO, start).unwrap();
        assert_eq!(before.cpu_s, 3.75);
        assert_eq!(before.main_thread_cpu_s, Some(3.0));
        let mut after = before.clone();
        after.at = start + Duration::from_secs(10);
        after.cpu_s += 2.0;
        after.main_thread_cpu_s = Some(4.0);
        after.net_input_bytes += 10_000;
        after.net_output_bytes += 20_000;
        after.commands += 400;
        let blobs = BTreeMap::from([("cfm:1".to_string(), BlobTally { count: 10, bytes: 3000 })]);
        let usage = RedisUsage::between(&before, &after, 10, blobs);
        assert_eq!(usage.cpu_seconds, 2.0);
        assert_eq!(usage.main_thread_cpu_seconds, Some(1.0));
        assert_eq!(usage.busy_fraction, 0.1);
        let per_job = usage.per_job.as_ref().unwrap();
        assert_eq!((per_job.cpu_ms, per_job.main_thread_cpu_ms), (200.0, Some(100.0)));
        assert_eq!((per_job.net_input_bytes, per_job.net_output_bytes, per_job.blob_bytes), (1000, 2000, 300));
        assert_eq!(per_job.commands, 40.0);
        // 1 s of main thread for 10 jobs: a core is 10 jobs/s.
        assert_eq!(usage.saturation_jobs_per_s, Some(10.0));
        assert!(usage.markdown().contains("saturates near 10 jobs/s"));
    }

    #[test]
    fn a_missing_counter_is_an_error_naming_it() {
        let err = parse_sample("used_cpu_sys:1\r\n", Instant::now()).unwrap_err();
        assert!(err.to_string().contains("used_cpu_user"), "{err}");
    }

    #[test]
    fn blob_kinds_come_from_the_key_layout() {
        assert_eq!(blob_kind("lt-1:blob:{ab-cd}:cfm:2:1"), "cfm:2");
        assert_eq!(blob_kind("lt-1:blob:{ab-cd}:upload"), "upload");
        assert_eq!(blob_kind("lt-1:blob:ab:decoder:0:3"), "decoder:0");
    }
}
