//! The recipe parser: any text gives a recipe or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = kiln::recipe::Recipe::parse(std::path::Path::new("fuzz.toml"), text, &[]);
    }
});
