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
pub mod error;
pub mod federation;
pub mod headers;
mod held;
pub mod jsonrpc;
pub mod messages;
pub mod param_headers;
pub mod proxy;
mod relay;
pub mod sse;
mod stages;
mod stdio_route;
pub mod tasks;
pub mod upstream;
pub mod version;

pub use error::RpcError;

/// A JSON value as bytes. Serializing a `serde_json::Value` cannot fail (its map keys are
/// strings), so this is total; the one way to write JSON on the request path.
pub fn json_bytes(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}
pub use jsonrpc::{Id, Kind, Message, Parsed, Parser};
