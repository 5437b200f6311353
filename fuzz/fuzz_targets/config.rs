//! Any UTF-8 text as a config file: validation answers `Ok` or `Err`, never panics.
//!
//! Text after the first NUL byte, if any, is read as the overrides JSON (as in the state
//! directory's `overrides.json`), so the overrides merged into sites are fuzzed too. Overrides
//! are always passed explicitly: with `None` every run would read `<state.dir>/overrides.json`
//! from this machine's disk, at a path the input chooses.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use portcullis::config::{Config, Overrides};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (toml, overrides) = match text.split_once('\0') {
        Some((toml, json)) => (toml, serde_json::from_str(json).unwrap_or_default()),
        None => (text, Overrides::new()),
    };
    let _ = Config::from_toml_with(toml, "fuzz.toml", Path::new("/nonexistent"), Some(&overrides));
});
