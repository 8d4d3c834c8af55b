//! A port for a process that binds it later: the scheduler `kvstore launch` starts, or one a
//! test starts.
//!
//! Binding port 0 and releasing it gives a port that is free at that moment, but the system
//! hands the same range (Linux: 32768–60999; macOS and Windows: 49152–65535) to every socket
//! bound to port 0 in the meantime: a node of another job on the machine can take it before the
//! intended process binds it, and that process's peers then talk to the wrong one.
//! [`spare_port`] picks a port below those ranges instead, where no socket bound to port 0 is
//! ever placed.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// The ports [`spare_port`] tries: below every common ephemeral range, above the well-known
/// and most registered service ports.
pub const SPARE_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A TCP port free on `host` now, for a process that binds it a moment later, taken from
/// [`SPARE_PORTS`] (so that no socket bound to port 0 can be given it meanwhile); the
/// system's pick of port 0 when none of a thousand tries there is free.
///
/// # Errors
/// The error of binding `host` when nothing can listen there (not an address of this machine).
///
/// # Example
/// ```
/// let port = kvstore_dist::ports::spare_port("127.0.0.1").unwrap();
/// assert!(kvstore_dist::ports::SPARE_PORTS.contains(&port));
/// ```
pub fn spare_port(host: &str) -> std::io::Result<u16> {
    // Spread concurrent callers (threads and processes) over the range.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let seed = std::process::id().wrapping_mul(2_654_435_761) ^ nanos;
    let span = u32::from(SPARE_PORTS.end - SPARE_PORTS.start);
    for _ in 0..1000 {
        let n = seed.wrapping_add(NEXT.fetch_add(7919, Ordering::Relaxed));
        let port = SPARE_PORTS.start + (n % span) as u16;
        if TcpListener::bind((host, port)).is_ok() {
            return Ok(port);
        }
    }
    TcpListener::bind((host, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spare_ports_are_free_below_the_ephemeral_range_and_differ() {
        let ports: Vec<u16> = (0..20).map(|_| spare_port("127.0.0.1").unwrap()).collect();
        for &port in &ports {
            assert!(SPARE_PORTS.contains(&port), "{port}");
        }
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert!(unique.len() > 15, "{ports:?}");
    }

    #[test]
    fn a_taken_port_is_not_given() {
        let taken: Vec<TcpListener> = (0..50)
            .filter_map(|_| spare_port("127.0.0.1").ok())
            .filter_map(|p| TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        let held: Vec<u16> = taken
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        for _ in 0..50 {
            assert!(!held.contains(&spare_port("127.0.0.1").unwrap()));
        }
    }

    #[test]
    fn a_foreign_host_is_an_error() {
        assert!(spare_port("192.0.2.1").is_err());
    }
}
