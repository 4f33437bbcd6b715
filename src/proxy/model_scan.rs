//! Finds the top-level `"model"` of a JSON request body without parsing it.
//!
//! Routing needs one string out of a body that may be megabytes of chat history (the
//! OpenAI SDKs put `messages` before `model`). A full parse would allocate a tree for
//! nothing; this is a byte-level tokenizer that tracks only strings, escapes and nesting
//! depth, fed piece by piece as the body arrives (pieces may split anywhere).
//!
//! It keeps running over the rest of the body while the body is forwarded, because a second
//! top-level `"model"` key (JSON parsers in backends take the last one) would let a client
//! pass the check with one model and be served another. For the same reason a top-level key
//! written with escape sequences is refused: it could spell `model` in disguise.

use std::fmt;

const MAX_MODEL_BYTES: usize = 256;
const KEY: &[u8] = b"model";
/// FNV-1a over the user id's bytes as they pass: no buffer, any length, pieces split
/// anywhere. (Only equal ids must agree; the policy mixes the result before use.)
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// Nesting deeper than this is refused (and the depth counter can never wrap).
const MAX_DEPTH: u32 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanError {
    NotAnObject,
    NotAString,
    TooLong,
    Escaped,
    EscapedKey,
    Duplicate,
    TrailingData,
    TooDeep,
    NotUtf8,
}

impl fmt::Display for ScanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScanError::NotAnObject => "the request body must be a JSON object",
            ScanError::NotAString => "\"model\" must be a string",
            ScanError::TooLong => "\"model\" is longer than 256 bytes",
            ScanError::Escaped => "escape sequences are not accepted in \"model\"",
            ScanError::EscapedKey => {
                "escape sequences are not accepted in top-level keys of the request body"
            }
            ScanError::Duplicate => "the request body names \"model\" more than once",
            ScanError::TrailingData => "data after the JSON object in the request body",
            ScanError::TooDeep => "the request body nests deeper than 512 levels",
            ScanError::NotUtf8 => "\"model\" is not valid UTF-8",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the opening `{`.
    Start,
    Body,
    /// The top-level object has closed.
    End,
}

#[derive(Clone)]
pub struct ModelScanner {
    phase: Phase,
    depth: u32,
    in_string: bool,
    escape: bool,
    /// At depth 1, the next string is a key.
    expect_key: bool,
    /// The current string is a top-level key; `key_pos` counts matched bytes of "model",
    /// or `None` once it can no longer be "model".
    in_key: bool,
    key_pos: Option<usize>,
    /// The last top-level key was "model": the next value is ours.
    want_value: bool,
    /// The current string is the model value.
    in_value: bool,
    /// The model value, inline: no allocation per request.
    value: [u8; MAX_MODEL_BYTES],
    value_len: usize,
    found: bool,
    /// Payload bytes fed before the current piece.
    fed: usize,
    /// The current top-level key's first bytes (`KEY_BUF + 1` = longer than that).
    key_buf: [u8; KEY_BUF],
    key_len: usize,
    /// The last top-level key was "stream": its value is next.
    want_stream: bool,
    /// Top-level `"stream": true`.
    stream: bool,
    /// A top-level `"stream_options"` key.
    stream_options: bool,
    /// Where the top-level object opens (the `{`), as a payload offset.
    open_at: usize,
    /// The last top-level key was "max_tokens" or "max_completion_tokens": its digits are
    /// next.
    want_max: bool,
    max_tokens: Option<u64>,
    /// The last top-level key was "user" (the OpenAI end-user id): its string is next.
    want_user: bool,
    /// The current string is the user value; `user_acc` hashes its raw bytes.
    in_user: bool,
    user_acc: u64,
    /// The hash of the last top-level `"user"` string (raw bytes, escapes included).
    user: Option<u64>,
}

/// Top-level keys are remembered this far (the longest one looked for is
/// "max_completion_tokens").
const KEY_BUF: usize = 24;

