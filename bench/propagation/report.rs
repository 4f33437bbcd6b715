//! The propagation run's figures: every (change, observing box) sample, summarized as the
//! write's own latency and the propagation's percentiles over all samples, by kind of
//! change and by observing box; as markdown and as `results.json`.

use serde::Serialize;
use std::fmt::Write as _;

/// One observation: how long after change `change`'s write (on box `writer`) answered,
/// box `observer` answered the user's chat request accordingly.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub change: usize,
    pub writer: usize,
    pub observer: usize,
    /// The membership was removed (403 expected), else set again (200).
    pub removal: bool,
    /// The write's own latency, request sent → answer read.
    pub write_ms: f64,
    /// None: not seen within the limit.
    pub propagation_ms: Option<f64>,
    /// Chat requests the observer answered before and with the expected status.
    pub polls: u64,
    /// Answers that were neither the old nor the new state (e.g. 401, 502).
    pub unexpected: u64,
    /// Requests that got no answer (connection errors).
    pub errors: u64,
}

/// Percentiles of one set of durations, in ms.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Stats {
        let mut v: Vec<f64> = values.into_iter().collect();
        if v.is_empty() {
            return Stats::default();
        }
        v.sort_by(f64::total_cmp);
        // Nearest rank: the smallest value with at least p of the samples at or below it.
        let at = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Stats {
            n: v.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: v[v.len() - 1],
        }
    }
}

/// A row of the propagation table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub what: String,
    pub samples: usize,
    pub stats: Stats,
    pub timeouts: usize,
    /// In force by the first poll (the first answer after the write's was already right).
    pub first_poll: usize,
}

