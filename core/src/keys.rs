//! Redis key layout, all under a namespace so clusters (and tests) can share one server.
//!
//! `ns` is the namespace; `{<id>}` is the job id between literal braces: a Redis Cluster hash
//! tag, so that all of one job's keys hash to one slot (only the text between the braces is
//! hashed; [`slot`] computes it). Cross-job keys (queues, events, the active set, idempotency
//! keys) carry no tag; which scripts that makes cross-slot is in docs/architecture.md, "Redis
//! Cluster".
//!
//! | key | type | what |
//! |---|---|---|
//! | `{ns}:q:{stage}:{priority}` | stream | stage tasks; consumer group `workers` |
//! | `{ns}:events` | stream | worker → coordinator stage events; consumer group `coordinators` |
//! | `{ns}:job:{<id>}` | hash | the job record (see the coordinator's `store`) |
//! | `{ns}:active` | sorted set | admitted, unfinished job ids scored by admission time |
//! | `{ns}:blob:{<id>}:{stage}:{hop}:{attempt}` | string, TTL | a stage's output (`BlobPayload`) |
//! | `{ns}:blob:{<id>}:upload` | string, TTL | the uploaded latent or image |
//! | `{ns}:idem:{key}` | string, TTL | idempotency key → job id |
//! | `{ns}:cancel:{<id>}` | string, TTL | set when the job is cancelled |
//! | `{ns}:cancels` | pub/sub channel | job ids as they are cancelled (workers stop at once) |
//! | `{ns}:watch:{<id>}` | pub/sub channel | `JobEvent`s for Watch |
//! | `{ns}:dlq:{stage}` | stream | dead-lettered tasks with the reason |
//! | `{ns}:workers:{stage}` | sorted set | worker id scored by heartbeat expiry (Unix ms) |
//! | `{ns}:workers:{stage}:{profile}` | sorted set | the same, for the workers serving `profile` |

use crate::spec::Priority;
use crate::stage::{StageKind, StageRef};

pub const WORKER_GROUP: &str = "workers";
pub const COORDINATOR_GROUP: &str = "coordinators";

#[derive(Debug, Clone)]
pub struct Keys {
    ns: String,
}

impl Keys {
    /// `namespace` must hold no braces (checked by the binaries' flags): a `{` in it would
    /// make it the hash tag of every key.
    pub fn new(namespace: &str) -> Self {
        Keys { ns: namespace.to_string() }
    }

    /// Why a namespace is refused; None for a good one.
    pub fn check_namespace(namespace: &str) -> Option<&'static str> {
        if namespace.is_empty() || namespace.contains(char::is_whitespace) {
            Some("must be non-empty without spaces")
        } else if namespace.contains(['{', '}']) {
            Some("must not contain `{` or `}` (job keys carry `{job id}` as their Redis Cluster hash tag)")
        } else {
            None
        }
    }

    pub fn namespace(&self) -> &str {
        &self.ns
    }

    pub fn queue(&self, stage: StageKind, priority: Priority) -> String {
        format!("{}:q:{}:{}", self.ns, stage.name(), priority.name())
    }

    /// The stage's queues, highest priority first.
    pub fn queues(&self, stage: StageKind) -> Vec<String> {
        Priority::BY_URGENCY.iter().map(|&p| self.queue(stage, p)).collect()
    }

    pub fn events(&self) -> String {
        format!("{}:events", self.ns)
    }

    pub fn job(&self, job_id: &str) -> String {
        format!("{}:job:{{{job_id}}}", self.ns)
    }

    pub fn active(&self) -> String {
        format!("{}:active", self.ns)
    }

    pub fn output_blob(&self, job_id: &str, at: StageRef, attempt: u32) -> String {
        format!("{}:blob:{{{job_id}}}:{}:{}:{attempt}", self.ns, at.kind.name(), at.hop)
    }

    pub fn upload_blob(&self, job_id: &str) -> String {
        format!("{}:blob:{{{job_id}}}:upload", self.ns)
    }

    pub fn idempotency(&self, key: &str) -> String {
        format!("{}:idem:{key}", self.ns)
    }

    pub fn cancel_flag(&self, job_id: &str) -> String {
        format!("{}:cancel:{{{job_id}}}", self.ns)
    }

    pub fn cancel_channel(&self) -> String {
        format!("{}:cancels", self.ns)
    }

    pub fn watch_channel(&self, job_id: &str) -> String {
        format!("{}:watch:{{{job_id}}}", self.ns)
    }

    pub fn dead_letters(&self, stage: StageKind) -> String {
        format!("{}:dlq:{}", self.ns, stage.name())
    }

    pub fn workers(&self, stage: StageKind) -> String {
        format!("{}:workers:{}", self.ns, stage.name())
    }

    /// Live workers of `stage` that serve `profile` (ClusterStatus shows a profile none serves).
    pub fn profile_workers(&self, stage: StageKind, profile: &str) -> String {
        format!("{}:workers:{}:{profile}", self.ns, stage.name())
    }
}

