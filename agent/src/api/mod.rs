//! The agent API (`husk_protocols::agent_ttrpc::Agent`) as served by husk-agent: the handlers live
//! here, the transports in [`server`]. Calls this agent does not implement yet answer
//! `NOT_FOUND` with the call's name (the generated default), never a made-up result.

pub mod server;

use async_trait::async_trait;
use husk_protocols::agent::{CheckRequest, CheckResponse, GuestDetails, GuestDetailsRequest};
use husk_protocols::agent_ttrpc::Agent;
use husk_protocols::AGENT_API_VERSION;
use ttrpc::r#async::TtrpcContext;

use crate::guest_info;

/// The agent's API handlers.
#[derive(Debug, Default)]
pub struct AgentService;

/// A ttrpc error status with `code` and `message`.
fn status(code: ttrpc::Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

#[async_trait]
impl Agent for AgentService {
    async fn check(&self, _ctx: &TtrpcContext, req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        if req.api_version != AGENT_API_VERSION {
            return Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!(
                    "api_version: the host speaks agent API {}, this agent speaks {AGENT_API_VERSION}",
                    req.api_version
                ),
            ));
        }
        let uptime_ms =
            guest_info::uptime_ms().map_err(|err| status(ttrpc::Code::INTERNAL, format!("{err:#}")))?;
        Ok(CheckResponse {
            api_version: AGENT_API_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_ms,
            ..Default::default()
        })
    }

    async fn get_guest_details(
        &self,
        _ctx: &TtrpcContext,
        _req: GuestDetailsRequest,
    ) -> ttrpc::Result<GuestDetails> {
        guest_info::details().map_err(|err| status(ttrpc::Code::INTERNAL, format!("{err:#}")))
    }
}
