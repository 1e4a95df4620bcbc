//! Invariant checks shared by the fuzz targets (`fuzz_targets/`) and the stable replay test
//! (`tests/fuzz_regressions.rs` in the main package, which includes this file with `#[path]`).
//!
//! Each module has one entry point, `check(data: &[u8])`, which decodes its input from raw bytes
//! (no `arbitrary`, so a corpus file replays the same way everywhere) and panics when an invariant
//! does not hold.

pub mod header_extraction;
pub mod input;
pub mod key_parser;
pub mod provenance_stamping;
pub mod scope_parsing;
