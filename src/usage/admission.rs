//! Admitting one request against every limit that applies to it, and what the client is
//! told about them.
//!
//! Up to three scopes apply (the domain, the member, the API key). Each is checked in turn
//! (concurrency, requests per minute, tokens per minute, tokens per day); a refusal rolls
//! back what the request already took, so a refused request costs no one quota. The
//! admitted request holds an [`Admission`]: it reports the `x-ratelimit-*` figures,
//! settles the token reservation to the real count, and leaves the concurrency count when
//! dropped. Use is counted as [`Fleet`] says (this box's, plus the other boxes' while Redis
//! answers); the figures report the limit as configured and what remains of it for this
//! box (of its share, while Redis does not answer).

use super::fleet::view::Fleet;
use super::limiter::{Clock, Counters};
use super::limits::Limits;
use std::fmt;
use std::sync::Arc;

/// Which scope a limit belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeKind {
    Domain,
    Member,
    Key,
}

impl ScopeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeKind::Domain => "domain",
            ScopeKind::Member => "member",
            ScopeKind::Key => "key",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            ScopeKind::Domain => "this domain",
            ScopeKind::Member => "you in this domain",
            ScopeKind::Key => "this API key",
        }
    }
}

/// Which of the four limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    RequestsPerMinute,
    TokensPerMinute,
    TokensPerDay,
    Concurrent,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::RequestsPerMinute => "requests_per_minute",
            LimitKind::TokensPerMinute => "tokens_per_minute",
            LimitKind::TokensPerDay => "tokens_per_day",
            LimitKind::Concurrent => "concurrent",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            LimitKind::RequestsPerMinute => "requests per minute",
            LimitKind::TokensPerMinute => "tokens per minute",
            LimitKind::TokensPerDay => "tokens per day",
            LimitKind::Concurrent => "concurrent requests",
        }
    }
}

/// A scope's limits and counters, as they apply to one request.
pub struct Applied {
    pub scope: ScopeKind,
    pub limits: Limits,
    pub counters: Arc<Counters>,
}

/// OpenAI's `x-ratelimit-*` figures for one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateHeaders {
    /// (limit, remaining, seconds to reset) of requests.
    pub requests: Option<(u32, u32, u32)>,
    /// (limit, remaining, seconds to reset) of tokens (per minute, else per day).
    pub tokens: Option<(u32, u32, u32)>,
}

impl RateHeaders {
    /// The header lines (each ending in CRLF), appended to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        for (name, value) in self.pairs() {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The headers as (name, value).
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for (names, figures) in [
            (
                [
                    "x-ratelimit-limit-requests",
                    "x-ratelimit-remaining-requests",
                    "x-ratelimit-reset-requests",
                ],
                self.requests,
            ),
            (
                [
                    "x-ratelimit-limit-tokens",
                    "x-ratelimit-remaining-tokens",
                    "x-ratelimit-reset-tokens",
                ],
                self.tokens,
            ),
        ] {
            if let Some((limit, remaining, reset)) = figures {
                out.push((names[0], limit.to_string()));
                out.push((names[1], remaining.to_string()));
                out.push((names[2], format!("{reset}s")));
            }
        }
        out
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub scope: ScopeKind,
    pub kind: LimitKind,
    pub limit: u32,
    /// Seconds until the limit lets a request through again (at least 1).
    pub retry_after_s: u32,
    pub headers: RateHeaders,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rate limit reached for {}: {} {} ({}); ",
            self.scope.describe(),
            self.limit,
            self.kind.unit(),
            self.kind.as_str()
        )?;
        match self.kind {
            LimitKind::Concurrent => write!(f, "retry when one of them has finished"),
            _ => write!(f, "it resets in {} s", self.retry_after_s),
        }
    }
}

/// An admitted request's hold on its limits.
pub struct Admission {
    applied: Vec<Applied>,
    clock: Clock,
    reserved: u32,
    headers: RateHeaders,
}

/// What one scope took so far (for a rollback).
#[derive(Default, Clone, Copy)]
struct Taken {
    entered: bool,
    request: bool,
    minute_tokens: bool,
    day_tokens: bool,
}

