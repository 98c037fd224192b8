//! Fuzz target: see `p2p_node_fuzz::secure_payload`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| p2p_node_fuzz::secure_payload(data));
