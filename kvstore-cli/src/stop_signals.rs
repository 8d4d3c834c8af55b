//! How a launched job ends with its launcher.
//!
//! - While a job runs, SIGINT, SIGTERM and SIGHUP are caught ([`catch`]) and the launcher's
//!   supervision loop sees them ([`caught`]): it passes the signal on to the job's processes
//!   (their groups, [`signal_group`]), kills what is left a few seconds later, and exits with
//!   128 + the signal's number, as a process killed by it would.
//! - Each process starts in a process group of its own ([`own_process_group`]), which the
//!   launcher kills whole ([`kill_group`]): a worker's own children go with it. Ctrl-C
//!   therefore reaches the launcher alone, which stops the job.
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

/// Starts the process `command` starts in a new process group, led by it (on Unix; nothing
/// elsewhere), so that [`kill_group`] reaches what it starts too.
pub fn own_process_group(command: &mut Command) {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
    }
    #[cfg(not(unix))]
    let _ = command;
}

/// Sends SIGKILL to the process group `child` leads ([`own_process_group`]); call it only
/// while `child` is not reaped, so that its id still names its group. Best effort: a group
/// already gone is not an error.
pub fn kill_group(child: &std::process::Child) {
    #[cfg(unix)]
    signal_group(child, libc::SIGKILL);
    #[cfg(not(unix))]
    let _ = child;
}

/// Sends `signal` to the process group `child` leads (a stopping signal the launcher got,
/// passed on: a Python worker's `KeyboardInterrupt` handlers run, as under a terminal's
/// Ctrl-C). As [`kill_group`], only while `child` is not reaped.
#[cfg(unix)]
pub fn signal_group(child: &std::process::Child, signal: i32) {
    if let Ok(leader) = libc::pid_t::try_from(child.id()) {
        // SAFETY: `kill` takes plain integers; a negative id names a process group.
        unsafe {
            libc::kill(-leader, signal);
        }
    }
}

/// When `child` has exited with a status other than 0 or was killed, and is not reaped yet,
/// sends SIGKILL to its process group ([`own_process_group`]): what it started and left
/// running goes with it (on Linux; nothing elsewhere). The exit is only looked at, not reaped.
pub fn kill_group_if_failed(child: &std::process::Child) {
    #[cfg(target_os = "linux")]
    if let Ok(leader) = libc::pid_t::try_from(child.id()) {
        // SAFETY: `waitid` writes into the zeroed `siginfo_t` given; WNOWAIT leaves the child
        // to be reaped by `Child::try_wait`, so its id still names its group for `kill`.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let peeked = libc::waitid(
                libc::P_PID,
                leader as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            let exited = peeked == 0 && info.si_pid() == leader;
            if exited && (info.si_code != libc::CLD_EXITED || info.si_status() != 0) {
                libc::kill(-leader, libc::SIGKILL);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = child;
}
