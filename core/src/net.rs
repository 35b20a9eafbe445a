//! Loopback ports for servers that tests and the load harness start themselves.

use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;

/// Ports below this are left alone (well-known and registered services).
const LOWEST: u16 = 10_000;

/// A loopback TCP port that was free a moment ago, for a server about to be started on it.
///
/// Why not `bind(127.0.0.1:0)`: the kernel hands that port out of its ephemeral range, the same
/// range it gives every outgoing connection, so a Redis client or gRPC channel opened meanwhile
/// may take the port before the server binds it ("Address already in use"). So the port is
/// picked at random below the ephemeral range (`net.ipv4.ip_local_port_range`), where only
/// another server can take it; the random pick makes that rare, and callers that start servers
/// retry on a taken port. Falls back to the kernel's choice when there is no room below.
pub fn free_loopback_port() -> std::io::Result<u16> {
    let ephemeral_low = ephemeral_range_low().unwrap_or(32_768);
    if ephemeral_low > LOWEST + 1024 {
        let span = u64::from(ephemeral_low - LOWEST);
        for _ in 0..64 {
            let port = LOWEST + (random_u64() % span) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// True if a server's output says its listening address was taken.
pub fn says_address_in_use(log: &str) -> bool {
    log.contains("Address already in use")
}

fn ephemeral_range_low() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

/// A fresh random number (std's per-process random hash keys, stirred with the clock).
fn random_u64() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_free_and_outside_the_ephemeral_range() {
        let low = ephemeral_range_low().unwrap_or(32_768);
        let ports: Vec<u16> = (0..20).map(|_| free_loopback_port().unwrap()).collect();
        for &port in &ports {
            TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| panic!("port {port} not free: {e}"));
            if low > LOWEST + 1024 {
                assert!((LOWEST..low).contains(&port), "{port} not in {LOWEST}..{low}");
            }
        }
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() > 15, "picks are not random: {ports:?}");
    }

    #[test]
    fn address_in_use_is_recognised_from_redis_and_from_our_binaries() {
        assert!(says_address_in_use("# Warning: Could not create server TCP listening socket 127.0.0.1:20001: bind: Address already in use"));
        assert!(says_address_in_use("Error: --listen 127.0.0.1:20001: cannot bind\n\nCaused by:\n    Address already in use (os error 98)"));
        assert!(!says_address_in_use("Error: connecting to redis"));
    }
}
