//! MCP over Streamable HTTP: JSON-RPC parsing and validation, protocol versions, the errors the
//! gateway answers itself, and forwarding to upstream servers.
// The request path: input from clients and upstreams must never panic here (a panic that
// still happens is contained per request in `conn::serve`, but it is a defect).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented
    )
)]

mod abandoned;
pub mod answer;
mod bridge;
pub mod conn;
pub mod elide;
mod era;
pub mod error;
pub mod federation;
pub mod headers;
mod held;
pub mod id;
pub mod jsonrpc;
pub mod messages;
pub mod param_headers;
mod passthrough;
pub mod proxy;
mod relay;
pub mod sse;
mod stages;
mod stdio_route;
pub mod tasks;
pub mod upstream;
pub mod version;
pub(crate) mod worker;

pub use error::RpcError;

/// What the workers learn from upstreams' answers and share with each other (a list may pass
/// one worker and the call another): the tools' declared parameter headers and who owns each
/// task. Made once per process, by whoever starts the workers; nothing else reads it.
#[derive(Debug, Default)]
pub struct Learned {
    /// Each listed tool's `x-mcp-header` declarations (2026-07-28 `Mcp-Param-*` headers).
    pub param_headers: param_headers::Declarations,
    /// Who created each task on an upstream that cannot tell callers apart.
    pub tasks: tasks::Owners,
}

/// A JSON value as bytes. Serializing a `serde_json::Value` cannot fail (its map keys are
/// strings), so this is total; the one way to write JSON on the request path.
pub fn json_bytes(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// A client's JSON `body` as `edit` changes it, written again (a body that is not JSON is
/// `null`). What it was parsed into (16 to 32 bytes a value) is gone when this returns, so that
/// nothing holds it while an upstream answers: a federation's renamed call, a held session's
/// and a bridged call kept it, and 24 slow calls of 2 MB held 950 to 1,697 MiB (a review).
pub fn rewritten(body: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> bytes::Bytes {
    let mut v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    edit(&mut v);
    bytes::Bytes::from(json_bytes(&v))
}
pub use id::Id;
pub use jsonrpc::{Kind, Message, Parsed, Parser};