impl Default for ModelScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl ModelScanner {
    pub fn new() -> Self {
        ModelScanner {
            phase: Phase::Start,
            depth: 0,
            in_string: false,
            escape: false,
            expect_key: false,
            in_key: false,
            key_pos: None,
            want_value: false,
            in_value: false,
            value: [0; MAX_MODEL_BYTES],
            value_len: 0,
            found: false,
            fed: 0,
            key_buf: [0; KEY_BUF],
            key_len: 0,
            want_stream: false,
            stream: false,
            stream_options: false,
            open_at: 0,
            want_max: false,
            max_tokens: None,
            want_user: false,
            in_user: false,
            user_acc: 0,
            user: None,
        }
    }

    /// The model, once its value string has closed.
    pub fn model(&self) -> Option<&str> {
        if self.found {
            std::str::from_utf8(&self.value[..self.value_len]).ok()
        } else {
            None
        }
    }

    /// The body asks for a stream (`"stream": true` at top level).
    pub fn stream(&self) -> bool {
        self.stream
    }

    /// The body has a top-level `"stream_options"`.
    pub fn has_stream_options(&self) -> bool {
        self.stream_options
    }

    /// The top-level `max_tokens` (or `max_completion_tokens`), when a whole number.
    pub fn max_tokens(&self) -> Option<u64> {
        self.max_tokens
    }

    /// A hash of the top-level `"user"` string when the body has a non-empty one: the
    /// OpenAI end-user id, which `sticky = "user"` pins to a host.
    pub fn user(&self) -> Option<u64> {
        self.user
    }

    /// The payload offset of the top-level object's `{`.
    pub fn open_at(&self) -> usize {
        self.open_at
    }

    /// The top-level object has closed (the body holds no more keys).
    pub fn finished(&self) -> bool {
        self.phase == Phase::End
    }

    pub fn feed(&mut self, input: &[u8]) -> Result<(), ScanError> {
        let mut i = 0;
        while i < input.len() {
            // Inside a string nobody cares about (chat history: most of a body), jump to
            // the next quote or backslash instead of stepping byte by byte.
            if self.in_string && !self.escape {
                if !self.in_key && !self.in_value && !self.in_user {
                    match memchr::memchr2(b'"', b'\\', &input[i..]) {
                        Some(skip) => i += skip,
                        None => break,
                    }
                } else {
                    // A string it records (a top-level key, the model, the user): the run
                    // up to the next quote or backslash in one go, not byte by byte.
                    let run = memchr::memchr2(b'"', b'\\', &input[i..]).unwrap_or(input.len() - i);
                    if run > 0 {
                        self.string_run(&input[i..i + run])?;
                        i += run;
                        continue;
                    }
                }
            }
            self.step(input[i], self.fed + i)?;
            i += 1;
        }
        self.fed += input.len();
        Ok(())
    }

    /// One byte outside the skipped stretches; `at` is its payload offset.
    fn step(&mut self, b: u8, at: usize) -> Result<(), ScanError> {
        match self.phase {
            Phase::Start => {
                return match b {
                    b'{' => {
                        self.phase = Phase::Body;
                        self.depth = 1;
                        self.expect_key = true;
                        self.open_at = at;
                        Ok(())
                    }
                    b' ' | b'\t' | b'\r' | b'\n' => Ok(()),
                    _ => Err(ScanError::NotAnObject),
                };
            }
            Phase::End => {
                return match b {
                    b' ' | b'\t' | b'\r' | b'\n' => Ok(()),
                    _ => Err(ScanError::TrailingData),
                };
            }
            Phase::Body => {}
        }
        if self.in_string {
            return self.string_byte(b);
        }
        let gap = matches!(b, b' ' | b'\t' | b'\r' | b'\n' | b':');
        if self.want_stream && !gap {
            self.want_stream = false;
            self.stream = b == b't';
        }
        if self.want_user && !gap && b != b'"' {
            // Not a string (null, a number): no user id.
            self.want_user = false;
        }
        if self.want_max && !gap {
            if b.is_ascii_digit() {
                let digit = u64::from(b - b'0');
                let n = self.max_tokens.unwrap_or(0);
                self.max_tokens = n.checked_mul(10).and_then(|n| n.checked_add(digit));
                if self.max_tokens.is_none() {
                    self.want_max = false;
                }
            } else {
                self.want_max = false;
            }
        }
        match b {
            b'"' => {
                self.in_string = true;
                if self.depth == 1 && self.expect_key {
                    self.in_key = true;
                    self.key_pos = Some(0);
                    self.key_len = 0;
                } else if self.depth == 1 && self.want_value {
                    self.want_value = false;
                    self.in_value = true;
                    self.value_len = 0;
                } else if self.depth == 1 && self.want_user {
                    self.want_user = false;
                    self.in_user = true;
                    self.user_acc = FNV_OFFSET;
                }
            }
            b'{' | b'[' => {
                if self.depth == 1 && self.want_value {
                    return Err(ScanError::NotAString);
                }
                if self.depth == MAX_DEPTH {
                    return Err(ScanError::TooDeep);
                }
                self.depth += 1;
            }
            b'}' | b']' => {
                self.depth -= 1;
                if self.depth == 0 {
                    self.phase = Phase::End;
                }
            }
            b':' if self.depth == 1 => self.expect_key = false,
            b',' if self.depth == 1 => self.expect_key = true,
            b' ' | b'\t' | b'\r' | b'\n' | b':' | b',' => {}
            _ => {
                if self.depth == 1 && self.want_value {
                    return Err(ScanError::NotAString);
                }
            }
        }
        Ok(())
    }

