//! Privileged tests (root): the real XDP program, loaded into this kernel. Run by
//! `cargo xtask test`, one at a time (`--test-threads=1`) so that timing-based checks are not
//! disturbed by each other on small machines.

mod appliance;
mod config_help;
mod containment;
mod cors;
mod edge_combined;
mod fleet;
mod fleet_lan;
mod hardening_http;
mod hardening_io;
mod hardening_parse;
mod hardening_policy;
mod held_sessions;
mod https_upstream;
mod mcp_e2e;
mod netns_e2e;
mod observability_e2e;
mod observability_stack;
mod otlp;
mod package;
mod policy_e2e;
mod proxy_protocol;
mod replicas;
mod state_store;
mod stdio_e2e;
mod tls_edge;
mod upgrade;
mod xdp_decisions;
mod xtask_run;