/// Admits a request reserving `reserve` tokens against every scope in `applied`.
pub fn admit(
    applied: Vec<Applied>,
    clock: Clock,
    fleet: Fleet,
    reserve: u32,
) -> Result<Admission, Refusal> {
    let mut taken = [Taken::default(); 3];
    let mut headers = RateHeaders::default();
    for (i, a) in applied.iter().enumerate() {
        let (l, c) = (&a.limits, &a.counters);
        let refuse = |kind, limit, retry_after_s| Refusal {
            scope: a.scope,
            kind,
            limit,
            retry_after_s,
            headers: RateHeaders::default(),
        };
        let step = (|| {
            if l.concurrent > 0 {
                if !c.enter(l.concurrent, fleet) {
                    return Err(refuse(LimitKind::Concurrent, l.concurrent, 1));
                }
                taken[i].entered = true;
            }
            if l.requests_per_minute > 0 {
                let lim = l.requests_per_minute;
                let used = c
                    .requests_per_minute
                    .take(clock.minute, 1, lim, fleet)
                    .map_err(|()| refuse(LimitKind::RequestsPerMinute, lim, clock.minute_left_s))?;
                taken[i].request = true;
                fewest(&mut headers.requests, lim, fleet, used, clock.minute_left_s);
            }
            if l.tokens_per_minute > 0 {
                let lim = l.tokens_per_minute;
                let used = c
                    .tokens_per_minute
                    .take(clock.minute, reserve, lim, fleet)
                    .map_err(|()| refuse(LimitKind::TokensPerMinute, lim, clock.minute_left_s))?;
                taken[i].minute_tokens = true;
                fewest(&mut headers.tokens, lim, fleet, used, clock.minute_left_s);
            }
            if l.tokens_per_day > 0 {
                let lim = l.tokens_per_day;
                c.tokens_per_day
                    .take(clock.day, reserve, lim, fleet)
                    .map_err(|()| refuse(LimitKind::TokensPerDay, lim, clock.day_left_s))?;
                taken[i].day_tokens = true;
            }
            Ok(())
        })();
        if let Err(mut refusal) = step {
            roll_back(&applied, &taken, clock, reserve);
            refusal.headers = figures_now(&applied, clock, fleet);
            return Err(refusal);
        }
    }
    if headers.tokens.is_none() {
        // No per-minute token limit: report the daily one, if any.
        for a in &applied {
            if a.limits.tokens_per_day > 0 {
                let used = a.counters.tokens_per_day.counted(clock.day, fleet);
                fewest(
                    &mut headers.tokens,
                    a.limits.tokens_per_day,
                    fleet,
                    used,
                    clock.day_left_s,
                );
            }
        }
    }
    Ok(Admission {
        applied,
        clock,
        reserved: reserve,
        headers,
    })
}

/// Keeps the figures of the scope with the fewest remaining (of what `fleet` lets this box
/// use of `limit`).
fn fewest(slot: &mut Option<(u32, u32, u32)>, limit: u32, fleet: Fleet, used: u32, reset: u32) {
    let remaining = fleet.limit(limit).saturating_sub(used);
    if slot.is_none_or(|(_, r, _)| remaining < r) {
        *slot = Some((limit, remaining, reset));
    }
}

fn roll_back(applied: &[Applied], taken: &[Taken; 3], clock: Clock, reserve: u32) {
    for (a, t) in applied.iter().zip(taken) {
        let c = &a.counters;
        if t.entered {
            c.leave();
        }
        if t.request {
            c.requests_per_minute.adjust(clock.minute, -1);
        }
        if t.minute_tokens {
            c.tokens_per_minute
                .adjust(clock.minute, -i64::from(reserve));
        }
        if t.day_tokens {
            c.tokens_per_day.adjust(clock.day, -i64::from(reserve));
        }
    }
}

/// The figures as they stand (for a refused request's answer).
fn figures_now(applied: &[Applied], clock: Clock, fleet: Fleet) -> RateHeaders {
    let mut h = RateHeaders::default();
    for a in applied {
        let (l, c) = (&a.limits, &a.counters);
        for (limit, window, slot) in [
            (
                l.requests_per_minute,
                &c.requests_per_minute,
                &mut h.requests,
            ),
            (l.tokens_per_minute, &c.tokens_per_minute, &mut h.tokens),
        ] {
            if limit > 0 {
                let used = window.counted(clock.minute, fleet);
                fewest(slot, limit, fleet, used, clock.minute_left_s);
            }
        }
    }
    h
}

