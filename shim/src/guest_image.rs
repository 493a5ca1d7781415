//! The guest image: `vmlinux` + `initramfs.cpio` and the `manifest.json` that `make guest-image` writes
//! beside them (input hashes, output hashes and sizes, the agent's version).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Name of the manifest file inside a guest image directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Where `make guest-image` puts its outputs, relative to the workspace root.
const WORKSPACE_GUEST_DIR: &str = "build/guest";
/// Where a packaged install puts the guest image.
const INSTALLED_GUEST_DIR: &str = "/usr/share/husk/guest";

/// The manifest's `format` this code reads.
const MANIFEST_FORMAT: u32 = 1;

/// `manifest.json` as written by `guest-image/build`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub kernel: ImageFile,
    pub initramfs: ImageFile,
    pub agent: AgentInfo,
    /// Hashes of the inputs each output was built from (for humans and cache keys).
    pub inputs: serde_json::Map<String, serde_json::Value>,
}

/// One output file of the guest image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageFile {
    /// File name, relative to the image directory.
    pub path: String,
    pub sha256: String,
    pub size: u64,
}

/// The agent baked into the initramfs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentInfo {
    pub version: String,
    pub api: u32,
    pub sha256: String,
}

/// Why a guest image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GuestImageError {
    #[error("no guest image found (looked in {searched}); build one with `make guest-image`")]
    NotFound { searched: String },
    #[error("{path}: {cause}")]
    Read { path: PathBuf, cause: io::Error },
    #[error("{path}: not a valid guest image manifest: {cause}")]
    Parse { path: PathBuf, cause: serde_json::Error },
    #[error("{path}: manifest format {found}, this husk reads format {MANIFEST_FORMAT}; rebuild with `make guest-image`")]
    Format { path: PathBuf, found: u32 },
    #[error(
        "{path}: {what} is {found}, the manifest says {expected}; the image was changed after it was built"
    )]
    Mismatch { path: PathBuf, what: &'static str, found: String, expected: String },
    #[error(
        "the image's agent speaks API {found}, this husk speaks {expected}; rebuild with `make guest-image`"
    )]
    AgentApi { found: u32, expected: u32 },
}

/// A verified guest image directory.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl GuestImage {
    /// Candidate directories, in the order they are tried: only `$HUSK_GUEST_DIR` when it is set
    /// (an explicit choice never falls back to another image), otherwise the workspace's
    /// `build/guest` when running from a cargo target directory, then the installed location.
    pub fn candidate_dirs() -> Vec<PathBuf> {
        if let Some(dir) = std::env::var_os("HUSK_GUEST_DIR") {
            return vec![PathBuf::from(dir)];
        }
        let mut dirs = Vec::new();
        if let Some(root) = std::env::current_exe().ok().as_deref().and_then(workspace_root_of) {
            dirs.push(root.join(WORKSPACE_GUEST_DIR));
        }
        dirs.push(PathBuf::from(INSTALLED_GUEST_DIR));
        dirs
    }

    /// Finds the first candidate directory holding a manifest and verifies it.
    pub fn locate() -> Result<GuestImage, GuestImageError> {
        Self::locate_checking(Check::Digest)
    }

    /// [`GuestImage::locate`] with the files checked as `check` says.
    pub fn locate_checking(check: Check) -> Result<GuestImage, GuestImageError> {
        let candidates = Self::candidate_dirs();
        match candidates.iter().find(|dir| dir.join(MANIFEST_FILE).is_file()) {
            Some(dir) => Self::open_checking(dir, check),
            None => Err(GuestImageError::NotFound {
                searched: candidates.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "),
            }),
        }
    }

    /// Reads `dir/manifest.json` and checks that the kernel and initramfs are the files it describes
    /// and that the agent speaks this host's API version.
    pub fn open(dir: &Path) -> Result<GuestImage, GuestImageError> {
        Self::open_checking(dir, Check::Digest)
    }

    /// [`GuestImage::open`] with the files checked as `check` says.
    pub fn open_checking(dir: &Path, check: Check) -> Result<GuestImage, GuestImageError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = fs::read_to_string(&manifest_path)
            .map_err(|cause| GuestImageError::Read { path: manifest_path.clone(), cause })?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|cause| GuestImageError::Parse { path: manifest_path.clone(), cause })?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(GuestImageError::Format { path: manifest_path, found: manifest.format });
        }
        for file in [&manifest.kernel, &manifest.initramfs] {
            verify_file(&dir.join(&file.path), file, check)?;
        }
        if manifest.agent.api != husk_protocols::AGENT_API_VERSION {
            return Err(GuestImageError::AgentApi {
                found: manifest.agent.api,
                expected: husk_protocols::AGENT_API_VERSION,
            });
        }
        Ok(GuestImage { dir: dir.to_path_buf(), manifest })
    }

    /// Path of the guest kernel.
    pub fn kernel(&self) -> PathBuf {
        self.dir.join(&self.manifest.kernel.path)
    }

    /// Path of the initramfs.
    pub fn initramfs(&self) -> PathBuf {
        self.dir.join(&self.manifest.initramfs.path)
    }
}

