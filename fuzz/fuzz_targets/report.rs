//! An agent's `Report` as the controller first sees it: any bytes decoded
//! as a `ReportRequest` are either refused by `check_report` with an error
//! or are within every limit it promises (size, peers listed once, string
//! lengths).
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use weft_proto::pb;
use weft_proto::report::{
    MAX_APPLY_ERROR_LEN, MAX_ENDPOINT_LEN, MAX_REPORT_BYTES, MAX_REPORT_PEERS, check_report,
};

fuzz_target!(|data: &[u8]| {
    let Ok(report) = pb::ReportRequest::decode(data) else {
        return;
    };
    if check_report(&report).is_err() {
        return;
    }
    assert!(report.encoded_len() <= MAX_REPORT_BYTES);
    assert!(report.peers.len() <= MAX_REPORT_PEERS);
    assert!(report.apply_error.len() <= MAX_APPLY_ERROR_LEN);
    let mut keys = BTreeSet::new();
    for p in &report.peers {
        assert_eq!(p.public_key.len(), 32, "accepted a malformed key");
        assert!(keys.insert(p.public_key.clone()), "accepted a peer twice");
        assert!(p.endpoint.len() <= MAX_ENDPOINT_LEN);
    }
});
