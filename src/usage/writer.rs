//! The usage writer: one thread that merges the workers' batches and writes them to the
//! store, so no data-plane worker ever waits on SQLite.
//!
//! Workers send their per-minute sums about once a second ([`super::tally`]); the writer
//! adds them into one map and every `[usage] flush_ms` writes it in one transaction of
//! additive UPSERTs through the management plane's [`Storage`] trait (on a store handle of
//! its own, so the management API's lock is never held for it). A write that fails keeps
//! its sums for the next try. Rows older than `retention_days` are deleted at start and
//! hourly. It also feeds the token series of `/metrics` ([`super::series`]).
//!
//! What a stop can lose: on SIGTERM (and a hand-over) the workers send their last batches
//! once they have drained, then [`UsageWriter::finish`] makes the writer take everything
//! still queued and write it before the process exits (waiting at most 10 s). A kill -9
//! loses what was not yet written: at most the last `flush_ms` of the writer plus the
//! workers' last second.

use super::tally::{unix_minute, Batch, Tally, UsageKey};
use crate::config::UsageConfig;
use crate::mgmt::store::Storage;
use crate::snapshot::{Published, Snapshot};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often old rows are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// How long a clean stop waits for the last write.
const FINISH_LIMIT: Duration = Duration::from_secs(10);
/// Sums kept while the store keeps failing; past it they are dropped (and said so).
const MAX_PENDING: usize = 1_000_000;

/// The running writer: where workers send their batches, and how to stop it.
pub struct UsageWriter {
    to_writer: Sender<Batch>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// Starts the writer thread on `store` (a handle of its own to the management store).
pub fn start(
    store: Box<dyn Storage>,
    config: &UsageConfig,
    published: Arc<Published>,
) -> std::io::Result<UsageWriter> {
    let (to_writer, batches) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = Writer {
        store,
        batches,
        stop: stop.clone(),
        flush: config.flush(),
        retention_minutes: config.retention_days as i64 * 1440,
        published,
        sums: HashMap::new(),
    };
    let thread = std::thread::Builder::new()
        .name("cubegate-usage".into())
        .spawn(move || writer.run())?;
    Ok(UsageWriter {
        to_writer,
        stop,
        thread,
    })
}

impl UsageWriter {
    /// A worker's end of the channel.
    pub fn sender(&self) -> Sender<Batch> {
        self.to_writer.clone()
    }

    /// A clean stop, once every worker has sent its last batch: everything queued is
    /// written before this returns (or `FINISH_LIMIT` passes).
    pub fn finish(self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the writer if it is waiting for a batch.
        let _ = self.to_writer.send(Vec::new());
        let deadline = Instant::now() + FINISH_LIMIT;
        while !self.thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.thread.is_finished() {
            let _ = self.thread.join();
        } else {
            tracing::error!(
                "usage: the last write did not finish within {}s; the last seconds of usage may be lost",
                FINISH_LIMIT.as_secs()
            );
        }
    }
}

struct Writer {
    store: Box<dyn Storage>,
    batches: Receiver<Batch>,
    stop: Arc<AtomicBool>,
    flush: Duration,
    retention_minutes: i64,
    published: Arc<Published>,
    /// What was received and not yet written.
    sums: HashMap<UsageKey, Tally>,
}

impl Writer {
    fn run(mut self) {
        let mut next_flush = Instant::now() + self.flush;
        let mut next_prune = Instant::now();
        loop {
            let now = Instant::now();
            if now >= next_prune {
                self.prune();
                next_prune = now + PRUNE_EVERY;
            }
            let wait = next_flush.min(next_prune).saturating_duration_since(now);
            match self.batches.recv_timeout(wait) {
                Ok(batch) => self.merge(batch),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            if Instant::now() >= next_flush {
                self.write();
                next_flush = Instant::now() + self.flush;
            }
        }
        // Stopping: what is queued was sent before the stop (the workers have ended).
        while let Ok(batch) = self.batches.try_recv() {
            self.merge(batch);
        }
        self.write();
    }

    fn merge(&mut self, batch: Batch) {
        if batch.is_empty() {
            return;
        }
        let snapshot = self.published.load();
        super::series::count(&batch, |domain, model| {
            serves_by_name(&snapshot, domain, model)
        });
        for (key, t) in batch {
            self.sums.entry(key).or_default().add(&t);
        }
    }

    fn write(&mut self) {
        if self.sums.is_empty() {
            return;
        }
        let rows: Batch = self.sums.drain().collect();
        if let Err(e) = self.store.record_usage(&rows) {
            if rows.len() > MAX_PENDING {
                tracing::error!(
                    rows = rows.len(),
                    "usage: cannot write to the store ({e}); too much is waiting, these sums are dropped"
                );
                return;
            }
            tracing::error!(
                rows = rows.len(),
                "usage: cannot write to the store ({e}); keeping the sums for the next try"
            );
            for (key, t) in rows {
                self.sums.entry(key).or_default().add(&t);
            }
        }
    }

    fn prune(&self) {
        let before = unix_minute() - self.retention_minutes;
        match self.store.prune_usage(before) {
            Ok(0) => {}
            Ok(rows) => tracing::info!(rows, "usage: deleted rows past the retention"),
            Err(e) => tracing::error!("usage: cannot delete old rows: {e}"),
        }
    }
}

/// Whether a host of `domain` serves `model` by name (configured or discovered, not `*`).
fn serves_by_name(snapshot: &Snapshot, domain: &str, model: &str) -> bool {
    let Some(domain) = snapshot.domains.get(domain) else {
        return false;
    };
    !model.is_empty()
        && domain
            .backends
            .iter()
            .any(|b| !b.any_model && b.serves(model))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mgmt::store::{UsageGroup, UsageQuery};

    #[test]
    fn merges_batches_and_writes_everything_on_finish() {
        let path = crate::mgmt::sqlite_usage::scratch_db("usage-writer");
        let open = || crate::mgmt::sqlite::Store::open(&path).unwrap();
        // Long flush: only the stop writes.
        let config = UsageConfig {
            enabled: true,
            flush_ms: 60_000,
            retention_days: 1,
        };
        let published = Arc::new(Published::new(Default::default()));
        let writer = start(Box::new(open()), &config, published).unwrap();
        let now = unix_minute();
        let key = |minute: i64, model: &str| UsageKey {
            minute,
            domain: "d".into(),
            user: "u".into(),
            key: None,
            model: model.into(),
        };
        let one = Tally {
            requests: 1,
            completion_tokens: 2,
            ..Tally::default()
        };
        let to_writer = writer.sender();
        for _ in 0..3 {
            to_writer.send(vec![(key(now, "m"), one)]).unwrap();
        }
        // Past the retention (a day): not pruned yet, the prune ran at start.
        to_writer
            .send(vec![(key(now - 3 * 1440, "old"), one)])
            .unwrap();
        writer.finish();
        let rows = open()
            .usage(&UsageQuery {
                from_minute: 0,
                to_minute: now + 1,
                domain: Some("d"),
                user: None,
                group: UsageGroup::Model,
            })
            .unwrap();
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[0].sums.requests, 3);
        assert_eq!(rows[0].sums.completion_tokens, 6);
        // A writer started later prunes at once.
        let writer = start(
            Box::new(open()),
            &config,
            Arc::new(Published::new(Default::default())),
        )
        .unwrap();
        writer.finish();
        let left = open().prune_usage(now - 1440).unwrap();
        assert_eq!(left, 0, "the start's prune removed the old row already");
    }
}
