//! Fuzz target: see `p2p_node_fuzz::replica`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| p2p_node_fuzz::replica(data));
