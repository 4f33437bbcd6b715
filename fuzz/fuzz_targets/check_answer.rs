//! The check service's answers (`[auth] check_url`), as untrusted as a client: what
//! `auth::check::read_answer` makes of a status and a body.
//!
//! Properties:
//! - no input panics `read_answer`, whatever the status;
//! - 401 and 403 refuse whatever the body; any status but 200, 401 and 403 fails;
//! - a grant names an identity that can travel: `sub` 1..=256 printable characters, at
//!   most 1024 domain ids of 1..=128 bytes, an age in `0..=cap`, and claim headers whose
//!   values are printable and at most 1 KiB; a body past `MAX_ANSWER_BYTES` never grants.
#![no_main]

use cubegate::internals::auth::check::{read_answer, CheckVerdict, MAX_ANSWER_BYTES};
use cubegate::internals::auth::claims::ClaimRules;
use libfuzzer_sys::fuzz_target;

fn printable(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

fuzz_target!(|data: &[u8]| {
    let rules = ClaimRules {
        leeway_s: 30.0,
        namespace: String::new(),
        domains_claim: "domains".into(),
        claim_headers: vec![
            ("email".into(), "X-User-Email".into()),
            ("n".into(), "X-N".into()),
        ],
    };
    let cap = 300.0;
    for status in [200, 401, 403, 500] {
        let verdict = read_answer(status, data, &rules, cap);
        match (status, verdict) {
            (401 | 403, v) => assert_eq!(v, Ok(CheckVerdict::Refused)),
            (500, v) => assert!(v.is_err()),
            (_, Ok(CheckVerdict::Granted { claims, max_age_s })) => {
                assert!(data.len() <= MAX_ANSWER_BYTES);
                let sub = claims.sub();
                assert!(!sub.is_empty() && sub.len() <= 256 && printable(sub));
                let domains = claims.domains().unwrap_or(&[]);
                assert!(domains.len() <= 1024);
                for d in domains {
                    assert!(!d.as_str().is_empty() && d.as_str().len() <= 128);
                }
                assert!((0.0..=cap).contains(&max_age_s));
                for (_, value) in claims.headers() {
                    assert!(value.len() <= 1024 && printable(value));
                }
                assert_eq!(claims.issuer(), None);
            }
            (_, Ok(CheckVerdict::Refused)) => panic!("a 200 never refuses"),
            (_, Err(_)) => {}
        }
    }
});