    fn string_byte(&mut self, b: u8) -> Result<(), ScanError> {
        // Every byte of the id but its closing quote goes in the hash: plain runs through
        // `string_run`, a backslash and the byte it escapes here.
        if self.in_user && (b == b'\\' || self.escape) {
            self.user_acc = (self.user_acc ^ u64::from(b)).wrapping_mul(FNV_PRIME);
        }
        if self.escape {
            self.escape = false;
            return Ok(());
        }
        match b {
            b'\\' => {
                if self.in_key {
                    return Err(ScanError::EscapedKey);
                }
                if self.in_value {
                    return Err(ScanError::Escaped);
                }
                self.escape = true;
            }
            b'"' => {
                self.in_string = false;
                if self.in_key {
                    self.in_key = false;
                    match &self.key_buf[..self.key_len.min(KEY_BUF)] {
                        b"stream" => self.want_stream = true,
                        b"max_tokens" | b"max_completion_tokens" => {
                            self.want_max = true;
                            self.max_tokens = None;
                        }
                        b"stream_options" => self.stream_options = true,
                        b"user" => self.want_user = true,
                        _ => {}
                    }
                    if self.key_pos == Some(KEY.len()) {
                        if self.found {
                            return Err(ScanError::Duplicate);
                        }
                        self.want_value = true;
                    }
                } else if self.in_value {
                    self.in_value = false;
                    if std::str::from_utf8(&self.value[..self.value_len]).is_err() {
                        return Err(ScanError::NotUtf8);
                    }
                    self.found = true;
                } else if self.in_user {
                    self.in_user = false;
                    // An empty id names nobody.
                    self.user = (self.user_acc != FNV_OFFSET).then_some(self.user_acc);
                }
            }
            _ => self.string_run(std::slice::from_ref(&b))?,
        }
        Ok(())
    }

    /// Bytes inside the current string that are neither a quote nor a backslash, with no
    /// escape pending: what they add to the key, the model or the user id being read.
    fn string_run(&mut self, run: &[u8]) -> Result<(), ScanError> {
        if self.in_key {
            for &b in run {
                if self.key_len < KEY_BUF {
                    self.key_buf[self.key_len] = b;
                }
                self.key_len = self.key_len.saturating_add(1);
                self.key_pos = match self.key_pos {
                    // Case-insensitive: Go's encoding/json (Ollama) matches keys that way,
                    // so "MODEL" is the same key to it.
                    Some(i) if i < KEY.len() && KEY[i] == b.to_ascii_lowercase() => Some(i + 1),
                    _ => None,
                };
            }
        } else if self.in_value {
            let end = self.value_len + run.len();
            if end > MAX_MODEL_BYTES {
                return Err(ScanError::TooLong);
            }
            self.value[self.value_len..end].copy_from_slice(run);
            self.value_len = end;
        } else if self.in_user {
            for &b in run {
                self.user_acc = (self.user_acc ^ u64::from(b)).wrapping_mul(FNV_PRIME);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "model_scan_tests.rs"]
mod tests;