/// `<root>` when `exe` is `<root>/target/<profile>/<name>` (or `<root>/target/<triple>/<profile>/<name>`)
/// and `<root>` holds a `Cargo.toml`.
fn workspace_root_of(exe: &Path) -> Option<PathBuf> {
    exe.ancestors()
        .skip(1)
        .find(|dir| dir.file_name().is_some_and(|name| name == "target"))
        .and_then(Path::parent)
        .filter(|root| root.join("Cargo.toml").is_file())
        .map(Path::to_path_buf)
}

/// How closely [`GuestImage::open_checking`] compares the files with the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Size and SHA-256 (`husk check`, `husk run`).
    Digest,
    /// Size only: what each pod boot of the shim does. Hashing ~20 MB costs tens of milliseconds
    /// on every pod start for a root-owned directory that `husk check` verifies in full; a
    /// half-written or stale image still shows as a size mismatch.
    Size,
}

fn verify_file(path: &Path, expected: &ImageFile, check: Check) -> Result<(), GuestImageError> {
    let read_error = |cause| GuestImageError::Read { path: path.to_path_buf(), cause };
    let size = fs::metadata(path).map_err(read_error)?.len();
    if size != expected.size {
        return Err(GuestImageError::Mismatch {
            path: path.to_path_buf(),
            what: "size",
            found: size.to_string(),
            expected: expected.size.to_string(),
        });
    }
    if check == Check::Size {
        return Ok(());
    }
    let bytes = fs::read(path).map_err(read_error)?;
    let digest = hex(&Sha256::digest(&bytes));
    if digest != expected.sha256 {
        return Err(GuestImageError::Mismatch {
            path: path.to_path_buf(),
            what: "sha256",
            found: digest,
            expected: expected.sha256.clone(),
        });
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_image(dir: &Path, api: u32) {
        fs::write(dir.join("vmlinux"), b"kernel").unwrap();
        fs::write(dir.join("initramfs.cpio"), b"initramfs").unwrap();
        let file = |path: &str, bytes: &[u8]| ImageFile {
            path: path.into(),
            sha256: hex(&Sha256::digest(bytes)),
            size: bytes.len() as u64,
        };
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            kernel: file("vmlinux", b"kernel"),
            initramfs: file("initramfs.cpio", b"initramfs"),
            agent: AgentInfo { version: "0.1.0".into(), api, sha256: "00".into() },
            inputs: Default::default(),
        };
        fs::write(dir.join(MANIFEST_FILE), serde_json::to_string(&manifest).unwrap()).unwrap();
    }

    #[test]
    fn a_consistent_image_opens() {
        let dir = tempfile::tempdir().unwrap();
        write_image(dir.path(), husk_protocols::AGENT_API_VERSION);
        let image = GuestImage::open(dir.path()).unwrap();
        assert_eq!(image.kernel(), dir.path().join("vmlinux"));
    }

    #[test]
    fn a_modified_kernel_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        write_image(dir.path(), husk_protocols::AGENT_API_VERSION);
        fs::write(dir.path().join("vmlinux"), b"KERNEL").unwrap();
        let err = GuestImage::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("vmlinux") && err.contains("sha256"), "{err}");
        // A size check does not see a same-size change, but sees a truncated file.
        GuestImage::open_checking(dir.path(), Check::Size).unwrap();
        fs::write(dir.path().join("vmlinux"), b"KERN").unwrap();
        let err = GuestImage::open_checking(dir.path(), Check::Size).unwrap_err().to_string();
        assert!(err.contains("vmlinux") && err.contains("size"), "{err}");
    }

    #[test]
    fn an_agent_of_another_api_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_image(dir.path(), husk_protocols::AGENT_API_VERSION + 1);
        assert!(matches!(GuestImage::open(dir.path()), Err(GuestImageError::AgentApi { .. })));
    }

    #[test]
    fn workspace_root_is_found_from_a_target_binary() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("Cargo.toml"), "").unwrap();
        let exe = dir.path().join("target/debug/husk");
        assert_eq!(workspace_root_of(&exe).as_deref(), Some(dir.path()));
        assert_eq!(workspace_root_of(Path::new("/usr/bin/husk")), None);
    }
}
