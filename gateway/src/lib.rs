//! The MCP gateway daemon as a library: everything testable lives here, `main.rs` only parses
//! the command line.
//!
//! Threads: one tokio control thread ([`control`]) owns configuration, the kernel program and
//! its maps, and the admin API; one monoio worker per core ([`runtime`]) serves traffic.

pub mod admin_server;
pub mod clock;
pub mod config;
pub mod control;
pub mod endpoints;
pub mod fleet;
pub mod host;
pub mod http;
pub mod kernel;
pub mod keys;
pub mod load;
pub mod mcp;
pub mod otlp;
pub mod policy;
pub mod runtime;
pub mod service;
pub mod session;
pub mod shared;
pub mod standard_metrics;
pub mod state;
pub mod stats;
pub mod stdio;
pub mod telemetry;
pub mod tls;
pub mod top;
pub mod upgrade;
pub mod values;
