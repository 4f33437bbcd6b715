//! Configuration files, as `cubegate check-config` and a SIGHUP reload read them.
//!
//! Properties:
//! - no text panics `Config::parse` (TOML, then validation) or building the snapshot a
//!   valid configuration becomes (domains, backend URLs, inline JWKS, HS secrets from the
//!   environment): a bad file is an error naming the key, never a crash;
//! - a configuration that parses validates again unchanged.
//!
//! Built with `--cfg fuzzing`, backend hosts resolve only when they are IP literals: the
//! fuzzer must not send DNS queries.
#![no_main]

use cubegate::{config::Config, snapshot::Snapshot};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::parse(text) else {
        return;
    };
    config
        .validate()
        .expect("a parsed configuration validates again");
    let _ = Snapshot::from_config(&config, 1);
});
