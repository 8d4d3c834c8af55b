//! The warnings a test binary logs, captured: the `log` records of every thread at level
//! `warn` and above, and (once [`record_panics`] ran) every panic of any thread, including
//! those no handler catches and logs (a server's expiry thread, the scheduler's monitor).
#![allow(dead_code)] // each test binary uses its part

use std::sync::{Mutex, OnceLock};

/// The captured lines, in the order they came.
struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            self.0.lock().unwrap().push(record.args().to_string());
        }
    }
    fn flush(&self) {}
}

fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
        log::set_logger(capture).unwrap();
        log::set_max_level(log::LevelFilter::Warn);
        capture
    })
}

/// Starts capturing (idempotent): call it before the code whose warnings count.
pub fn start() {
    capture();
}

/// Also captures every panic, as `a thread panicked: ...` (idempotent).
pub fn record_panics() {
    static HOOK: OnceLock<()> = OnceLock::new();
    HOOK.get_or_init(|| {
        let capture = capture();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(mut seen) = capture.0.lock() {
                seen.push(format!("a thread panicked: {info}"));
            }
            previous(info);
        }));
    });
}

/// The captured lines that contain `needle`.
pub fn lines_with(needle: &str) -> Vec<String> {
    capture()
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|w| w.contains(needle))
        .cloned()
        .collect()
}
