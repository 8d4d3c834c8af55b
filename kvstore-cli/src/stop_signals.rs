//! How a launched job ends with its launcher.
//!
//! - While a job runs, SIGINT, SIGTERM and SIGHUP are caught ([`catch`]) and the launcher's
//!   supervision loop sees them ([`caught`]): it kills the job's processes and exits with
//!   128 + the signal's number, as a process killed by it would. (Ctrl-C reaches the whole
//!   process group; `kill <launcher>` or a supervisor's SIGTERM reaches the launcher alone.)
//! - A launcher that dies without that chance (SIGKILL, a crash) takes its processes with it
//!   on Linux: each is started with SIGKILL as its parent-death signal ([`die_with_launcher`]).

use std::io;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

/// The signals that stop a job.
#[cfg(unix)]
const STOPPING: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// The last stopping signal caught (0: none).
static CAUGHT: AtomicI32 = AtomicI32::new(0);

#[cfg(unix)]
extern "C" fn record(signal: libc::c_int) {
    // Async-signal-safe: one atomic store.
    CAUGHT.store(signal, Ordering::SeqCst);
}

/// The stopping signals caught while it lives; their previous handling comes back when it is
/// dropped.
#[derive(Debug)]
pub struct Catching {
    #[cfg(unix)]
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

/// Catches SIGINT, SIGTERM and SIGHUP until the returned guard is dropped (see [`caught`]);
/// a signal the launcher was started ignoring (`nohup`, a background job of a script) stays
/// ignored, by it and by the processes it starts.
///
/// # Errors
/// The operating system refused to install a handler.
pub fn catch() -> io::Result<Catching> {
    CAUGHT.store(0, Ordering::SeqCst);
    #[cfg(unix)]
    {
        let mut previous = Vec::with_capacity(STOPPING.len());
        for signal in STOPPING {
            // SAFETY: `sigaction` structs are plain data, valid zeroed; the handler only
            // stores to an atomic; the old action is written into a local.
            unsafe {
                let mut current: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(signal, std::ptr::null(), &mut current) == 0
                    && current.sa_sigaction == libc::SIG_IGN
                {
                    continue;
                }
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = record as extern "C" fn(libc::c_int) as libc::sighandler_t;
                libc::sigemptyset(&mut action.sa_mask);
                action.sa_flags = libc::SA_RESTART;
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(signal, &action, &mut old) != 0 {
                    let e = io::Error::last_os_error();
                    drop(Catching { previous });
                    return Err(e);
                }
                previous.push((signal, old));
            }
        }
        Ok(Catching { previous })
    }
    #[cfg(not(unix))]
    Ok(Catching {})
}

impl Drop for Catching {
    fn drop(&mut self) {
        #[cfg(unix)]
        for (signal, old) in self.previous.drain(..) {
            // SAFETY: restores an action `sigaction` gave back.
            unsafe {
                libc::sigaction(signal, &old, std::ptr::null_mut());
            }
        }
    }
}

/// The stopping signal caught since [`catch`], if any.
pub fn caught() -> Option<i32> {
    match CAUGHT.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}

/// The name of a stopping signal (`SIGTERM`), else its number.
pub fn name(signal: i32) -> String {
    #[cfg(unix)]
    match signal {
        libc::SIGINT => return "SIGINT".into(),
        libc::SIGTERM => return "SIGTERM".into(),
        libc::SIGHUP => return "SIGHUP".into(),
        _ => {}
    }
    format!("signal {signal}")
}

/// Makes the process `command` starts get SIGKILL should the thread starting it end first
/// (Linux's parent-death signal; nothing elsewhere). Start a job's processes from the thread
/// that lives as long as the job (the launcher's main thread).
pub fn die_with_launcher(command: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let launcher = std::process::id() as libc::pid_t;
        // SAFETY: between fork and exec the closure calls only async-signal-safe functions
        // (prctl, getppid) and allocates nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The launcher may have died before the signal was armed.
                if libc::getppid() != launcher {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}
