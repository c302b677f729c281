//! Policy YAML: the parser and whole-document validator never panic, and
//! whatever they accept prints back (`to_yaml`) to text that parses to the
//! same policy.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_controller_core::policy::{parse_documents, to_yaml};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policies) = parse_documents("fuzz.yaml", text) else {
        return;
    };
    for policy in policies {
        let yaml = to_yaml(&policy);
        let again = parse_documents("canonical.yaml", &yaml)
            .unwrap_or_else(|e| panic!("canonical YAML does not parse: {e}\n{yaml}"));
        assert_eq!(
            again,
            vec![policy],
            "round trip changed the policy:\n{yaml}"
        );
    }
});
