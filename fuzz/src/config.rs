//! The config file: any JSON text through `from_json::<VmConfig>` and `validate`.
//!
//! Invariants: nothing panics; whatever parses re-serializes and re-parses to the same
//! value; a valid config stays valid after that round trip, and the resources'
//! `GET /vm/config` document for it (said to be a valid config file) parses back to the
//! same config.

use kiln::config::{VmConfig, from_json};
use kiln::resources::VmResources;

/// Runs one input.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = from_json::<VmConfig>(text) else {
        return;
    };
    let json = serde_json::to_string(&config).expect("a parsed config serializes");
    let again: VmConfig = match from_json(&json) {
        Ok(c) => c,
        Err(e) => panic!("the serialized config does not parse: {e}\n{json}"),
    };
    assert_eq!(
        again, config,
        "serialize + parse changed the config\n{json}"
    );
    let valid = config.validate().is_ok();
    assert_eq!(
        again.validate().is_ok(),
        valid,
        "validity changed in the round trip"
    );
    if valid {
        let doc = VmResources::from_config(config.clone())
            .to_json()
            .to_string();
        let back: VmConfig = match from_json(&doc) {
            Ok(c) => c,
            Err(e) => panic!("GET /vm/config is not a config file: {e}\n{doc}"),
        };
        assert_eq!(
            back, config,
            "GET /vm/config differs from the config\n{doc}"
        );
        assert!(back.validate().is_ok(), "GET /vm/config is not valid");
    }
}
