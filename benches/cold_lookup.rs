//! Cold-lookup latency (being written).
fn main() {}
