//! Protocol versions the gateway speaks (`MCP-Protocol-Version`).

/// Every version in use, oldest first.
pub const SUPPORTED: &[&str] = &[
    "2024-11-05",
    "2025-03-26",
    "2025-06-18",
    "2025-11-25",
    "2026-07-28",
];

/// The version assumed for a request that carries no `MCP-Protocol-Version` header.
pub const ASSUMED_WITHOUT_HEADER: &str = "2025-03-26";

/// The newest version with `initialize` and sessions.
pub const LATEST_SESSION_ERA: &str = "2025-11-25";

/// The version of the stateless era: no `initialize`, routing headers.
pub const STATELESS: &str = "2026-07-28";

pub fn is_supported(v: &str) -> bool {
    SUPPORTED.contains(&v)
}

/// Whether the version still allowed JSON-RPC batches (removed in 2025-06-18).
pub fn allows_batches(v: &str) -> bool {
    v <= "2025-03-26"
}

/// Whether `v` is of the stateless era (2026-07-28 or later): routing headers, no sessions.
pub fn is_stateless_era(v: &str) -> bool {
    v >= STATELESS
}
