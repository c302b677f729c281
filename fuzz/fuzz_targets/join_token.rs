//! Join tokens: parsing a token string or the `<id>.<secret>` credential
//! never panics, and an accepted token prints back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_proto::JoinToken;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(token) = text.parse::<JoinToken>() {
        let printed = token.to_string();
        let again: JoinToken = printed
            .parse()
            .unwrap_or_else(|e| panic!("printed token {printed:?} does not parse: {e}"));
        assert!(again == token, "round trip changed the token");
        let (id, secret) = JoinToken::parse_credential(&token.credential())
            .expect("a parsed token's credential parses");
        assert_eq!((id, secret), (token.id.clone(), token.secret.clone()));
    }
    let _ = JoinToken::parse_credential(text);
});
