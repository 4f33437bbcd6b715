//! `cubegate_tokens_total{domain,model,kind}`: tokens by domain, model and kind (prompt or
//! completion), for `/metrics`.
//!
//! Summed by the usage writer from the batches it already receives, not on the request
//! path: the data plane pays nothing for these series, and they trail the answers by at
//! most a worker's flush (about a second). Models are open-ended (a pass-through domain
//! serves whatever a client names), so the label set is bounded: a model the domain's
//! hosts serve by name (configured or discovered) has its own series, so do the first
//! [`UNLISTED_PER_DOMAIN`] other models of a domain that used tokens, and the rest of that
//! domain shares `model="_other"`. Domains are the ones requests were authorized for
//! (made-up ids never reach the tally).

use super::tally::{Tally, UsageKey};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Models of one domain that get a series without its hosts listing them.
pub const UNLISTED_PER_DOMAIN: usize = 32;
/// The series of a domain's models past the bound.
pub const OTHER: &str = "_other";

struct Series {
    /// (domain, model) → [prompt, completion].
    tokens: BTreeMap<(String, String), [u64; 2]>,
    /// Series given to models the domain does not list, per domain.
    unlisted: BTreeMap<String, usize>,
}

static SERIES: Mutex<Series> = Mutex::new(Series {
    tokens: BTreeMap::new(),
    unlisted: BTreeMap::new(),
});

/// Adds a worker's batch to the series (the writer calls this for every batch).
/// `listed(domain, model)`: whether a host of the domain serves the model by name.
pub fn count(batch: &[(UsageKey, Tally)], listed: impl Fn(&str, &str) -> bool) {
    let mut series = SERIES.lock().unwrap_or_else(|p| p.into_inner());
    for (key, t) in batch {
        if t.prompt_tokens == 0 && t.completion_tokens == 0 {
            continue;
        }
        let model = series.label(&key.domain, &key.model, &listed);
        let sums = series
            .tokens
            .entry((key.domain.to_string(), model))
            .or_default();
        sums[0] += t.prompt_tokens;
        sums[1] += t.completion_tokens;
    }
}

impl Series {
    /// The `model` label `model` of `domain` is counted under.
    fn label(&mut self, domain: &str, model: &str, listed: impl Fn(&str, &str) -> bool) -> String {
        let pair = (domain.to_string(), model.to_string());
        if self.tokens.contains_key(&pair) || listed(domain, model) {
            return pair.1;
        }
        let unlisted = self.unlisted.entry(pair.0).or_default();
        if *unlisted < UNLISTED_PER_DOMAIN {
            *unlisted += 1;
            return pair.1;
        }
        OTHER.to_string()
    }
}

/// Every series: (domain, model, prompt tokens, completion tokens), in label order.
pub fn each(mut f: impl FnMut(&str, &str, u64, u64)) {
    let series = SERIES.lock().unwrap_or_else(|p| p.into_inner());
    for ((domain, model), [prompt, completion]) in &series.tokens {
        f(domain, model, *prompt, *completion);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(domain: &str, model: &str, prompt: u64, completion: u64) -> (UsageKey, Tally) {
        (
            UsageKey {
                minute: 1,
                domain: domain.into(),
                user: "u".into(),
                key: None,
                model: model.into(),
            },
            Tally {
                requests: 1,
                prompt_tokens: prompt,
                completion_tokens: completion,
                errors: 0,
                counted: 0,
            },
        )
    }

    fn of(domain: &str) -> BTreeMap<String, [u64; 2]> {
        let mut found = BTreeMap::new();
        each(|d, m, p, c| {
            if d == domain {
                found.insert(m.to_string(), [p, c]);
            }
        });
        found
    }

    #[test]
    fn sums_tokens_and_bounds_the_models() {
        let nothing_listed = |_: &str, _: &str| false;
        count(
            &[row("series-a", "m", 3, 4), row("series-a", "m", 1, 1)],
            nothing_listed,
        );
        count(&[row("series-a", "no tokens", 0, 0)], nothing_listed);
        assert_eq!(of("series-a").get("m"), Some(&[4, 5]));
        assert!(!of("series-a").contains_key("no tokens"));
        let many: Vec<_> = (0..UNLISTED_PER_DOMAIN + 5)
            .map(|i| row("series-b", &format!("m{i}"), 1, 0))
            .collect();
        count(&many, nothing_listed);
        let b = of("series-b");
        assert_eq!(b.len(), UNLISTED_PER_DOMAIN + 1);
        assert_eq!(b.get(OTHER), Some(&[5, 0]));
        // A model the domain lists always has its own series.
        count(&[row("series-b", "listed", 2, 2)], |_, m| m == "listed");
        assert_eq!(of("series-b").get("listed"), Some(&[2, 2]));
    }
}
