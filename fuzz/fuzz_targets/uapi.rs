//! The WireGuard UAPI protocol (`wg set` over the agent's unix socket):
//! any request text either fails with an error or gives a request that
//! writes back to text parsing to the same request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_dataplane_core::uapi::{Request, parse_request};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(Request::Set(req)) = parse_request(text) {
        let again = req.to_uapi();
        assert_eq!(
            parse_request(&again),
            Ok(Request::Set(req)),
            "round trip changed the request:\n{again}"
        );
    }
});
