//! The PEFT adapter loader: any adapter_model.safetensors bytes (beside a valid
//! adapter_config.json) give an adapter or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

const CONFIG: &str = r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}"#;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("adapter_config.json"), CONFIG).expect("write");
    std::fs::write(dir.path().join("adapter_model.safetensors"), data).expect("write");
    let _ = kiln::model::peft::read_adapter(dir.path());
});
