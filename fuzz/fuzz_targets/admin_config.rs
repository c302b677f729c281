//! `admin.conf`: reading an operator's admin config never panics; an
//! accepted one serialises back to an equal config.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_proto::admin_config::AdminConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = AdminConfig::parse("fuzz/admin.conf", text) {
        let again = AdminConfig::parse("fuzz/admin.conf", &config.to_json())
            .expect("a written admin config reads back");
        assert!(again == config, "round trip changed the admin config");
    }
});
