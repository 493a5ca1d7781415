//! `husk`: the operator's command-line tool.

use std::process::ExitCode;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use husk_shim::check::{CheckName, CheckReport};
use husk_shim::config::Config;
use husk_shim::run::RunOptions;

#[derive(Debug, Parser)]
#[command(name = "husk", version, about = "Husk: containers in KVM microVMs")]
struct Cli {
    /// Configuration file (default: $HUSK_CONFIG, else /etc/husk/configuration.toml if it exists).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Report whether this host can run Husk, and why not. Exits non-zero when it cannot.
    Check {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Run only these checks (repeatable).
        #[arg(long, value_enum)]
        only: Vec<CheckName>,
    },
    /// Run a command in a container in its own microVM, without containerd: ROOTFS is a root
    /// file system directory or an OCI bundle (a directory with config.json). Exits with the
    /// container's status.
    Run {
        /// Allocate a terminal.
        #[arg(short, long)]
        tty: bool,
        /// Attach stdin.
        #[arg(short, long)]
        interactive: bool,
        /// vCPUs (default: hypervisor.vcpus of the configuration).
        #[arg(long)]
        vcpus: Option<u8>,
        /// Guest memory in MiB (default: hypervisor.memory_mib).
        #[arg(long)]
        mem: Option<u64>,
        /// Guest image directory (default: hypervisor.image_dir, else the built or installed image).
        #[arg(long)]
        image: Option<PathBuf>,
        /// Seconds the guest agent may take to answer (default: agent.boot_timeout_s).
        #[arg(long)]
        agent_timeout_s: Option<u64>,
        rootfs: PathBuf,
        /// The command and its arguments (after `--`).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Print the effective configuration (TOML) and the file it came from.
    Env,
    /// Print Husk's version, the agent API version and the guest image's.
    Version,
}

fn main() -> Result<ExitCode> {
    // Before any thread: the VMM's filtered threads share this process's allocator.
    husk_vmm::seccomp::prepare_allocator();
    // Process-wide, so here and not in the library: the share's descriptors (`husk run`).
    if let Err(err) = husk_vmm::host::raise_fd_limit() {
        eprintln!("husk: cannot raise the open-file limit ({err}); big shares may fail");
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Commands::Check { json, only } => {
            let report = CheckReport::run(&only);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render_text());
            }
            Ok(if report.ready { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Commands::Run { tty, interactive, vcpus, mem, image, agent_timeout_s, rootfs, command } => {
            let config = match Config::load(cli.config.as_deref()) {
                Ok(loaded) => loaded.config,
                Err(err) => {
                    eprintln!("husk run: {err}");
                    return Ok(ExitCode::from(RUN_FAILED));
                }
            };
            let h = &config.hypervisor;
            let image_dir = (!h.image_dir.as_os_str().is_empty()).then(|| h.image_dir.clone());
            let options = RunOptions {
                target: rootfs,
                args: command,
                tty,
                interactive,
                vcpus: vcpus.unwrap_or(h.vcpus),
                mem_mib: mem.unwrap_or(h.memory_mib),
                image: image.or(image_dir),
                sandbox_root: config.runtime.sandbox_dir.clone(),
                kernel_params: h.kernel_params.clone(),
                seccomp: h.seccomp,
                fs_max_fds: h.virtio_fs_max_fds,
                agent_timeout: Duration::from_secs(agent_timeout_s.unwrap_or(config.agent.boot_timeout_s)),
            };
            run(&options)
        }
        Commands::Env => {
            let loaded = Config::load(cli.config.as_deref())?;
            match &loaded.source {
                Some(path) => println!("# from {}", path.display()),
                None => {
                    println!("# no configuration file ({}): the defaults", husk_shim::config::DEFAULT_PATH)
                }
            }
            print!("{}", loaded.config.render());
            Ok(ExitCode::SUCCESS)
        }
        Commands::Version => {
            println!("husk {}", env!("CARGO_PKG_VERSION"));
            println!("agent API {}", husk_protocols::AGENT_API_VERSION);
            match husk_shim::guest_image::GuestImage::locate() {
                Ok(image) => {
                    println!("guest image {} (agent {})", image.dir.display(), image.manifest.agent.version)
                }
                Err(err) => println!("guest image: {err}"),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Exit status of `husk run` when Husk itself failed (as `docker run` does), not the container.
const RUN_FAILED: u8 = 125;

/// `husk run`; SIGINT and SIGTERM end it (dropping the sandbox stops the VM and removes it all).
fn run(options: &RunOptions) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let status = runtime.block_on(async {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("handling SIGTERM")?;
        tokio::select! {
            status = husk_shim::run::run(options) => Ok(status?),
            _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; the VM was stopped"),
            _ = terminate.recv() => anyhow::bail!("terminated; the VM was stopped"),
        }
    });
    match status {
        Ok(status) => Ok(ExitCode::from(u8::try_from(status).unwrap_or(255))),
        Err(err) => {
            eprintln!("husk run: {err:#}");
            Ok(ExitCode::from(RUN_FAILED))
        }
    }
}
