//! Cancellation flags of in-flight jobs, set from Redis without a Redis call on the compute
//! thread: a subscriber to `{ns}:cancels` sets a job's flag as soon as it is cancelled, and a
//! poll of the `{ns}:cancel:{id}` keys covers messages missed while reconnecting.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use redis::aio::ConnectionManager;

use crate::keys::Keys;

const POLL_PERIOD: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub(crate) struct CancelWatch {
    flags: Arc<Mutex<HashMap<String, Arc<AtomicBool>>>>,
}

impl CancelWatch {
    pub fn start(client: redis::Client, conn: ConnectionManager, keys: Keys) -> Self {
        let watch = CancelWatch { flags: Arc::default() };
        tokio::spawn(watch.clone().subscribe_loop(client, keys.clone()));
        tokio::spawn(watch.clone().poll_loop(conn, keys));
        watch
    }

    /// The flag of `job_id`, tracked until [`CancelWatch::unregister`].
    pub fn register(&self, job_id: &str) -> Arc<AtomicBool> {
        self.flags.lock().expect("cancel flags lock").entry(job_id.to_string()).or_default().clone()
    }

    pub fn unregister(&self, job_id: &str) {
        self.flags.lock().expect("cancel flags lock").remove(job_id);
    }

    fn set(&self, job_id: &str) {
        if let Some(flag) = self.flags.lock().expect("cancel flags lock").get(job_id) {
            flag.store(true, Ordering::SeqCst);
        }
    }

    async fn subscribe_loop(self, client: redis::Client, keys: Keys) {
        loop {
            match client.get_async_pubsub().await {
                Ok(mut pubsub) => match pubsub.subscribe(keys.cancel_channel()).await {
                    Ok(()) => {
                        let mut messages = pubsub.on_message();
                        while let Some(message) = messages.next().await {
                            match message.get_payload::<String>() {
                                Ok(job_id) => self.set(&job_id),
                                Err(err) => tracing::warn!("cancel message: {err}"),
                            }
                        }
                        tracing::warn!("cancel subscription ended; resubscribing");
                    }
                    Err(err) => tracing::warn!("subscribing to cancels: {err}"),
                },
                Err(err) => tracing::warn!("cancel subscription connection: {err}"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn poll_loop(self, mut conn: ConnectionManager, keys: Keys) {
        loop {
            tokio::time::sleep(POLL_PERIOD).await;
            let jobs: Vec<String> = self.flags.lock().expect("cancel flags lock").keys().cloned().collect();
            if jobs.is_empty() {
                continue;
            }
            let mut pipe = redis::pipe();
            for job in &jobs {
                pipe.cmd("EXISTS").arg(keys.cancel_flag(job));
            }
            match pipe.query_async::<Vec<bool>>(&mut conn).await {
                Ok(flags) => jobs.iter().zip(flags).filter(|(_, set)| *set).for_each(|(job, _)| self.set(job)),
                Err(err) => tracing::warn!("polling cancel flags: {err}"),
            }
        }
    }
}
