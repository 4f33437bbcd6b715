//! SIGUSR2: hand the listening sockets to a new cubegate process, then drain.
//!
//! This is how the binary is upgraded (or the process restarted) with no refused
//! connection and no cut stream: the old process starts the binary now installed at its
//! path, passing every listening socket (public and management) the way systemd does, and
//! waits until the new process says, through a pipe, that all its workers listen. Only
//! then does the old one stop accepting and drain its in-flight streams. Until the new
//! process is ready, nothing changes: if it fails to start, the old one keeps serving.
//!
//! The management API is paused (its in-flight requests finished) before the new process
//! reads the store, so no write can land in the old process after the new one loaded its
//! state; it resumes if the hand-over fails. Under systemd the old process then names the
//! new one the service's main process (`MAINPID=`), so supervision, the watchdog and
//! `systemctl reload` follow it.

use command_fds::{CommandFdExt, FdMapping};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::listeners::{FIRST_FD, MANAGEMENT_NAME, PROXY_NAME};

/// How long the new process may take to listen (it opens the store and binds nothing).
const READY_WITHIN: Duration = Duration::from_secs(60);
const READY_LINE: &[u8] = b"ready\n";

/// The binary to start: the one at this process's path now (after a package upgrade the
/// running image shows as "… (deleted)"; the new file sits at the same path).
fn binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let text = exe.to_string_lossy();
    Ok(match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => exe,
    })
}

/// Starts the new process with the sockets and waits until it listens, calling `tick`
/// as it waits (the caller feeds systemd's watchdog). Returns it.
pub fn spawn_successor(
    config_path: &Path,
    proxy: &[TcpListener],
    management: &TcpListener,
    tick: &dyn Fn(),
) -> Result<Child, String> {
    let exe = binary()?;
    let (mut ready_rx, ready_tx) =
        UnixStream::pair().map_err(|e| format!("readiness channel: {e}"))?;
    let mut mappings = Vec::with_capacity(proxy.len() + 2);
    let mut names = Vec::with_capacity(proxy.len() + 1);
    let dup = |l: &TcpListener| -> Result<OwnedFd, String> {
        l.try_clone()
            .map(OwnedFd::from)
            .map_err(|e| format!("cannot pass a socket: {e}"))
    };
    for (i, l) in proxy.iter().enumerate() {
        mappings.push(FdMapping {
            parent_fd: dup(l)?,
            child_fd: FIRST_FD + i as RawFd,
        });
        names.push(PROXY_NAME);
    }
    mappings.push(FdMapping {
        parent_fd: dup(management)?,
        child_fd: FIRST_FD + proxy.len() as RawFd,
    });
    names.push(MANAGEMENT_NAME);
    let ready_fd = FIRST_FD + names.len() as RawFd;
    mappings.push(FdMapping {
        parent_fd: OwnedFd::from(ready_tx),
        child_fd: ready_fd,
    });
    let mut command = Command::new(&exe);
    command
        .arg("serve")
        .arg("--config")
        .arg(config_path)
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .env("CUBEGATE_LISTEN_FDS", names.len().to_string())
        .env("CUBEGATE_LISTEN_FDNAMES", names.join(":"))
        .env("CUBEGATE_READY_FD", ready_fd.to_string());
    command
        .fd_mappings(mappings)
        .map_err(|e| format!("cannot pass the sockets: {e}"))?;
    let first_unpassed = ready_fd + 1;
    // Nothing else may cross into the new process: client sockets accepted by io_uring
    // carry no close-on-exec flag, and a connection the new process held by accident
    // would never see its FIN when this process closes it.
    // SAFETY: runs in the forked child before exec, after command-fds has put the passed
    // descriptors in place; it only makes raw syscalls (close_range, getrlimit, fcntl),
    // which are async-signal-safe, and touches no memory but its own stack.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(move || {
            mark_cloexec_from(first_unpassed);
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    // The command holds this process's copies of the passed descriptors (the child's end
    // of the channel among them): dropping it closes them, so the channel reads EOF once
    // the child exits.
    drop(command);
    let pid = child.id();

    match wait_ready(&mut ready_rx, &mut child, tick) {
        Ok(()) => {
            tracing::info!(pid, binary = %exe.display(), "hand-over: the new process is listening");
            Ok(child)
        }
        Err(why) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("the new process (pid {pid}) failed: {why}"))
        }
    }
}

/// Reads the child's "ready" line in short slices, so the deadline holds. Any other
/// outcome (EOF: the child exited or closed the channel; other bytes; time) is a failure.
fn wait_ready(channel: &mut UnixStream, child: &mut Child, tick: &dyn Fn()) -> Result<(), String> {
    use std::io::ErrorKind::{Interrupted, TimedOut, WouldBlock};
    let deadline = Instant::now() + READY_WITHIN;
    let _ = channel.set_read_timeout(Some(Duration::from_millis(100)));
    let mut line = Vec::with_capacity(READY_LINE.len());
    let mut byte = [0u8; 1];
    while line.len() < READY_LINE.len() {
        if Instant::now() >= deadline {
            return Err(format!(
                "it did not listen within {}s",
                READY_WITHIN.as_secs()
            ));
        }
        tick();
        match channel.read(&mut byte) {
            Ok(0) => return Err(exit_reason(child)),
            Ok(_) => line.push(byte[0]),
            Err(e) if matches!(e.kind(), WouldBlock | TimedOut | Interrupted) => {}
            Err(e) => return Err(format!("readiness channel: {e}")),
        }
    }
    if line == READY_LINE {
        Ok(())
    } else {
        Err("it sent something other than \"ready\"".into())
    }
}

/// Sets close-on-exec on every descriptor from `first` up. In a forked child only.
fn mark_cloexec_from(first: RawFd) {
    // SAFETY (all three calls): plain syscalls on integers and a stack struct.
    let done = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    } == 0;
    if done {
        return;
    }
    // Kernels before 5.11: one fcntl per possible descriptor (EBADF for unused ones).
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let top = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur.min(1 << 20) as RawFd
    } else {
        1 << 16
    };
    for fd in first..top {
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

fn exit_reason(child: &mut Child) -> String {
    for _ in 0..20 {
        if let Ok(Some(status)) = child.try_wait() {
            return format!("it exited ({status}); its log says why");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    "it closed its readiness pipe without saying ready".into()
}

/// In the new process: the channel to tell the old one "ready", if this is a hand-over.
/// `listeners` = how many listening sockets were passed before it.
pub fn ready_pipe(listeners: usize) -> Result<Option<std::fs::File>, String> {
    let Ok(value) = std::env::var("CUBEGATE_READY_FD") else {
        return Ok(None);
    };
    let fd: RawFd = value
        .parse()
        .ok()
        .filter(|fd| *fd >= FIRST_FD + listeners as RawFd)
        .filter(|fd| crate::listeners::is_open_socket(*fd))
        .ok_or_else(|| {
            format!("CUBEGATE_READY_FD={value:?} is not an open socket past the listeners")
        })?;
    // SAFETY: the previous process passed this descriptor (its end of a socket pair) for
    // this process alone; it is open (checked above), was open when this process started
    // (so no descriptor this process opened has its number), lies past the listening
    // sockets (so `take_inherited` did not wrap it), and is wrapped exactly once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(Some(std::fs::File::from(owned)))
}

/// In the new process: every worker listens; the old process may drain now.
pub fn say_ready(mut pipe: std::fs::File) {
    if let Err(e) = pipe.write_all(READY_LINE) {
        tracing::error!("hand-over: cannot tell the previous process that this one is ready: {e}");
    }
}
