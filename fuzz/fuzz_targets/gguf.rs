//! The GGUF reader: any bytes give a validated file or an error; tensors of a valid header
//! dequantize without reading past their bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.gguf");
    let Ok(file) = kiln::gguf::GgufFile::parse_bytes(path, data) else {
        return;
    };
    for t in &file.tensors {
        let start = (file.data_start + t.offset) as usize;
        let bytes = &data[start..start + t.info.nbytes()];
        let _ = kiln::gguf::quants::dequantize(t.info.ggml_type, bytes);
    }
    let _ = kiln::tokenizer::vocab::tokenizer_from_gguf(&file);
});
