//! Redis key layout, all under a namespace so clusters (and tests) can share one server.
//!
//! | key | type | what |
//! |---|---|---|
//! | `{ns}:q:{stage}:{priority}` | stream | stage tasks; consumer group `workers` |
//! | `{ns}:events` | stream | worker → coordinator stage events; consumer group `coordinators` |
//! | `{ns}:job:{id}` | hash | the job record (see `crate::jobs`) |
//! | `{ns}:active` | sorted set | admitted, unfinished job ids scored by admission time |
//! | `{ns}:blob:{id}:{stage}:{hop}:{attempt}` | string, TTL | a stage's output (`BlobPayload`) |
//! | `{ns}:blob:{id}:upload` | string, TTL | the uploaded latent or image |
//! | `{ns}:idem:{key}` | string, TTL | idempotency key → job id |
//! | `{ns}:cancel:{id}` | string, TTL | set when the job is cancelled |
//! | `{ns}:cancels` | pub/sub channel | job ids as they are cancelled (workers stop at once) |
//! | `{ns}:watch:{id}` | pub/sub channel | `JobEvent`s for Watch |
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
    pub fn new(namespace: &str) -> Self {
        Keys { ns: namespace.to_string() }
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
        format!("{}:job:{job_id}", self.ns)
    }

    pub fn active(&self) -> String {
        format!("{}:active", self.ns)
    }

    pub fn output_blob(&self, job_id: &str, at: StageRef, attempt: u32) -> String {
        format!("{}:blob:{job_id}:{}:{}:{attempt}", self.ns, at.kind.name(), at.hop)
    }

    pub fn upload_blob(&self, job_id: &str) -> String {
        format!("{}:blob:{job_id}:upload", self.ns)
    }

    pub fn idempotency(&self, key: &str) -> String {
        format!("{}:idem:{key}", self.ns)
    }

    pub fn cancel_flag(&self, job_id: &str) -> String {
        format!("{}:cancel:{job_id}", self.ns)
    }

    pub fn cancel_channel(&self) -> String {
        format!("{}:cancels", self.ns)
    }

    pub fn watch_channel(&self, job_id: &str) -> String {
        format!("{}:watch:{job_id}", self.ns)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_namespaced() {
        let keys = Keys::new("t1");
        assert_eq!(keys.queue(StageKind::Cfm, Priority::High), "t1:q:cfm:high");
        assert_eq!(keys.queues(StageKind::Decoder), ["t1:q:decoder:high", "t1:q:decoder:normal", "t1:q:decoder:low"]);
        assert_eq!(keys.output_blob("j", StageRef { kind: StageKind::Cfm, hop: 2 }, 3), "t1:blob:j:cfm:2:3");
        assert_eq!(keys.workers(StageKind::Diffusion), "t1:workers:diffusion");
        assert_eq!(keys.profile_workers(StageKind::Cfm, "tiny"), "t1:workers:cfm:tiny");
    }
}
