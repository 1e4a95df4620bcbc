#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tower_api_keys_fuzz::key_parser::check(data));
