//! Pure tests of the load generator: histogram percentiles, the schedule, response heads,
//! and chunked decoding and event splitting fed in every possible split. The socket tests
//! are in `net_tests.rs`.

use super::http::{parse_head, BodyLen, Chunked, EventFormat, EventScanner};
use super::report::{histogram, Percentiles, Recorder};
use super::schedule::{Schedule, Tickets};
use std::time::{Duration, Instant};

#[test]
fn percentiles_of_known_inputs() {
    let mut h = histogram();
    for v in 1..=10_000u64 {
        h.record(v).expect("record");
    }
    let p = Percentiles::of(&h);
    let near = |got: u64, want: u64| (got as f64 - want as f64).abs() <= want as f64 * 0.001 + 1.0;
    assert_eq!(p.count, 10_000);
    assert_eq!(p.min, 1);
    assert!(near(p.p50, 5_000), "{p:?}");
    assert!(near(p.p90, 9_000), "{p:?}");
    assert!(near(p.p99, 9_900), "{p:?}");
    assert!(near(p.p999, 9_990), "{p:?}");
    assert!(near(p.max, 10_000), "{p:?}");
    assert!((p.mean - 5_000.5).abs() < 5.0, "{p:?}");

    // One outlier in a thousand shows at p99.9 and max, not at p99.
    let mut h = histogram();
    for _ in 0..999 {
        h.record(1_000).expect("record");
    }
    h.record(1_000_000).expect("record");
    let p = Percentiles::of(&h);
    assert!(near(p.p50, 1_000) && near(p.p99, 1_000), "{p:?}");
    assert!(near(p.p999, 1_000), "{p:?}");
    assert!(near(p.max, 1_000_000), "{p:?}");

    // Zero (two events in one read) is a value; empty histograms report zeros.
    let mut h = histogram();
    h.record(0).expect("zero");
    assert_eq!(Percentiles::of(&h).max, 0);
    assert_eq!(Percentiles::of(&histogram()).count, 0);
}

#[test]
fn recorders_merge() {
    let (mut a, mut b) = (Recorder::default(), Recorder::default());
    a.gap(Duration::from_micros(10));
    b.gap(Duration::from_micros(30));
    b.gap(Duration::from_micros(50));
    b.sent = 2;
    a.merge(&b);
    assert_eq!(a.gap.len(), 3);
    assert_eq!(a.sent, 2);
    assert!(a.gap.max() >= 50);
}

#[test]
fn open_loop_schedule_spacing() {
    let start = Instant::now();
    let iv = Schedule::interval_for(100.0);
    assert_eq!(iv, Duration::from_millis(10));
    let one = Schedule {
        start,
        interval: Some(iv),
        end: Some(start + Duration::from_millis(55)),
        requests: None,
        stride: 1,
        offset: 0,
    };
    let times: Vec<_> = (0..7).map(|k| one.intended(k, start)).collect();
    for (k, t) in times.iter().enumerate().take(6) {
        assert_eq!(*t, Some(start + iv * k as u32), "request {k}");
    }
    assert_eq!(times[6], None, "60 ms is past the end");
    assert_eq!(one.planned(), Some(6));
    // Nothing is sent once the end has passed, even a request intended before it.
    assert_eq!(one.intended(1, start + Duration::from_millis(55)), None);
    // A late asker still gets the intended time, not `now`.
    assert_eq!(
        one.intended(1, start + Duration::from_millis(40)),
        Some(start + iv)
    );

    // Two threads interleave into one schedule; a request limit is global.
    let t1 = Schedule {
        stride: 2,
        offset: 1,
        end: None,
        requests: Some(5),
        ..one
    };
    let got: Vec<_> = (0..3).map(|k| t1.intended(k, start)).collect();
    assert_eq!(got, vec![Some(start + iv), Some(start + iv * 3), None]);

    // Tickets hand them out in order, and stop.
    let tickets = Tickets::default();
    assert_eq!(tickets.take(&t1, start), Some(start + iv));
    assert_eq!(tickets.take(&t1, start), Some(start + iv * 3));
    assert_eq!(tickets.take(&t1, start), None);
    assert_eq!(tickets.taken(), 2);
}

#[test]
fn closed_loop_schedule_is_now() {
    let start = Instant::now();
    let s = Schedule {
        start,
        interval: None,
        end: Some(start + Duration::from_secs(1)),
        requests: Some(3),
        stride: 1,
        offset: 0,
    };
    let later = start + Duration::from_millis(300);
    assert_eq!(s.intended(0, later), Some(later));
    assert_eq!(s.intended(3, later), None);
    assert_eq!(s.intended(0, start + Duration::from_secs(1)), None);
    assert_eq!(s.planned(), None);
}

