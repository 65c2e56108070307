#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| whittle_fuzz_entries::onnx_load(data));
