//! A host-mode husk-agent (`--listen unix:PATH --shared DIR`) for container tests without a VM,
//! a busybox image in its shared directory, and OCI specs for it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use husk_protocols::agent::{CreateSandboxRequest, Stdio};
use husk_protocols::StdioStream;
use husk_shim::agent_client::{AgentAddress, AgentClient, AgentError};
use oci_spec::runtime::{ProcessBuilder, Spec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::target_bin;

/// Name of the busybox image directory in the shared directory (a spec's `root.path`).
pub const BUSYBOX_IMAGE: &str = "busybox";
/// The static busybox of Debian's busybox-static, which the image is made of.
const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "ls", "touch", "id", "wc", "grep", "true", "false", "head", "ps", "mount",
];

/// A host-mode agent on a unix socket in a temporary directory; killed on drop.
#[derive(Debug)]
pub struct HostAgent {
    child: Child,
    pub socket: PathBuf,
    pub shared: PathBuf,
    dir: tempfile::TempDir,
}

impl HostAgent {
    /// Starts this workspace's agent with an empty shared directory.
    pub fn start() -> std::io::Result<HostAgent> {
        HostAgent::start_binary(&target_bin("husk-agent"))
    }

    /// Starts the agent `binary` with an empty shared directory.
    pub fn start_binary(binary: &Path) -> std::io::Result<HostAgent> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("agent.sock");
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared)?;
        let child = Command::new(binary)
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--shared")
            .arg(&shared)
            .spawn()?;
        let mut agent = HostAgent { child, socket, shared, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !agent.socket.exists() {
            if Instant::now() > deadline || agent.child.try_wait()?.is_some() {
                return Err(std::io::Error::other(format!(
                    "husk-agent did not create {}",
                    agent.socket.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(agent)
    }

    /// Starts this workspace's agent with the busybox image in its shared directory.
    pub fn with_busybox() -> std::io::Result<HostAgent> {
        HostAgent::binary_with_busybox(&target_bin("husk-agent"))
    }

    /// Starts the agent `binary` with the busybox image in its shared directory.
    pub fn binary_with_busybox(binary: &Path) -> std::io::Result<HostAgent> {
        let agent = HostAgent::start_binary(binary)?;
        install_busybox(&agent.shared.join(BUSYBOX_IMAGE))?;
        Ok(agent)
    }

    /// The agent's state directory (bundles, runtime records).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("agent.sock.state")
    }

    /// A client connected to the agent, after Check and CreateSandbox.
    pub async fn client(&self) -> Result<AgentClient, AgentError> {
        let client =
            AgentClient::connect(AgentAddress::Unix(self.socket.clone()), Duration::from_secs(30)).await?;
        client.check().await?;
        let sandbox = CreateSandboxRequest { sandbox_id: "host-mode-pod".into(), ..Default::default() };
        match client.create_sandbox(&sandbox).await {
            Ok(()) => Ok(client),
            // A second client of the same agent: the sandbox exists already.
            Err(err) if err.to_string().contains("ALREADY_EXISTS") => Ok(client),
            Err(err) => Err(err),
        }
    }
}

impl Drop for HostAgent {
    /// SIGTERM (the agent removes its containers and exits), SIGKILL if it does not within 10 s.
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A one-binary busybox rootfs at `dir`.
pub fn install_busybox(dir: &Path) -> std::io::Result<()> {
    for sub in ["bin", "proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    std::fs::copy(BUSYBOX, dir.join("bin/busybox"))?;
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet))?;
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n",
    )?;
    std::fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")
}

/// The default (runc-like) spec running `args` in the busybox image.
pub fn busybox_spec(args: &[&str]) -> Spec {
    let mut spec = Spec::default();
    if let Some(root) = spec.root_mut() {
        root.set_path(PathBuf::from(BUSYBOX_IMAGE));
    }
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(args.iter().map(|a| (*a).to_owned()).collect()));
    process.set_terminal(Some(false));
    spec.set_process(Some(process));
    spec
}

/// JSON of `spec` with `resources` (an OCI `linux.resources` object) set.
pub fn spec_json_with_resources(spec: &Spec, resources: serde_json::Value) -> Vec<u8> {
    let mut value = serde_json::to_value(spec).unwrap_or_default();
    if let Some(linux) = value.get_mut("linux").and_then(serde_json::Value::as_object_mut) {
        linux.insert("resources".into(), resources);
    }
    serde_json::to_vec(&value).unwrap_or_default()
}

/// JSON of `spec`.
pub fn spec_json(spec: &Spec) -> Vec<u8> {
    serde_json::to_vec(spec).unwrap_or_default()
}

/// JSON of an OCI process running `args` as root in `/`.
pub fn process_json(args: &[&str]) -> Vec<u8> {
    oci_process_json(args, false)
}

/// JSON of an OCI process running `args` as root in `/` on a terminal.
pub fn terminal_process_json(args: &[&str]) -> Vec<u8> {
    oci_process_json(args, true)
}

fn oci_process_json(args: &[&str], terminal: bool) -> Vec<u8> {
    let process = ProcessBuilder::default()
        .args(args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>())
        .cwd("/")
        .env(vec!["PATH=/bin".to_owned()])
        .terminal(terminal)
        .build()
        .map(|p| serde_json::to_vec(&p).unwrap_or_default());
    process.unwrap_or_default()
}

/// The streams a test opened for one process.
#[derive(Debug, Default)]
pub struct TestStdio {
    pub stdin: Option<UnixStream>,
    pub stdout: Option<UnixStream>,
    pub stderr: Option<UnixStream>,
}

impl TestStdio {
    /// Opens the streams `stdio` names.
    pub async fn open(client: &AgentClient, stdio: &Stdio) -> Result<TestStdio, AgentError> {
        let mut streams = TestStdio::default();
        if stdio.stdin {
            streams.stdin = Some(client.open_stdio(&stdio.token, StdioStream::Stdin).await?);
        }
        if stdio.stdout {
            streams.stdout = Some(client.open_stdio(&stdio.token, StdioStream::Stdout).await?);
        }
        if stdio.stderr {
            streams.stderr = Some(client.open_stdio(&stdio.token, StdioStream::Stderr).await?);
        }
        Ok(streams)
    }

    /// Writes `bytes` to stdin.
    pub async fn write_stdin(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self.stdin.as_mut() {
            Some(stdin) => stdin.write_all(bytes).await,
            None => Err(std::io::Error::other("no stdin stream")),
        }
    }

    /// Reads stdout and stderr to their ends.
    pub async fn output(&mut self) -> (String, String) {
        async fn drain(stream: Option<&mut UnixStream>) -> String {
            let mut text = String::new();
            if let Some(stream) = stream {
                let _ = stream.read_to_string(&mut text).await;
            }
            text
        }
        let (out, err) = tokio::join!(drain(self.stdout.as_mut()), drain(self.stderr.as_mut()));
        (out, err)
    }
}

/// Creates and starts container `id` from `spec` with stdout and stderr (and stdin if `stdin`)
/// streams opened under the token `id`.
pub async fn start_container(
    client: &AgentClient,
    id: &str,
    spec: &Spec,
    stdin: bool,
) -> Result<TestStdio, AgentError> {
    let stdio = stdio(id, stdin);
    let streams = TestStdio::open(client, &stdio).await?;
    client.create_container(id, spec_json(spec), stdio).await?;
    client.start_container(id).await?;
    Ok(streams)
}

/// Stdio of a process with a terminal: stdin and the pty's output under `token`.
pub fn terminal_stdio(token: &str) -> Stdio {
    Stdio { token: token.to_owned(), stdin: true, stdout: true, terminal: true, ..Default::default() }
}

/// Stdio with stdout and stderr (and stdin if `stdin`) under `token`.
pub fn stdio(token: &str, stdin: bool) -> Stdio {
    Stdio { token: token.to_owned(), stdin, stdout: true, stderr: true, ..Default::default() }
}
