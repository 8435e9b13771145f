#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_protocol::codec::fuzz_decode(data));
