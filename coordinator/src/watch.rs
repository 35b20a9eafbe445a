//! Watch: one pattern subscription per coordinator to `{ns}:watch:*` fans job events out to
//! the Watch streams of this replica; each stream also polls the job record, so queue
//! positions stay fresh and a missed message never loses a terminal state.
//!
//! A stream ends after the terminal event, or with UNAVAILABLE when this replica stops or a
//! poll of Redis fails: the job is not harmed, and a new Watch (any replica) starts with a
//! snapshot of its state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fmboost_core::now_unix_ms;
use fmboost_proto::{internal as ipb, v1 as pb};
use futures::StreamExt;
use prost::Message;
use tokio::sync::{broadcast, mpsc};
use tonic::Status;

use crate::error::ApiError;
use crate::redis_guard::RedisGuard;
use crate::status::queue_position;
use crate::store::{JobRecord, JobState, JobStore};

const POLL_PERIOD: Duration = Duration::from_millis(1000);

#[derive(Clone)]
pub struct WatchHub {
    senders: Arc<Mutex<HashMap<String, broadcast::Sender<pb::JobEvent>>>>,
    /// Raised when the coordinator stops: open Watch streams end (clients re-watch through
    /// another replica), so graceful shutdown is not held up by them.
    stopping: Arc<tokio::sync::watch::Sender<bool>>,
}

/// A Watch's registration; unregisters on drop.
pub struct Subscription {
    hub: WatchHub,
    job_id: String,
    receiver: broadcast::Receiver<pb::JobEvent>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut senders = self.hub.senders.lock().expect("watch hub lock");
        if senders.get(&self.job_id).is_some_and(|s| s.receiver_count() <= 1) {
            senders.remove(&self.job_id);
        }
    }
}

impl WatchHub {
    /// Starts the pattern subscription (reconnecting on errors).
    pub fn start(client: redis::Client, namespace: String) -> Self {
        let hub = WatchHub { senders: Arc::default(), stopping: Arc::new(tokio::sync::watch::channel(false).0) };
        tokio::spawn(hub.clone().subscribe_loop(client, namespace));
        hub
    }

