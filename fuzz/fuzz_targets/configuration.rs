//! Fuzz target: Husk's configuration file (written by the node's admin, but parsed by every shim)
//! and the pod sizing it allows through annotations. Nothing may panic; a configuration that
//! parses renders to TOML that parses back to the same configuration; a sizing stays inside the
//! configured bounds.

#![no_main]

use std::collections::HashMap;
use std::path::Path;

use husk_shim::config::Config;
use libfuzzer_sys::fuzz_target;

/// The input, as text so that corpus files can be written by hand:
/// `CONFIGURATION_TOML\0KEY=VALUE\n...` (the pod's annotations).
fn parse(data: &[u8]) -> Option<(&str, HashMap<String, String>)> {
    let text = std::str::from_utf8(data).ok()?;
    let (toml, annotations) = text.split_once('\0').unwrap_or((text, ""));
    let annotations = annotations
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect();
    Some((toml, annotations))
}

fuzz_target!(|data: &[u8]| {
    let Some((toml, annotations)) = parse(data) else { return };
    let path = Path::new("/etc/husk/configuration.toml");
    let Ok(config) = Config::parse(toml, path) else { return };
    let rendered = config.render();
    match Config::parse(&rendered, path) {
        Ok(again) => assert_eq!(again, config, "the rendered configuration reads back the same:\n{rendered}"),
        Err(err) => panic!("the rendered configuration does not parse: {err}\n{rendered}"),
    }
    if let Ok(sizing) = config.pod_sizing(&annotations) {
        let h = &config.hypervisor;
        assert!((1..=h.max_vcpus).contains(&sizing.vcpus), "{sizing:?} for {h:?}");
        assert!(sizing.memory_mib <= h.max_memory_mib, "{sizing:?} for {h:?}");
    }
});
