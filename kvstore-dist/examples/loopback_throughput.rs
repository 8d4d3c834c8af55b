//! Single-connection loopback throughput of the dist transport.
//!
//! A server on 127.0.0.1 sinks requests (it answers each with an 8-byte acknowledgement); one
//! client connection sends 64 MiB messages and reports goodput in GB/s (10^9 bytes per second),
//! first one request at a time, then with two in flight (the sender writes the next message
//! while the server still reads the previous one).
//!
//! ```text
//! cargo run --release -p kvstore-dist --example loopback_throughput [-- MESSAGES [SIZE_MIB]]
//! ```

use std::time::{Duration, Instant};

use kvstore_dist::transport::{Connection, Outgoing, Request, Responder, Server, TransportConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let messages: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);
    let size_mib: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);
    let size = size_mib << 20;

    let config = TransportConfig {
        timeout: Duration::from_secs(60),
        ..TransportConfig::default()
    };
    let server = Server::bind(
        "127.0.0.1:0",
        config.clone(),
        |req: Request, resp: Responder| {
            let ack = (req.payload.len() as u64).to_le_bytes();
            let _ = resp.respond(Outgoing::new(0, &ack).key(req.header.key));
        },
    )?;
    let conn = Connection::connect(server.local_addr(), config)?;
    // Touch every page so the measurement does not include first-touch page faults.
    let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();

    // Warm-up: the server's receive pool fills, the TCP windows grow.
    for k in 0..4 {
        conn.request(Outgoing::new(1, &payload).key(k), "warm-up")?;
    }

    let start = Instant::now();
    for k in 0..messages as u64 {
        let resp = conn.request(Outgoing::new(1, &payload).key(k), "push")?;
        assert_eq!(resp.payload.len(), 8);
    }
    let serial = start.elapsed();

    let start = Instant::now();
    let mut in_flight = std::collections::VecDeque::new();
    for k in 0..messages as u64 {
        in_flight.push_back(conn.send(Outgoing::new(1, &payload).key(k), "push")?);
        if in_flight.len() == 2 {
            if let Some(p) = in_flight.pop_front() {
                p.wait()?;
            }
        }
    }
    for p in in_flight {
        p.wait()?;
    }
    let pipelined = start.elapsed();

    let bytes = (messages * size) as f64;
    println!(
        "loopback, one connection, {messages} messages of {size_mib} MiB ({:.2} GiB):",
        bytes / (1u64 << 30) as f64
    );
    println!(
        "  one request at a time: {:.2} GB/s ({:.1} ms per message)",
        bytes / serial.as_secs_f64() / 1e9,
        serial.as_secs_f64() * 1e3 / messages as f64
    );
    println!(
        "  two requests in flight: {:.2} GB/s ({:.1} ms per message)",
        bytes / pipelined.as_secs_f64() / 1e9,
        pipelined.as_secs_f64() * 1e3 / messages as f64
    );
    Ok(())
}
