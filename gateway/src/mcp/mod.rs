//! MCP over Streamable HTTP: JSON-RPC parsing and validation, protocol versions, the errors the
//! gateway answers itself, and forwarding to upstream servers.

pub mod error;
pub mod federation;
pub mod headers;
pub mod jsonrpc;
pub mod proxy;
pub mod session;
pub mod sse;
pub mod version;

pub use error::RpcError;
pub use jsonrpc::{Id, Kind, Message, Parsed, Parser};
