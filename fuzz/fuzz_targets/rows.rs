//! The dataset row parser: each JSON line, format detection and parsing into a sample.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cfg = kiln::recipe::DataSection::for_command(&["fuzz.jsonl".to_string()], toml::Table::new())
        .expect("a default data section");
    for line in text.lines() {
        let Ok(row) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let Ok(format) = kiln::data::formats::detect(&row, &cfg) {
            let _ = kiln::data::formats::parse(&row, format, &cfg);
        }
    }
});
