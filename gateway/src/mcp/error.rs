//! Errors the gateway answers itself, each knowing its JSON-RPC code, its HTTP status and the id
//! of the request it answers.

use super::id::Id;

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;
/// 2026-07-28: a routing header disagrees with the body.
pub const HEADER_MISMATCH: i64 = -32020;
/// 2026-07-28: unsupported protocol version.
pub const UNSUPPORTED_VERSION: i64 = -32022;
/// Unknown or expired session (the code the TypeScript SDK uses); HTTP 404 tells the client to
/// initialize again.
pub const SESSION_NOT_FOUND: i64 = -32001;
/// Gateway-defined: the upstream failed, timed out or closed mid-stream.
pub const UPSTREAM_ERROR: i64 = -32003;

/// A `Last-Event-ID` the gateway did not give its caller (see `proxy::event_signer`).
pub const FOREIGN_EVENT_ID: &str = "`Last-Event-ID` is not the id of an event this gateway sent this caller: resume from the last event id the stream carried";

#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    pub id: Option<Id>,
    pub http_status: u16,
    pub data: Option<serde_json::Value>,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>, http_status: u16) -> Self {
        Self {
            code,
            message: message.into(),
            id: None,
            http_status,
            data: None,
        }
    }

    pub fn parse(detail: impl std::fmt::Display) -> Self {
        Self::new(PARSE_ERROR, format!("parse error: {detail}"), 400)
    }

    pub fn invalid_request(detail: impl Into<String>) -> Self {
        Self::new(INVALID_REQUEST, detail, 400)
    }

    pub fn invalid_params(detail: impl Into<String>) -> Self {
        Self::new(INVALID_PARAMS, detail, 400)
    }

    pub fn upstream(detail: impl Into<String>, http_status: u16) -> Self {
        Self::new(UPSTREAM_ERROR, detail, http_status)
    }

    pub fn with_id(mut self, id: Option<Id>) -> Self {
        self.id = id;
        self
    }

    pub fn with_data(mut self, data: serde_json::Value) -> Self {
        self.data = Some(data);
        self
    }

    /// The JSON-RPC error response.
    pub fn to_json(&self) -> serde_json::Value {
        let mut error = serde_json::json!({ "code": self.code, "message": self.message });
        if let Some(data) = &self.data {
            error["data"] = data.clone();
        }
        serde_json::json!({
            "jsonrpc": "2.0",
            "id": self.id.as_ref().map_or(serde_json::Value::Null, Id::to_json),
            "error": error,
        })
    }

    pub fn body(&self) -> Vec<u8> {
        super::json_bytes(&self.to_json())
    }
}

/// A value that would have put a control character into an outgoing head: refused with 400.
impl From<crate::http::UnsafeField> for RpcError {
    fn from(e: crate::http::UnsafeField) -> Self {
        Self::invalid_request(e.to_string())
    }
}
