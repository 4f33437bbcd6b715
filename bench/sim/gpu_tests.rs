//! GPU host tests (filled below).
