//! Redis connections. Commands go through a `ConnectionManager` (reconnects after Redis
//! restarts) with a generous response timeout; blocking reads (XREADGROUP BLOCK) need their own
//! connection with the response timeout disabled, since redis-rs times out after 500 ms by
//! default and a multiplexed connection would hold other commands behind the blocked one.

use std::time::Duration;

use anyhow::Context;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// Response timeout for ordinary commands (scripts and blob writes included).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

pub fn client(url: &str) -> anyhow::Result<redis::Client> {
    redis::Client::open(url).with_context(|| format!("--redis {url}: not a valid Redis URL"))
}

/// A reconnecting connection for ordinary commands.
pub async fn commands(client: &redis::Client) -> anyhow::Result<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(COMMAND_TIMEOUT))
        .set_connection_timeout(Some(Duration::from_secs(5)));
    client.get_connection_manager_with_config(config).await.context("connecting to Redis")
}

/// A reconnecting connection for blocking reads only: no response timeout.
pub async fn blocking(client: &redis::Client) -> anyhow::Result<ConnectionManager> {
    let config = ConnectionManagerConfig::new().set_response_timeout(None).set_connection_timeout(Some(Duration::from_secs(5)));
    client.get_connection_manager_with_config(config).await.context("connecting to Redis (blocking reads)")
}

/// Creates a consumer group at the start of a stream (creating the stream), unless it exists.
pub async fn ensure_group(conn: &mut ConnectionManager, stream: &str, group: &str) -> anyhow::Result<()> {
    let created: redis::RedisResult<()> =
        redis::cmd("XGROUP").arg("CREATE").arg(stream).arg(group).arg("0").arg("MKSTREAM").query_async(conn).await;
    match created {
        Ok(()) => Ok(()),
        Err(err) if err.code() == Some("BUSYGROUP") => Ok(()),
        Err(err) => Err(err).with_context(|| format!("creating consumer group {group} on {stream}")),
    }
}

/// Entries of `stream` not yet delivered to `group` (its lag), counted exactly even after
/// deletions (when Redis reports no lag).
pub async fn undelivered(conn: &mut ConnectionManager, stream: &str, group: &str) -> anyhow::Result<u64> {
    let exists: bool = redis::cmd("EXISTS").arg(stream).query_async(conn).await.context("EXISTS")?;
    if !exists {
        return Ok(0);
    }
    let info: redis::streams::StreamInfoGroupsReply =
        redis::cmd("XINFO").arg("GROUPS").arg(stream).query_async(conn).await.with_context(|| format!("XINFO GROUPS {stream}"))?;
    let Some(group_info) = info.groups.into_iter().find(|g| g.name == group) else { return Ok(0) };
    if let Some(lag) = group_info.lag {
        return Ok(lag as u64);
    }
    let ids: Vec<redis::Value> = redis::cmd("XRANGE")
        .arg(stream)
        .arg(format!("({}", group_info.last_delivered_id))
        .arg("+")
        .query_async(conn)
        .await
        .context("XRANGE for the undelivered count")?;
    Ok(ids.len() as u64)
}