impl Row {
    fn of<'a>(what: String, samples: impl Iterator<Item = &'a Sample>) -> Row {
        let samples: Vec<&Sample> = samples.collect();
        Row {
            what,
            samples: samples.len(),
            stats: Stats::of(samples.iter().filter_map(|s| s.propagation_ms)),
            timeouts: samples
                .iter()
                .filter(|s| s.propagation_ms.is_none())
                .count(),
            first_poll: samples
                .iter()
                .filter(|s| s.propagation_ms.is_some() && s.polls == 1)
                .count(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub date: String,
    pub commit: Option<String>,
    pub machine: String,
    pub cubegate: String,
    pub postgres: String,
    pub boxes: usize,
    pub changes: usize,
    pub timeout_s: f64,
    /// The writes: all, removals, re-addings (each write counted once).
    pub write: Vec<(String, Stats)>,
    /// All samples, after a removal, after re-adding, then one row per observing box.
    pub propagation: Vec<Row>,
    /// `cubegate_store_changes_applied_total` gained by each box during the changes.
    pub applied: Vec<Option<u64>>,
    pub samples: Vec<Sample>,
}

impl Report {
    /// Summarizes `samples` (the rest of the fields as given).
    pub fn summarize(mut self) -> Report {
        let s = &self.samples;
        // One sample per (change, observer): the write's figure once per change.
        let writes = |removal: Option<bool>| {
            Stats::of(
                s.iter()
                    .filter(|x| x.observer == (x.writer + 1) % self.boxes)
                    .filter(|x| removal.is_none_or(|r| x.removal == r))
                    .map(|x| x.write_ms),
            )
        };
        self.write = vec![
            ("all".into(), writes(None)),
            ("DELETE (removal)".into(), writes(Some(true))),
            ("PUT (re-adding)".into(), writes(Some(false))),
        ];
        let mut rows = vec![
            Row::of("all".into(), s.iter()),
            Row::of(
                "after a removal (403)".into(),
                s.iter().filter(|x| x.removal),
            ),
            Row::of(
                "after re-adding (200)".into(),
                s.iter().filter(|x| !x.removal),
            ),
        ];
        for b in 0..self.boxes {
            rows.push(Row::of(
                format!("box {b} observing"),
                s.iter().filter(|x| x.observer == b),
            ));
        }
        self.propagation = rows;
        self
    }
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Propagation: {} boxes on one PostgreSQL\n", r.boxes);
    let _ = writeln!(
        s,
        "- {}, commit {}; {}; {}; PostgreSQL {}.",
        r.date,
        r.commit.as_deref().unwrap_or("unknown"),
        r.machine,
        r.cubegate,
        r.postgres
    );
    let _ = writeln!(
        s,
        "- {} membership changes, removal and re-adding in turn, change k written on box k mod {} \
         through its public port; after each write's answer every other box is polled with \
         the user's chat request on one kept-alive connection, as fast as it answers, until \
         it answers 403 (removed) or 200 (re-added), for at most {} s.",
        r.changes, r.boxes, r.timeout_s
    );
    let _ = writeln!(
        s,
        "- Times in ms. Propagation = the write's answer → the other box's first answer \
         in the new state; \"first poll\" = already in force at the first request.\n"
    );
    s.push_str(
        "### The write\n\n| write | n | p50 | p99 | max |\n| --- | ---: | ---: | ---: | ---: |\n",
    );
    for (what, st) in &r.write {
        let _ = writeln!(
            s,
            "| {what} | {} | {} | {} | {} |",
            st.n,
            ms(st.p50),
            ms(st.p99),
            ms(st.max)
        );
    }
    s.push_str(
        "\n### Propagation to the other boxes\n\n\
         | samples of | n | p50 | p90 | p99 | max | timeouts | first poll |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for row in &r.propagation {
        let st = &row.stats;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            row.what,
            row.samples,
            ms(st.p50),
            ms(st.p90),
            ms(st.p99),
            ms(st.max),
            row.timeouts,
            row.first_poll
        );
    }
    let applied: Vec<String> = r
        .applied
        .iter()
        .enumerate()
        .map(|(i, a)| format!("box {i}: {}", a.map_or("?".into(), |v| v.to_string())))
        .collect();
    let unexpected: u64 = r.samples.iter().map(|x| x.unexpected).sum();
    let errors: u64 = r.samples.iter().map(|x| x.errors).sum();
    let polls: u64 = r.samples.iter().map(|x| x.polls).sum();
    // A sample in force at the first poll took one chat round trip: the resolution.
    let floor = Stats::of(
        r.samples
            .iter()
            .filter(|x| x.polls == 1)
            .filter_map(|x| x.propagation_ms),
    );
    let _ = writeln!(
        s,
        "\nResolution: one chat request through a box, {} ms at p50 (the samples in force at \
         the first poll).",
        ms(floor.p50)
    );
    let _ = writeln!(
        s,
        "\nChanges applied from the store during the run (`cubegate_store_changes_applied_total`): \
         {}. Chat requests polled: {polls}; answers in neither state: {unexpected}; \
         requests without an answer: {errors}.",
        applied.join(", ")
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(change: usize, writer: usize, observer: usize, took: Option<f64>) -> Sample {
        Sample {
            change,
            writer,
            observer,
            removal: change % 2 == 0,
            write_ms: change as f64,
            propagation_ms: took,
            polls: if took == Some(0.5) { 1 } else { 3 },
            unexpected: 0,
            errors: 0,
        }
    }

    #[test]
    fn nearest_rank_percentiles() {
        let st = Stats::of((1..=100).map(f64::from));
        assert_eq!(
            (st.n, st.p50, st.p90, st.p99, st.max),
            (100, 50.0, 90.0, 99.0, 100.0)
        );
        let one = Stats::of([7.0]);
        assert_eq!((one.p50, one.p99, one.max), (7.0, 7.0, 7.0));
        assert_eq!(Stats::of([]).n, 0);
    }

    #[test]
    fn writes_count_once_and_timeouts_apart() {
        // Three boxes, two changes: each change observed by the two other boxes.
        let samples = vec![
            sample(0, 0, 1, Some(0.5)),
            sample(0, 0, 2, None),
            sample(1, 1, 0, Some(2.0)),
            sample(1, 1, 2, Some(4.0)),
        ];
        let r = Report {
            date: String::new(),
            commit: None,
            machine: String::new(),
            cubegate: String::new(),
            postgres: String::new(),
            boxes: 3,
            changes: 2,
            timeout_s: 5.0,
            write: Vec::new(),
            propagation: Vec::new(),
            applied: vec![Some(2); 3],
            samples,
        }
        .summarize();
        assert_eq!(r.write[0].1.n, 2, "one write per change");
        let all = &r.propagation[0];
        assert_eq!((all.samples, all.timeouts, all.first_poll), (4, 1, 1));
        assert_eq!((all.stats.n, all.stats.max), (3, 4.0));
        let box2 = r
            .propagation
            .iter()
            .find(|x| x.what == "box 2 observing")
            .unwrap();
        assert_eq!((box2.samples, box2.timeouts), (2, 1));
        assert!(markdown(&r).contains("| all | 4 |"));
    }
}