#[test]
fn response_heads() {
    let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nrest")
        .expect("ok")
        .expect("complete");
    assert_eq!(
        (h.status, h.body, h.close, h.len),
        (200, BodyLen::Length(12), false, 39)
    );
    let h =
        parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nConnection: close\r\n\r\n")
            .expect("ok")
            .expect("complete");
    assert_eq!((h.body, h.close), (BodyLen::Chunked, true));
    let h = parse_head(b"HTTP/1.0 200 OK\r\n\r\n")
        .expect("ok")
        .expect("complete");
    assert_eq!((h.body, h.close), (BodyLen::UntilClose, true));
    let h = parse_head(b"HTTP/1.1 204 No Content\r\n\r\n")
        .expect("ok")
        .expect("complete");
    assert_eq!(h.body, BodyLen::Empty);
    assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Len"), Ok(None));
    for bad in [
        &b"HTTP/2 200 OK\r\n\r\n"[..],
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
    ] {
        assert!(parse_head(bad).is_err(), "{}", String::from_utf8_lossy(bad));
    }
}

const CHUNKED: &[u8] =
    b"5\r\nhello\r\n1;ext=1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n";

#[test]
fn chunked_decoding_across_split_reads() {
    let want = b"hello 0123456789";
    // Every split into two reads, and one byte at a time.
    for cut in 0..=CHUNKED.len() {
        let mut d = Chunked::default();
        let mut out = Vec::new();
        let (a, b) = CHUNKED.split_at(cut);
        assert_eq!(d.feed(a, |p| out.extend_from_slice(p)), Ok(a.len()));
        assert_eq!(d.feed(b, |p| out.extend_from_slice(p)), Ok(b.len()));
        assert!(d.done(), "cut at {cut}");
        assert_eq!(out, want, "cut at {cut}");
    }
    let mut d = Chunked::default();
    let mut out = Vec::new();
    for b in CHUNKED {
        d.feed(std::slice::from_ref(b), |p| out.extend_from_slice(p))
            .expect("byte");
    }
    assert!(d.done());
    assert_eq!(out, want);
    // Bytes after the end are left unconsumed.
    let mut more = CHUNKED.to_vec();
    more.extend_from_slice(b"HTTP/1.1");
    assert_eq!(Chunked::default().feed(&more, |_| {}), Ok(CHUNKED.len()));
    for bad in [
        &b"zz\r\n"[..],
        b"5\r\nhelloX\r\n",
        b"5\nhello\r\n",
        b"11111111111111111\r\n",
        b"\r\n",
    ] {
        let r = Chunked::default().feed(bad, |_| {});
        assert!(r.is_err(), "{}", String::from_utf8_lossy(bad));
    }
}

const SSE: &[u8] = b"data: {\"i\":0}\n\ndata: {\"i\":1}\r\n\r\ndata: a\ndata: b\n\n\
data: {\"i\":3}\n\ndata: [DONE]\n\n";

#[test]
fn event_scanner_order_across_splits() {
    let want: Vec<&[u8]> = vec![
        b"data: {\"i\":0}",
        b"data: {\"i\":1}",
        b"data: a\ndata: b",
        b"data: {\"i\":3}",
    ];
    for cut in 0..=SSE.len() {
        let mut s = EventScanner::new(EventFormat::Sse);
        let mut got: Vec<Vec<u8>> = Vec::new();
        for part in [&SSE[..cut], &SSE[cut..]] {
            s.feed(part, |e| got.push(e.to_vec()));
        }
        assert_eq!(got, want, "cut at {cut}");
        assert!(s.finished && !s.pending(), "cut at {cut}");
    }
    let nd = b"{\"done\":false,\"n\":0}\n{\"done\":false,\"n\":1}\r\n\n{\"done\":true}\n";
    for cut in 0..=nd.len() {
        let mut s = EventScanner::new(EventFormat::Ndjson);
        let mut got: Vec<Vec<u8>> = Vec::new();
        s.feed(&nd[..cut], |e| got.push(e.to_vec()));
        assert!(!s.finished || cut == nd.len(), "cut at {cut}");
        s.feed(&nd[cut..], |e| got.push(e.to_vec()));
        assert_eq!(got.len(), 3, "cut at {cut}");
        assert_eq!(got[1], b"{\"done\":false,\"n\":1}");
        assert!(s.finished);
    }
}
