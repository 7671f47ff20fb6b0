//! Where an upstream is and how it is reached, as a configuration load makes them: the
//! addresses its hosts resolve to ([`Addresses`]), its replicas and their health
//! ([`Replicas`]), and the TLS client configuration of an https upstream ([`UpstreamTls`]).
//! Made on the control thread and carried in the configuration; workers only read them. Beside
//! them, the upstream side's counters ([`Stats`]), kept across reloads. The sending itself is
//! [`crate::mcp::upstream`]'s.

mod addresses;
mod counters;
mod replicas;
pub mod tls;

pub use addresses::{Addresses, MAX_ADDRESSES};
pub use counters::Stats;
pub use replicas::{Choice, Ejection, Endpoint, Replicas, Sticky, now_ms};
pub use tls::UpstreamTls;
