//! What containerd learns of Husk before any pod exists: `containerd-shim-husk-v2 -info` answers
//! with the OCI runtime features (runtime-spec `features.md`) of the runtime that creates the
//! containers, the agent's, in the guest. containerd's CRI turns them into the handler's features
//! the kubelet reads: recursive read-only volumes when `mountOptions` lists `rro`, user
//! namespaces when the namespaces list `user` and idmapped mounts are enabled. (containerd 2.1
//! asks only runtimes of type `io.containerd.runc.v2`; later releases ask every runtime,
//! containerd#13504.)
//!
//! Only what Husk is known to honour is listed; a field left out means "unknown" to the caller,
//! not "unsupported".

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::types::introspection::{RuntimeInfo, RuntimeVersion};
use husk_protocols::GUEST_MOUNT_OPTIONS;
use oci_spec::runtime::{
    Features, FeaturesBuilder, IDMapBuilder, LinuxFeatureBuilder, LinuxNamespaceType, MountExtensionsBuilder,
};
use oci_spec::OciSpecError;

/// The type containerd registers the runtime-spec's `features.Features` under (its JSON is the
/// `Any`'s value), as `containerd-shim-runc-v2 -info` answers.
pub const FEATURES_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

/// The OCI runtime spec versions the agent's runtime reads.
const OCI_VERSION_MIN: &str = "1.0.0";
const OCI_VERSION_MAX: &str = "1.2.1";

/// The answer to `-info`: the runtime's name and version, the options containerd gave back, and
/// the features as JSON.
pub fn runtime_info(runtime_id: &str, options: Option<&Any>) -> Result<RuntimeInfo, FeaturesError> {
    let features = serde_json::to_vec(&runtime_features()?).map_err(FeaturesError::Json)?;
    let mut info = RuntimeInfo::new();
    info.name = runtime_id.to_owned();
    let mut version = RuntimeVersion::new();
    version.version = env!("CARGO_PKG_VERSION").to_owned();
    info.version = Some(version).into();
    info.options = options.cloned().into();
    let mut any = Any::new();
    any.type_url = FEATURES_TYPE_URL.to_owned();
    any.value = features;
    info.features = Some(any).into();
    Ok(info)
}

/// What the agent's runtime honours in a container's spec: its mount options (recursive
/// read-only among them: the shim makes such a volume read-only all through on the node too),
/// the namespaces of the guest kernel, and no idmapped mounts (so no CRI user namespaces).
pub fn runtime_features() -> Result<Features, FeaturesError> {
    let namespaces = vec![
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Network,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::User,
        LinuxNamespaceType::Cgroup,
    ];
    let idmap = IDMapBuilder::default().enabled(false).build()?;
    let linux = LinuxFeatureBuilder::default()
        .namespaces(namespaces)
        .mount_extensions(MountExtensionsBuilder::default().idmap(idmap).build()?)
        .build()?;
    Ok(FeaturesBuilder::default()
        .oci_version_min(OCI_VERSION_MIN)
        .oci_version_max(OCI_VERSION_MAX)
        .mount_options(GUEST_MOUNT_OPTIONS.iter().map(|o| o.to_string()).collect::<Vec<_>>())
        .linux(linux)
        .build()?)
}

/// Why the features could not be written.
#[derive(Debug, thiserror::Error)]
pub enum FeaturesError {
    #[error("building the runtime features: {0}")]
    Build(#[from] OciSpecError),
    #[error("writing the runtime features as JSON: {0}")]
    Json(serde_json::Error),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// containerd's CRI reads the `Any` as runtime-spec JSON: recursive read-only mounts are
    /// offered, CRI user namespaces are not (no idmapped mounts).
    #[test]
    fn info_carries_the_features_containerd_reads_for_recursive_read_only_mounts() {
        let mut options = Any::new();
        options.type_url = "example/Options".into();
        let info = runtime_info("io.containerd.husk.v2", Some(&options)).unwrap();
        assert_eq!(info.name, "io.containerd.husk.v2");
        assert_eq!(info.options.type_url, "example/Options", "the options go back as given");
        assert_eq!(info.features.type_url, FEATURES_TYPE_URL);
        let json: serde_json::Value = serde_json::from_slice(&info.features.value).unwrap();
        let mounts = json["mountOptions"].as_array().unwrap();
        assert!(mounts.iter().any(|o| o == "rro") && mounts.iter().any(|o| o == "ro"), "{json}");
        assert_eq!(json["linux"]["mountExtensions"]["idmap"]["enabled"], false, "{json}");
        assert!(json["linux"]["namespaces"].as_array().unwrap().iter().any(|n| n == "user"), "{json}");
        assert_eq!(json["ociVersionMin"], "1.0.0");
    }
}
