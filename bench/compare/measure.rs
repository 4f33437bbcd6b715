//! What a process costs, read from /proc: CPU seconds (`utime + stime` of
//! `/proc/<pid>/stat`, in clock ticks) and peak resident memory (`VmHWM` of
//! `/proc/<pid>/status`). A system may be several processes (nginx: a master and its
//! workers), so both are summed over the process tree under the one compare started.
//! Reading /proc rather than timing the machine keeps the figure honest when the machine
//! is shared: only the proxy's own work is counted.

use std::collections::HashMap;
use std::fs;

/// The fields of `/proc/<pid>/stat` compare needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub ppid: i32,
    /// User-mode CPU time, clock ticks.
    pub utime: u64,
    /// Kernel-mode CPU time, clock ticks.
    pub stime: u64,
}

/// Parses the text of `/proc/<pid>/stat`. The command name (field 2) is in parentheses
/// and may itself hold spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let close = text.rfind(')')?;
    // Fields 3.. (state, ppid, pgrp, session, tty_nr, tpgid, flags, minflt, cminflt,
    // majflt, cmajflt, utime, stime, ...).
    let rest: Vec<&str> = text[close + 1..].split_ascii_whitespace().collect();
    if rest.len() < 13 {
        return None;
    }
    Some(Stat {
        ppid: rest[1].parse().ok()?,
        utime: rest[11].parse().ok()?,
        stime: rest[12].parse().ok()?,
    })
}

/// `VmHWM` (peak resident set size) from the text of `/proc/<pid>/status`, in KiB.
pub fn parse_vm_hwm_kib(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix("VmHWM:")?;
        let mut it = v.split_ascii_whitespace();
        let n: u64 = it.next()?.parse().ok()?;
        match it.next() {
            Some("kB") | None => Some(n),
            Some(_) => None,
        }
    })
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, nearly always 100).
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

fn stat_of(pid: i32) -> Option<Stat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `root` and every live process descended from it.
pub fn tree(root: i32) -> Vec<i32> {
    let mut parent: HashMap<i32, i32> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Some(s) = stat_of(pid) {
                parent.insert(pid, s.ppid);
            }
        }
    }
    descendants(root, &parent)
}

/// `root` and its descendants in a pid → parent map (`root` first).
pub fn descendants(root: i32, parent: &HashMap<i32, i32>) -> Vec<i32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        let mut kids: Vec<i32> = parent
            .iter()
            .filter(|(pid, pp)| **pp == p && **pid != p)
            .map(|(pid, _)| *pid)
            .collect();
        kids.sort_unstable();
        out.extend(kids);
        i += 1;
        if out.len() > 4096 {
            break;
        }
    }
    out
}

/// CPU seconds used so far by `root`'s process tree (live processes; a reaped child's
/// time is in its parent's cutime, which is not counted: the systems measured keep their
/// workers for the whole run).
pub fn cpu_seconds(root: i32) -> Option<f64> {
    let pids = tree(root);
    let mut ticks = 0u64;
    let mut any = false;
    for pid in pids {
        if let Some(s) = stat_of(pid) {
            ticks += s.utime + s.stime;
            any = true;
        }
    }
    any.then(|| ticks as f64 / clock_ticks() as f64)
}

/// Peak RSS of `root`'s process tree in KiB: the sum of each process's `VmHWM` (shared
/// pages counted once per process, so an upper bound for multi-process systems).
pub fn peak_rss_kib(root: i32) -> Option<u64> {
    let mut sum = 0;
    let mut any = false;
    for pid in tree(root) {
        if let Some(k) = fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .as_deref()
            .and_then(parse_vm_hwm_kib)
        {
            sum += k;
            any = true;
        }
    }
    any.then_some(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_counted_from_the_last_parenthesis() {
        let t = "4242 (nginx: worker (x) y) S 4241 4241 4241 0 -1 4194624 1203 0 0 0 \
                 731 219 0 0 20 0 1 0 123456 12345678 2345 18446744073709551615 1 1 0 0 0 0 0\n";
        let s = parse_stat(t).unwrap();
        assert_eq!(
            s,
            Stat {
                ppid: 4241,
                utime: 731,
                stime: 219
            }
        );
        assert!(parse_stat("12 (short) S 1 2 3").is_none());
        assert!(parse_stat("garbage").is_none());
        assert!(parse_stat("1 (x) S a 1 1 0 -1 0 0 0 0 0 5 6 0").is_none());
    }

    #[test]
    fn own_stat_parses() {
        let s = stat_of(std::process::id() as i32).expect("own stat");
        assert!(s.ppid > 0);
        assert!(cpu_seconds(std::process::id() as i32).is_some());
        assert!(peak_rss_kib(std::process::id() as i32).unwrap() > 0);
    }

    #[test]
    fn vm_hwm() {
        let t = "Name:\tnginx\nVmPeak:\t  20000 kB\nVmHWM:\t    5120 kB\nVmRSS:\t 4000 kB\n";
        assert_eq!(parse_vm_hwm_kib(t), Some(5120));
        assert_eq!(parse_vm_hwm_kib("Name:\tx\n"), None);
        assert_eq!(parse_vm_hwm_kib("VmHWM:\t 12 MB\n"), None);
    }

    #[test]
    fn tree_walk() {
        let m: HashMap<i32, i32> = [(10, 1), (11, 10), (12, 10), (13, 11), (20, 1), (1, 0)]
            .into_iter()
            .collect();
        assert_eq!(descendants(10, &m), vec![10, 11, 12, 13]);
        assert_eq!(descendants(20, &m), vec![20]);
    }
}
