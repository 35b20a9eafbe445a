//! Fault injection on a local cluster: the timeline of `--kill`, `--restart-coordinator` and
//! `--restart-redis`, and the task that carries it out and records what it did.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use fmboost_core::stage::StageKind;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::args::{KillSpec, KillWhen, RestartSpec};
use crate::cluster::LocalCluster;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    KillWorker(StageKind),
    RestartCoordinator { down: Duration },
    RestartRedis { down: Duration },
}

impl FaultAction {
    pub fn name(&self) -> &'static str {
        match self {
            FaultAction::KillWorker(_) => "kill-worker",
            FaultAction::RestartCoordinator { .. } => "restart-coordinator",
            FaultAction::RestartRedis { .. } => "restart-redis",
        }
    }
}

/// Faults in time order; endless when a kill repeats (`every=`).
pub struct FaultTimeline {
    /// (next time, action, repeat period)
    timers: Vec<(Duration, FaultAction, Option<Duration>)>,
}

impl FaultTimeline {
    pub fn new(kills: &[KillSpec], coordinator: &[RestartSpec], redis: &[RestartSpec]) -> Self {
        let mut timers = Vec::new();
        for kill in kills {
            let action = FaultAction::KillWorker(kill.stage);
            timers.push(match kill.when {
                KillWhen::Every(every) => (every, action, Some(every)),
                KillWhen::At(at) => (at, action, None),
            });
        }
        timers.extend(coordinator.iter().map(|r| (r.at, FaultAction::RestartCoordinator { down: r.down }, None)));
        timers.extend(redis.iter().map(|r| (r.at, FaultAction::RestartRedis { down: r.down }, None)));
        FaultTimeline { timers }
    }

    pub fn is_empty(&self) -> bool {
        self.timers.is_empty()
    }
}

impl Iterator for FaultTimeline {
    type Item = (Duration, FaultAction);

    fn next(&mut self) -> Option<Self::Item> {
        // Earliest first; ties in the order given.
        let (index, _) = self.timers.iter().enumerate().min_by_key(|(i, (at, _, _))| (*at, *i))?;
        let (at, action, every) = self.timers[index];
        match every {
            Some(every) => self.timers[index].0 = at + every,
            None => {
                self.timers.remove(index);
            }
        }
        Some((at, action))
    }
}

/// One fault as carried out.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultRecord {
    pub action: FaultAction,
    pub target: String,
    /// When the process was killed, from the start of the run.
    pub at: Duration,
    /// Until the replacement was started (restarts: until it answered).
    pub took: Duration,
}

/// Carries out the timeline until it ends (or the task is aborted). An error (a process that
/// will not come back) ends the run: the cluster is broken.
pub async fn inject(
    cluster: Arc<tokio::sync::Mutex<LocalCluster>>,
    timeline: FaultTimeline,
    start: Instant,
    rng_seed: u64,
    done: Arc<Mutex<Vec<FaultRecord>>>,
) -> anyhow::Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(rng_seed ^ 0x6661_756c_7473);
    for (at, action) in timeline {
        tokio::time::sleep_until((start + at).into()).await;
        let mut cluster = cluster.lock().await;
        let began = Instant::now();
        let at = began - start;
        let target = match action {
            FaultAction::KillWorker(kind) => {
                let (killed, started) = cluster.kill_worker(kind, rng.random_range(0..usize::MAX)).with_context(|| format!("--kill {kind}"))?;
                format!("{killed} (replaced by {started})")
            }
            FaultAction::RestartCoordinator { down } => {
                cluster.restart_coordinator(down).await.context("--restart-coordinator")?;
                "coordinator".to_string()
            }
            FaultAction::RestartRedis { down } => {
                cluster.restart_redis(down).await.context("--restart-redis")?;
                "redis-server".to_string()
            }
        };
        tracing::info!(fault = action.name(), %target, "fault injected at {at:?}");
        done.lock().expect("fault log lock").push(FaultRecord { action, target, at, took: began.elapsed() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_merges_repeating_and_one_off_faults_in_order() {
        let s = Duration::from_secs;
        let kills = [
            KillSpec { stage: StageKind::Cfm, when: KillWhen::Every(s(10)) },
            KillSpec { stage: StageKind::Decoder, when: KillWhen::At(s(15)) },
        ];
        let restarts = [RestartSpec { at: s(20), down: s(1) }];
        let redis = [RestartSpec { at: s(5), down: s(2) }];
        let timeline: Vec<(Duration, FaultAction)> = FaultTimeline::new(&kills, &restarts, &redis).take(6).collect();
        assert_eq!(
            timeline,
            vec![
                (s(5), FaultAction::RestartRedis { down: s(2) }),
                (s(10), FaultAction::KillWorker(StageKind::Cfm)),
                (s(15), FaultAction::KillWorker(StageKind::Decoder)),
                (s(20), FaultAction::KillWorker(StageKind::Cfm)),
                (s(20), FaultAction::RestartCoordinator { down: s(1) }),
                (s(30), FaultAction::KillWorker(StageKind::Cfm)),
            ]
        );
        let mut one_off = FaultTimeline::new(&kills[1..], &[], &[]);
        assert_eq!(one_off.next(), Some((s(15), FaultAction::KillWorker(StageKind::Decoder))));
        assert_eq!(one_off.next(), None);
        assert!(FaultTimeline::new(&[], &[], &[]).is_empty());
    }
}
