//! The gRPC client type used by agents, named once for both modes (tonic and madsim-tonic
//! spell the intercepted client differently).

use mas_core::ids::AgentId;
use mas_proto::runtime::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// Client interceptor. In production it does nothing (identity is the TLS certificate); under
/// simulation it stamps the agent's SPIFFE id into a header, since madsim has no TLS.
#[derive(Debug, Clone)]
pub struct IdentityStamp {
    #[cfg_attr(not(madsim), allow(dead_code))]
    spiffe_uri: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

impl IdentityStamp {
    /// An interceptor for `agent`.
    pub fn new(agent: &AgentId) -> Self {
        // Agent ids are [A-Za-z0-9_-], always valid ASCII metadata.
        let uri = crate::identity::spiffe_uri(agent);
        let spiffe_uri = uri.parse().unwrap_or_else(|_| tonic::metadata::MetadataValue::from_static(""));
        IdentityStamp { spiffe_uri }
    }
}

impl tonic::service::Interceptor for IdentityStamp {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        #[cfg(madsim)]
        let req = {
            let mut req = req;
            req.metadata_mut().insert(crate::identity::SIM_IDENTITY_HEADER, self.spiffe_uri.clone());
            req
        };
        Ok(req)
    }
}

/// The agent-side RPC client.
#[cfg(not(madsim))]
pub type RuntimeClient = RuntimeServiceClient<tonic::service::interceptor::InterceptedService<Channel, IdentityStamp>>;

/// The agent-side RPC client.
#[cfg(madsim)]
pub type RuntimeClient = RuntimeServiceClient<Channel, IdentityStamp>;

/// Wraps a connected channel into a client for `agent`.
pub fn runtime_client(channel: Channel, agent: &AgentId) -> RuntimeClient {
    RuntimeServiceClient::with_interceptor(channel, IdentityStamp::new(agent))
}