impl Admission {
    pub fn headers(&self) -> &RateHeaders {
        &self.headers
    }

    /// The answer used `tokens` in all: the reservation becomes that.
    pub fn settle(&mut self, tokens: u64) {
        let delta = tokens.min(i64::MAX as u64) as i64 - i64::from(self.reserved);
        for a in &self.applied {
            if a.limits.tokens_per_minute > 0 {
                a.counters
                    .tokens_per_minute
                    .adjust(self.clock.minute, delta);
            }
            if a.limits.tokens_per_day > 0 {
                a.counters.tokens_per_day.adjust(self.clock.day, delta);
            }
        }
        self.reserved = tokens.min(u64::from(u32::MAX)) as u32;
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        for a in &self.applied {
            if a.limits.concurrent > 0 {
                a.counters.leave();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(scope: ScopeKind, limits: Limits, c: &Arc<Counters>) -> Applied {
        Applied {
            scope,
            limits,
            counters: c.clone(),
        }
    }

    #[test]
    fn a_refusal_in_one_scope_rolls_back_the_others() {
        let (dom, key) = (Arc::new(Counters::default()), Arc::new(Counters::default()));
        let dl = Limits {
            requests_per_minute: 10,
            tokens_per_minute: 1000,
            concurrent: 5,
            ..Limits::default()
        };
        let kl = Limits {
            requests_per_minute: 1,
            ..Limits::default()
        };
        let clock = Clock::at(600);
        let scopes = || {
            vec![
                applied(ScopeKind::Domain, dl, &dom),
                applied(ScopeKind::Key, kl, &key),
            ]
        };
        let first = admit(scopes(), clock, Fleet::Alone, 100).unwrap();
        assert_eq!(first.headers().requests, Some((1, 0, 60)));
        assert_eq!(first.headers().tokens, Some((1000, 900, 60)));
        let refused = admit(scopes(), clock, Fleet::Alone, 100).err().unwrap();
        assert_eq!(
            (refused.scope, refused.kind),
            (ScopeKind::Key, LimitKind::RequestsPerMinute)
        );
        assert_eq!(refused.retry_after_s, 60);
        assert!(
            refused.to_string().contains("1 requests per minute"),
            "{refused}"
        );
        // The domain's request, tokens and concurrency were given back.
        assert_eq!(dom.requests_per_minute.used(clock.minute), 1);
        assert_eq!(dom.tokens_per_minute.used(clock.minute), 100);
        assert_eq!(dom.in_flight.load(std::sync::atomic::Ordering::Relaxed), 1);
        drop(first);
        assert_eq!(dom.in_flight.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[test]
    fn settling_replaces_the_reservation() {
        let c = Arc::new(Counters::default());
        let l = Limits {
            tokens_per_minute: 1000,
            tokens_per_day: 5000,
            ..Limits::default()
        };
        let clock = Clock::at(3600);
        let mut a = admit(
            vec![applied(ScopeKind::Member, l, &c)],
            clock,
            Fleet::Alone,
            800,
        )
        .unwrap();
        a.settle(30);
        assert_eq!(c.tokens_per_minute.used(clock.minute), 30);
        assert_eq!(c.tokens_per_day.used(clock.day), 30);
        let mut h = Vec::new();
        a.headers().write(&mut h);
        assert_eq!(
            String::from_utf8(h).unwrap(),
            "x-ratelimit-limit-tokens: 1000\r\nx-ratelimit-remaining-tokens: 200\r\nx-ratelimit-reset-tokens: 60s\r\n"
        );
    }

    #[test]
    fn the_figures_count_the_fleet_and_the_share() {
        let c = Arc::new(Counters::default());
        let l = Limits {
            requests_per_minute: 60,
            ..Limits::default()
        };
        let clock = Clock::at(600);
        c.requests_per_minute.set_others(clock.minute, 50);
        let scope = || vec![applied(ScopeKind::Domain, l, &c)];
        let shared = admit(scope(), clock, Fleet::Shared, 0).unwrap();
        assert_eq!(shared.headers().requests, Some((60, 9, 60)));
        // Cut off from 3 boxes: this box's 20, of which it has now used 2.
        let cut = admit(scope(), clock, Fleet::Cut { boxes: 3 }, 0).unwrap();
        assert_eq!(cut.headers().requests, Some((60, 18, 60)));
    }
}
