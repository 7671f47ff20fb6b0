//! The id of a JSON-RPC request, which its answer carries.

/// A JSON-RPC id: MCP allows a string or an integer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Id {
    Num(i64),
    Str(String),
}

/// The integer a string id stands for to a client, if any ([`Id::compared`]).
pub fn integer_of(s: &str) -> Option<i64> {
    s.parse::<i64>().ok().filter(|n| n.to_string() == s)
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

    /// The id as clients compare ids: a string that is an integer written in decimal as an
    /// integer is written (`"7"`, not `"07"` nor `"+7"`) is that integer (the Python SDK's
    /// client takes an answer with `"7"` for request 7).
    pub fn compared(&self) -> Result<i64, &str> {
        match self {
            Id::Num(n) => Ok(*n),
            Id::Str(s) => integer_of(s).ok_or(s),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Id::Num(n) => serde_json::Value::from(*n),
            Id::Str(s) => serde_json::Value::from(s.as_str()),
        }
    }
}
