//! The simulated GPU fleet: `n` `cubegate-bench backend` processes (vLLM flavour, one
//! thread each), each with its batch slots, prefix cache and control listener, started
//! fresh for every measurement (empty caches, zeroed counters) and stopped with it.
//!
//! The control listener (`GET /stats`, `PUT /fault/MODE`) is spoken to with a blocking
//! one-request client: it is its own thread in the simulator, answered whatever the main
//! port is doing.

use crate::compare::systems::{free_port, Proc};
use crate::compare::wait_listening;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// How every simulated host is set up.
#[derive(Debug, Clone)]
pub struct HostSpec {
    pub slots: usize,
    pub cache_tokens: usize,
    pub prefill_us_per_token: u64,
    pub token_delay_us: u64,
    pub output_tokens: usize,
}

/// One host: where it listens and its process (None once killed).
pub struct SimHost {
    pub addr: SocketAddr,
    pub control: SocketAddr,
    proc: Option<Proc>,
    /// What the host had counted when it was last killed (its counters start from zero
    /// when it is started again).
    pub counted_before_kill: HostStats,
}

pub struct Fleet {
    pub hosts: Vec<SimHost>,
    bin: PathBuf,
    dir: PathBuf,
    spec: HostSpec,
}

/// A host's counters (`GET /stats`), the ones the report uses.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostStats {
    /// Streams that ran on the host: completed, given up by their client, or cut.
    pub streams: u64,
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    /// Generations that waited ≥ 100 ms for a slot, and those whose prefill took ≥ 100 ms.
    pub slow_queue_waits: u64,
    pub slow_prefills: u64,
}

impl HostStats {
    pub fn parse(json: &str) -> Option<HostStats> {
        let v: serde_json::Value = serde_json::from_str(json).ok()?;
        let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64);
        Some(HostStats {
            streams: n("streams_completed")? + n("streams_aborted")? + n("streams_died")?,
            prefix_queries: n("prefix_cache_queries")?,
            prefix_hits: n("prefix_cache_hits")?,
            slow_queue_waits: n("queue_waits_over_100ms")?,
            slow_prefills: n("prefills_over_100ms")?,
        })
    }

    /// What happened between `self` and `later`.
    pub fn delta(self, later: HostStats) -> HostStats {
        HostStats {
            streams: later.streams.saturating_sub(self.streams),
            prefix_queries: later.prefix_queries.saturating_sub(self.prefix_queries),
            prefix_hits: later.prefix_hits.saturating_sub(self.prefix_hits),
            slow_queue_waits: later.slow_queue_waits.saturating_sub(self.slow_queue_waits),
            slow_prefills: later.slow_prefills.saturating_sub(self.slow_prefills),
        }
    }

    pub fn plus(self, o: HostStats) -> HostStats {
        HostStats {
            streams: self.streams + o.streams,
            prefix_queries: self.prefix_queries + o.prefix_queries,
            prefix_hits: self.prefix_hits + o.prefix_hits,
            slow_queue_waits: self.slow_queue_waits + o.slow_queue_waits,
            slow_prefills: self.slow_prefills + o.slow_prefills,
        }
    }
}

/// One request to a control listener; the answer's status and body.
pub fn control(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String), String> {
    let limit = Duration::from_secs(3);
    let mut s = TcpStream::connect_timeout(&addr, limit).map_err(|e| format!("{addr}: {e}"))?;
    let _ = s.set_read_timeout(Some(limit));
    let _ = s.set_write_timeout(Some(limit));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{addr}: {e}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| format!("{addr}: {e}"))?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr}: not an HTTP answer"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// Every host's counters now (None for a host that does not answer: killed).
pub fn snapshot(controls: &[SocketAddr]) -> Vec<Option<HostStats>> {
    controls
        .iter()
        .map(|&c| match control(c, "GET", "/stats") {
            Ok((200, body)) => HostStats::parse(&body),
            _ => None,
        })
        .collect()
}

impl Fleet {
    /// Starts `n` hosts and waits until each listens.
    pub fn start(bin: &Path, dir: &Path, n: usize, spec: &HostSpec) -> Result<Fleet, String> {
        let mut fleet = Fleet {
            hosts: Vec::with_capacity(n),
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            spec: spec.clone(),
        };
        for i in 0..n {
            let port = |what| free_port().map_err(|e| format!("no free port for {what}: {e}"));
            // A port found free can be taken (by one of the load's own client connections)
            // before the host binds it: a host that cannot start gets fresh ports, twice.
            let mut attempt = 0;
            let (addr, control, proc) = loop {
                attempt += 1;
                let addr: SocketAddr = ([127, 0, 0, 1], port("a host")?).into();
                let control: SocketAddr = ([127, 0, 0, 1], port("a control listener")?).into();
                match fleet.spawn(i, addr, control) {
                    Ok(proc) => break (addr, control, proc),
                    Err(e) if attempt >= 3 => return Err(e),
                    Err(_) => {}
                }
            };
            fleet.hosts.push(SimHost {
                addr,
                control,
                proc: Some(proc),
                counted_before_kill: HostStats::default(),
            });
        }
        Ok(fleet)
    }

    fn spawn(&self, i: usize, addr: SocketAddr, control: SocketAddr) -> Result<Proc, String> {
        let s = &self.spec;
        let mut cmd = Command::new(&self.bin);
        cmd.args(["backend", "--flavor", "vllm", "--threads", "1"])
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--control")
            .arg(control.to_string())
            .arg("--slots")
            .arg(s.slots.to_string())
            .arg("--prefix-cache-tokens")
            .arg(s.cache_tokens.to_string())
            .arg("--prefill-us-per-token")
            .arg(s.prefill_us_per_token.to_string())
            .arg("--token-delay-us")
            .arg(s.token_delay_us.to_string())
            .arg("--tokens")
            .arg(s.output_tokens.to_string());
        let name = format!("host-{i}");
        let mut p = Proc::spawn(&name, cmd, &self.dir.join(format!("{name}.log")), None)
            .map_err(|e| format!("cannot start {}: {e}", self.bin.display()))?;
        wait_listening(addr, &mut p, Duration::from_secs(10))?;
        wait_listening(control, &mut p, Duration::from_secs(10))?;
        Ok(p)
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.hosts.iter().map(|h| h.addr).collect()
    }

    pub fn controls(&self) -> Vec<SocketAddr> {
        self.hosts.iter().map(|h| h.control).collect()
    }

    /// Switches host `i`'s fault mode (`none`, `hang`, `error`, …).
    pub fn set_fault(&self, i: usize, mode: &str) -> Result<(), String> {
        match control(self.hosts[i].control, "PUT", &format!("/fault/{mode}"))? {
            (200, _) => Ok(()),
            (status, body) => Err(format!("host {i}: PUT /fault/{mode}: {status} {body}")),
        }
    }

    /// Kills host `i`'s process (SIGKILL: its connections are reset, its port closed),
    /// keeping what it had counted.
    pub fn kill(&mut self, i: usize) {
        let h = &mut self.hosts[i];
        if let Some(mut p) = h.proc.take() {
            if let Some(Some(now)) = snapshot(&[h.control]).first() {
                h.counted_before_kill = h.counted_before_kill.plus(*now);
            }
            p.kill();
        }
    }

    /// Starts host `i` again on the same addresses, with an empty cache.
    pub fn restart(&mut self, i: usize) -> Result<(), String> {
        self.kill(i);
        let (addr, control) = (self.hosts[i].addr, self.hosts[i].control);
        self.hosts[i].proc = Some(self.spawn(i, addr, control)?);
        Ok(())
    }
}
