//! Fuzz target: what the shim makes of a bundle's `config.json` and its annotations (both user
//! input: a pod spec or `ctr run --config`): parsing, the pod role, the VM's sizing, the pod's
//! network, and the spec rewritten for the guest. Nothing may panic, the sizing must stay inside
//! the configured bounds, and no host path may reach the guest's spec.

#![no_main]

use std::collections::HashMap;
use std::path::Path;

use husk_shim::config::Config;
use husk_shim::containerd::bundle::{self, PodRole, GUEST_SHARED_DIR};
use libfuzzer_sys::fuzz_target;
use oci_spec::runtime::LinuxNamespaceType;

/// The sandbox container's namespace kinds, for a member container's spec (named by letter).
fn kind(letter: char) -> Option<LinuxNamespaceType> {
    Some(match letter {
        'm' => LinuxNamespaceType::Mount,
        'c' => LinuxNamespaceType::Cgroup,
        'u' => LinuxNamespaceType::Uts,
        'i' => LinuxNamespaceType::Ipc,
        'U' => LinuxNamespaceType::User,
        'p' => LinuxNamespaceType::Pid,
        'n' => LinuxNamespaceType::Network,
        _ => return None,
    })
}

/// The input, as text so that corpus files can be written by hand:
/// `ID\nKINDS\nKEY=VALUE\n...\0CONFIG_JSON` (the annotations are added to the spec's own).
struct Input<'a> {
    id: &'a str,
    kinds: Vec<LinuxNamespaceType>,
    annotations: Vec<(&'a str, &'a str)>,
    config_json: &'a [u8],
}

impl<'a> Input<'a> {
    fn parse(data: &'a [u8]) -> Option<Input<'a>> {
        let split = data.iter().position(|b| *b == 0)?;
        let head = std::str::from_utf8(&data[..split]).ok()?;
        let mut lines = head.split('\n');
        let id = lines.next()?;
        let kinds = lines.next().unwrap_or_default().chars().filter_map(kind).collect();
        let annotations = lines.filter_map(|line| line.split_once('=')).collect();
        Some(Input { id, kinds, annotations, config_json: &data[split + 1..] })
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else { return };
    // In create's order: the id, the spec, the role; each refusal ends the create.
    if bundle::check_id(input.id).is_err() {
        return;
    }
    let Ok(mut spec) = bundle::parse_spec(input.config_json, Path::new("config.json")) else { return };
    let mut annotations: HashMap<String, String> = bundle::annotations(&spec);
    for (key, value) in input.annotations {
        annotations.insert(key.to_owned(), value.to_owned());
    }
    spec.set_annotations(Some(annotations.clone()));
    let Ok(role) = PodRole::of(input.id, &annotations) else { return };
    assert!(bundle::check_id(role.pod_id()).is_ok(), "{role:?}");
    let config = Config::default();
    if let Ok(sizing) = config.pod_sizing(&annotations) {
        let h = &config.hypervisor;
        assert!((1..=h.max_vcpus).contains(&sizing.vcpus), "{sizing:?}");
        assert!(sizing.memory_mib <= h.max_memory_mib, "{sizing:?}");
    }
    let _ = bundle::pod_netns(&spec);
    let _ = bundle::pod_net_sysctls(&spec);
    let guest = bundle::guest_spec(input.id, spec, &input.kinds);
    // Host paths never reach the guest: binds name their share (namespaces: below).
    for share in &guest.shares {
        assert!(share.name.starts_with(&format!("{}/mounts/", input.id)), "{share:?}");
    }
    for mount in guest.spec.mounts().iter().flatten() {
        let options = mount.options().clone().unwrap_or_default();
        let bind = mount.typ().as_deref() == Some("bind") || options.iter().any(|o| o == "bind" || o == "rbind");
        if let Some(source) = mount.source().as_ref().filter(|s| bind && s.is_absolute()) {
            assert!(source.starts_with(GUEST_SHARED_DIR), "a host path in the guest's spec: {mount:?}");
        }
    }
    if let Some(root) = guest.spec.root() {
        assert_eq!(root.path(), Path::new(&bundle::rootfs_name(input.id)));
    }
    // No network namespace; a path only where the container joins its sandbox's namespace of
    // that kind (the agent replaces it with the sandbox container's own; never used as given).
    let namespaces = guest.spec.linux().as_ref().and_then(|l| l.namespaces().clone()).unwrap_or_default();
    let joinable = [LinuxNamespaceType::Ipc, LinuxNamespaceType::Uts, LinuxNamespaceType::Pid];
    assert!(namespaces.iter().all(|ns| ns.typ() != LinuxNamespaceType::Network));
    assert!(namespaces.iter().all(|ns| ns.path().is_none() || joinable.contains(&ns.typ())));
    assert_eq!(guest.joins_sandbox, namespaces.iter().any(|ns| ns.path().is_some()));
    let _ = serde_json::to_vec(&guest.spec);
});