/// The Redis Cluster slot of `key` (0..16384): CRC16-XMODEM of its hash tag — the text
/// between the first `{` and the next `}`, when that is not empty — or of the whole key.
pub fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &bytes[open + 1..];
        rest.iter().position(|&b| b == b'}').filter(|&close| close > 0).map(|close| &rest[..close])
    });
    crc16_xmodem(tagged.unwrap_or(bytes)) % 16384
}

/// CRC16-CCITT as XMODEM computes it (polynomial 0x1021, initial value 0): Redis Cluster's.
pub fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= (byte as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_namespaced() {
        let keys = Keys::new("t1");
        assert_eq!(keys.queue(StageKind::Cfm, Priority::High), "t1:q:cfm:high");
        assert_eq!(keys.queues(StageKind::Decoder), ["t1:q:decoder:high", "t1:q:decoder:normal", "t1:q:decoder:low"]);
        assert_eq!(keys.output_blob("j", StageRef { kind: StageKind::Cfm, hop: 2 }, 3), "t1:blob:{j}:cfm:2:3");
        assert_eq!(keys.job("j"), "t1:job:{j}");
        assert_eq!(keys.workers(StageKind::Diffusion), "t1:workers:diffusion");
        assert_eq!(keys.profile_workers(StageKind::Cfm, "tiny"), "t1:workers:cfm:tiny");
    }

    #[test]
    fn crc16_matches_the_published_check_value() {
        // The CRC-16/XMODEM check value, and the examples of the Redis Cluster specification.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
        assert_eq!(slot("123456789"), 0x31C3 % 16384);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("foo{}{bar}"), crc16_xmodem(b"foo{}{bar}") % 16384, "an empty tag hashes the whole key");
        assert_eq!(slot("foo{{bar}}zap"), crc16_xmodem(b"{bar") % 16384);
        assert_eq!(slot("foo{bar}{zap}"), crc16_xmodem(b"bar") % 16384);
    }

    #[test]
    fn all_of_one_jobs_keys_share_a_slot() {
        let keys = Keys::new("fmboost");
        let ids = ["0b8e7f3c-2f4e-4a8e-9d1e-5c2f0a9b7d11", "j", "6f1c"];
        for id in ids {
            let mut own = vec![keys.job(id), keys.upload_blob(id), keys.cancel_flag(id), keys.watch_channel(id)];
            for kind in StageKind::ALL {
                for hop in 0..4 {
                    for attempt in 1..4 {
                        own.push(keys.output_blob(id, StageRef { kind, hop }, attempt));
                    }
                }
            }
            let slots: std::collections::BTreeSet<u16> = own.iter().map(|k| slot(k)).collect();
            assert_eq!(slots.len(), 1, "job {id}: {own:?} → slots {slots:?}");
            assert_eq!(slots.first().copied(), Some(crc16_xmodem(id.as_bytes()) % 16384));
        }
        // Different jobs spread over slots (these two differ).
        assert_ne!(slot(&keys.job(ids[0])), slot(&keys.job(ids[1])));
    }

    #[test]
    fn namespaces_with_braces_are_refused() {
        assert!(Keys::check_namespace("fmboost").is_none());
        assert!(Keys::check_namespace("lt-1a2b").is_none());
        assert!(Keys::check_namespace("a{b}").unwrap().contains("hash tag"));
        assert!(Keys::check_namespace("").is_some());
        assert!(Keys::check_namespace("a b").is_some());
    }
}
