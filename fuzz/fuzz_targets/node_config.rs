//! The agent's input from the controller: any bytes decoded as a
//! `NodeConfig` message and converted to the domain type either fail with
//! an error or give a config that survives a wire round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use weft_dataplane_core::NodeConfig;
use weft_proto::pb;

fuzz_target!(|data: &[u8]| {
    let Ok(wire) = pb::NodeConfig::decode(data) else {
        return;
    };
    let Ok(config) = NodeConfig::try_from(wire) else {
        return;
    };
    let back = pb::NodeConfig::from(&config);
    let bytes = back.encode_to_vec();
    let decoded = pb::NodeConfig::decode(bytes.as_slice()).expect("our own encoding decodes");
    let again = NodeConfig::try_from(decoded).expect("a converted config converts again");
    assert_eq!(again, config, "wire round trip changed the config");
});
