//! The id of a JSON-RPC request, which its answer carries.

/// A JSON-RPC id: MCP allows a string or an integer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Id {
    Num(i64),
    Str(String),
}

impl Id {
    /// The id a JSON value is, if it is one MCP allows.
    pub fn from_json(v: &serde_json::Value) -> Option<Self> {
        match v {
            serde_json::Value::Number(n) => n.as_i64().map(Id::Num),
            serde_json::Value::String(s) => Some(Id::Str(s.clone())),
            _ => None,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Id::Num(n) => serde_json::Value::from(*n),
            Id::Str(s) => serde_json::Value::from(s.as_str()),
        }
    }
}