    /// Ends every open Watch stream.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    pub fn subscribe(&self, job_id: &str) -> Subscription {
        let mut senders = self.senders.lock().expect("watch hub lock");
        let receiver = senders.entry(job_id.to_string()).or_insert_with(|| broadcast::channel(256).0).subscribe();
        Subscription { hub: self.clone(), job_id: job_id.to_string(), receiver }
    }

    async fn subscribe_loop(self, client: redis::Client, namespace: String) {
        let pattern = format!("{namespace}:watch:*");
        loop {
            match client.get_async_pubsub().await {
                Ok(mut pubsub) => match pubsub.psubscribe(&pattern).await {
                    Ok(()) => {
                        let mut messages = pubsub.on_message();
                        while let Some(message) = messages.next().await {
                            let event = message.get_payload::<Vec<u8>>().map_err(|e| e.to_string()).and_then(|bytes| {
                                pb::JobEvent::decode(bytes.as_slice()).map_err(|e| e.to_string())
                            });
                            match event {
                                Ok(event) => self.dispatch(event),
                                Err(err) => tracing::warn!("undecodable watch message: {err}"),
                            }
                        }
                        tracing::warn!("watch subscription ended; resubscribing");
                    }
                    Err(err) => tracing::warn!("subscribing to watch events: {err}"),
                },
                Err(err) => tracing::warn!("watch subscription connection: {err}"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    fn dispatch(&self, event: pb::JobEvent) {
        if let Some(sender) = self.senders.lock().expect("watch hub lock").get(&event.job_id) {
            // No receiver left only means the Watch just ended.
            let _ = sender.send(event);
        }
    }
}

fn is_terminal(event: &pb::JobEvent) -> bool {
    use pb::job_event::Event;
    matches!(event.event, Some(Event::Completed(_) | Event::Failed(_) | Event::Cancelled(_)))
}

/// The event that describes a record's current state.
async fn snapshot(store: &JobStore, record: &JobRecord) -> Result<pb::job_event::Event, ApiError> {
    use pb::job_event::Event;
    Ok(match record.state {
        JobState::Queued => Event::Queued(pb::Queued { at: Some(record.at.to_proto()), position: queue_position(store, record).await? }),
        JobState::Running => Event::StageStarted(pb::StageStarted { at: Some(record.at.to_proto()), worker: String::new(), attempt: 0 }),
        JobState::Completed => {
            let png_bytes = match record.png_bytes {
                Some(bytes) => bytes,
                // A record from an older coordinator: measure the PNG inside the result blob.
                None => match store.read_blob(&record.png_blob).await? {
                    Some(ipb::blob_payload::Payload::Image(png)) => png.len() as u64,
                    _ => 0,
                },
            };
            Event::Completed(pb::Completed { png_bytes })
        }
        JobState::Failed => Event::Failed(pb::Failed { reason: record.error.clone() }),
        JobState::Cancelled => Event::Cancelled(pb::Cancelled {}),
    })
}

fn job_event(job_id: &str, event: pb::job_event::Event) -> pb::JobEvent {
    pb::JobEvent { job_id: job_id.to_string(), time_unix_ms: now_unix_ms(), event: Some(event) }
}

/// Starts a Watch of `job_id`: NOT_FOUND for an unknown job, else a stream that ends after
/// the terminal event.
pub async fn watch(
    store: JobStore,
    hub: &WatchHub,
    guard: &RedisGuard,
    job_id: String,
) -> Result<mpsc::Receiver<Result<pb::JobEvent, Status>>, ApiError> {
    // Subscribe before reading the record, so no event between the two is missed.
    let mut subscription = hub.subscribe(&job_id);
    let current = async {
        let record = store.get(&job_id).await?.ok_or_else(|| ApiError::NotFound(job_id.clone()))?;
        snapshot(&store, &record).await
    };
    let first = job_event(&job_id, guard.bounded(current).await?);
    let guard = guard.clone();
    let (tx, rx) = mpsc::channel(64);
    let mut stopping = hub.stopping.subscribe();
    tokio::spawn(async move {
        let mut last = first.event.clone();
        let done = is_terminal(&first);
        if tx.send(Ok(first)).await.is_err() || done {
            return;
        }
        let mut poll = tokio::time::interval(POLL_PERIOD);
        poll.tick().await;
        loop {
            let event = tokio::select! {
                received = subscription.receiver.recv() => match received {
                    Ok(event) => event,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = poll.tick() => {
                    let current = guard.bounded(async {
                        match store.get(&job_id).await? {
                            Some(record) => snapshot(&store, &record).await,
                            None => Err(ApiError::NotFound(job_id.clone())),
                        }
                    }).await;
                    match current {
                        // Only news: a new position, or a terminal state whose message was missed.
                        Ok(current) if Some(&current) != last.as_ref() && !matches!(current, pb::job_event::Event::StageStarted(_)) => {
                            job_event(&job_id, current)
                        }
                        Ok(_) => continue,
                        Err(ApiError::Unavailable(err)) => {
                            let message = format!("Redis unavailable: {err:#}; the job is unaffected: Watch again");
                            let _ = tx.send(Err(Status::unavailable(message))).await;
                            return;
                        }
                        Err(err) => {
                            let _ = tx.send(Err(err.into())).await;
                            return;
                        }
                    }
                },
                _ = tx.closed() => return,
                // Only ever raised (false → true): any change means stop.
                _ = stopping.changed() => {
                    let _ = tx.send(Err(Status::unavailable("the coordinator is stopping; the job is unaffected: Watch again"))).await;
                    return;
                }
            };
            last = event.event.clone();
            let done = is_terminal(&event);
            if tx.send(Ok(event)).await.is_err() || done {
                return;
            }
        }
    });
    Ok(rx)
}
