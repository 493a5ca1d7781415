//! Errors of the task service, and how containerd sees them: a ttrpc status whose code tells
//! `ctr` and the CRI plugin what happened (NotFound for an unknown task, FailedPrecondition for a
//! call in the wrong state) and whose message names the container, the field or the file.

use containerd_shim_protos::ttrpc::{self, Code};

use super::bundle::BundleError;
use crate::agent_client::AgentError;
use crate::config::ConfigError;
use crate::guest_image::GuestImageError;
use crate::sandbox::{SandboxDirError, SandboxError};

/// See the module documentation.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Image(#[from] GuestImageError),
    #[error(transparent)]
    Sandbox(Box<SandboxError>),
    #[error(transparent)]
    Share(#[from] SandboxDirError),
    #[error("pod network: {0}")]
    Network(#[from] crate::network::NetworkError),
    /// The agent refused or failed a call; `report` says how the VM is doing.
    #[error("{source}{report}")]
    Agent { source: Box<AgentError>, report: String },
    #[error("{stream} {path}: {reason}")]
    Io { stream: &'static str, path: String, reason: String },
}

impl ShimError {
    pub fn io(stream: &'static str, path: &str, err: impl std::fmt::Display) -> ShimError {
        ShimError::Io { stream, path: path.to_owned(), reason: err.to_string() }
    }

    fn code(&self) -> Code {
        match self {
            ShimError::InvalidArgument(_) | ShimError::Bundle(_) | ShimError::Config(_) => {
                Code::INVALID_ARGUMENT
            }
            ShimError::NotFound(_) => Code::NOT_FOUND,
            ShimError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            ShimError::FailedPrecondition(_) | ShimError::Image(_) => Code::FAILED_PRECONDITION,
            ShimError::Agent { source, .. } => match **source {
                AgentError::Refused { code, .. } => code,
                _ => Code::UNAVAILABLE,
            },
            ShimError::Io { .. } | ShimError::Sandbox(_) | ShimError::Share(_) | ShimError::Network(_) => {
                Code::INTERNAL
            }
        }
    }
}

impl From<SandboxError> for ShimError {
    fn from(err: SandboxError) -> ShimError {
        ShimError::Sandbox(Box::new(err))
    }
}

impl From<AgentError> for ShimError {
    fn from(source: AgentError) -> ShimError {
        ShimError::Agent { source: Box::new(source), report: String::new() }
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(err: ShimError) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(err.code(), err.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_sees_the_code_and_the_message() {
        let err: ttrpc::Error = ShimError::NotFound("container c1: no such task".into()).into();
        match err {
            ttrpc::Error::RpcStatus(status) => {
                assert_eq!(status.code(), Code::NOT_FOUND);
                assert_eq!(status.message(), "container c1: no such task");
            }
            other => panic!("not a status: {other:?}"),
        }
    }
}
