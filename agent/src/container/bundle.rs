//! A container's bundle in the agent's state directory: `config.json` and `rootfs/`, an overlay
//! whose lower layer is the image directory in the shared file system and whose upper layer (the
//! container's writes) stays in the guest. Removing the bundle unmounts and deletes it all.

use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::Spec;

use super::CallError;

/// A mounted bundle; [`Bundle::remove`] (or drop) takes it down.
#[derive(Debug)]
pub struct Bundle {
    dir: PathBuf,
    mounted: bool,
    /// The spec's `process.terminal`.
    terminal: bool,
    /// The spec's `linux.cgroupsPath` (Husk's default when it had none).
    cgroups_path: PathBuf,
}

impl Bundle {
    /// Parses and checks `oci_spec`, mounts the rootfs overlay over `shared`/`root.path` and writes
    /// the spec the runtime will read into `<bundles>/<id>`.
    pub fn create(bundles: &Path, id: &str, shared: &Path, oci_spec: &[u8]) -> Result<Bundle, CallError> {
        let mut spec: Spec = serde_json::from_slice(oci_spec)
            .map_err(|err| CallError::InvalidArgument(format!("oci_spec: {err}")))?;
        let lower = image_dir(&spec, shared)?;
        check_process(&spec)?;
        let terminal = spec.process().as_ref().and_then(|p| p.terminal()).unwrap_or(false);
        let cgroups_path = spec
            .linux()
            .as_ref()
            .and_then(|linux| linux.cgroups_path().clone())
            .unwrap_or_else(|| PathBuf::from(format!("/husk/{id}")));
        let mut bundle = Bundle { dir: bundles.join(id), mounted: false, terminal, cgroups_path };
        if bundle.dir.exists() {
            return Err(CallError::AlreadyExists(format!(
                "container {id}: bundle {} exists",
                bundle.dir.display()
            )));
        }
        let internal =
            |what: &str, err: &dyn std::fmt::Display| CallError::Internal(format!("{what}: {err}"));
        for sub in ["upper", "work", "rootfs"] {
            std::fs::create_dir_all(bundle.dir.join(sub))
                .map_err(|e| internal(&format!("creating {}", bundle.dir.join(sub).display()), &e))?;
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            bundle.dir.join("upper").display(),
            bundle.dir.join("work").display()
        );
        mount(Some("overlay"), &bundle.rootfs(), Some("overlay"), MsFlags::empty(), Some(options.as_str()))
            .map_err(|e| internal(&format!("mounting the rootfs overlay ({options})"), &e))?;
        bundle.mounted = true;
        if let Some(root) = spec.root_mut() {
            root.set_path(bundle.rootfs());
        }
        if let Some(linux) = spec.linux_mut() {
            linux.set_cgroups_path(Some(bundle.cgroups_path.clone()));
        }
        spec.save(bundle.dir.join("config.json")).map_err(|e| internal("writing config.json", &e))?;
        Ok(bundle)
    }

    pub fn cgroups_path(&self) -> &Path {
        &self.cgroups_path
    }

    pub fn terminal(&self) -> bool {
        self.terminal
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// Unmounts the rootfs and deletes the bundle.
    pub fn remove(mut self) -> std::io::Result<()> {
        self.take_down()
    }

    fn take_down(&mut self) -> std::io::Result<()> {
        if self.mounted {
            umount2(&self.rootfs(), MntFlags::MNT_DETACH).map_err(std::io::Error::from)?;
            self.mounted = false;
        }
        match std::fs::remove_dir_all(&self.dir) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
            _ => Ok(()),
        }
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        if let Err(err) = self.take_down() {
            eprintln!("husk-agent: removing bundle {}: {err}", self.dir.display());
        }
    }
}

/// `root.path`: a directory inside the shared file system, named relative to it.
fn image_dir(spec: &Spec, shared: &Path) -> Result<PathBuf, CallError> {
    let invalid = |why: String| CallError::InvalidArgument(format!("oci_spec: root.path {why}"));
    let root =
        spec.root().as_ref().ok_or_else(|| CallError::InvalidArgument("oci_spec: root is missing".into()))?;
    let path = root.path();
    if path.as_os_str().is_empty() || !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(invalid(format!(
            "{}: must be relative to the shared directory, without `..` or `.`",
            path.display()
        )));
    }
    let dir = shared.join(path);
    match std::fs::symlink_metadata(&dir) {
        Ok(meta) if meta.is_dir() => Ok(dir),
        Ok(_) => Err(invalid(format!("{}: not a directory in the shared directory", path.display()))),
        Err(err) => {
            Err(invalid(format!("{}: {err} (in the shared directory {})", path.display(), shared.display())))
        }
    }
}

fn check_process(spec: &Spec) -> Result<(), CallError> {
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| CallError::InvalidArgument("oci_spec: process is missing".into()))?;
    if process.args().as_ref().is_none_or(|args| args.is_empty()) {
        return Err(CallError::InvalidArgument("oci_spec: process.args is empty".into()));
    }
    Ok(())
}
