//! A connection's caller judged again by a later configuration: a reload that revokes an API
//! key, a JWT key or a certificate's mapping, removes a tenant or a route, or takes a method
//! off a route's `auth`, cuts the open connections whose caller it would no longer admit
//! (`mcp::worker::OpenConns::cut_refused`), as a ban does: an event stream open under the old
//! configuration does not run on for as long as its upstream keeps it going.
//!
//! What is kept per connection is what its last request was admitted as: the route's path,
//! the tenant's name and the agent, and each credential by what the configuration knows it by
//! (an API key's SHA-256, the print of the JWT key that signed a token, the connection's
//! client certificate), never the secret itself.

use super::{Identity, Policy, Via, mtls};
use crate::config::{AuthMethod, Config};

/// One credential a request carried, as kept for its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// An API key, by its SHA-256 (what `[[auth.api_keys]]` lists).
    ApiKey([u8; 32]),
    /// A JWT, by the print of the key that verified it. The token is not kept: a reload that
    /// keeps the key but changes the issuer, audience or claims is held against the next
    /// request, not against the open one.
    Jwt([u8; 32]),
    /// The connection's client certificate (kept with the connection: see
    /// `mcp::worker::OpenConns::certified`).
    Certificate,
}

/// What a request was admitted as: its route, its caller, and the credentials that named it.
#[derive(Debug, Clone)]
pub struct Admission {
    route: Box<str>,
    tenant: Box<str>,
    agent: Option<Box<str>>,
    via: Via,
    proofs: Box<[Proof]>,
}

impl Admission {
    /// `who`, admitted by `policy` on the route at `route` with `proofs`.
    pub fn new(policy: &Policy, route: &str, who: &Identity, proofs: &[Proof]) -> Self {
        Self {
            route: route.into(),
            tenant: policy.tenants[who.tenant].name.as_str().into(),
            agent: who.agent.as_deref().map(Into::into),
            via: who.via,
            proofs: proofs.into(),
        }
    }

    /// Whether it is what [`Admission::new`] would make of these.
    pub fn is(&self, policy: &Policy, route: &str, who: &Identity, proofs: &[Proof]) -> bool {
        *self.route == *route
            && *self.tenant == *policy.tenants[who.tenant].name
            && self.agent.as_deref() == who.agent.as_deref()
            && self.via == who.via
            && *self.proofs == *proofs
    }

    /// Whether `config` (and its compiled `policy`) admits the same caller on the same route:
    /// the route is there and accepts the way it came, every credential still names the same
    /// tenant and agent, and the address (`address_tenant`, its tenant id) does not contradict
    /// it. `cert`: the connection's client certificate, if it presented one.
    pub fn holds(
        &self,
        config: &Config,
        policy: &Policy,
        address_tenant: u32,
        cert: Option<&mtls::PeerCert>,
    ) -> bool {
        let Some(route) = config.routes.iter().find(|r| *r.path == *self.route) else {
            return false;
        };
        let Some(&tenant) = policy.by_name.get(&*self.tenant) else {
            return false;
        };
        let by_address = policy.tenant_index(address_tenant);
        let address_classified = by_address != policy.default_tenant;
        if route.auth.is_empty() {
            return self.via == Via::Address && tenant == by_address;
        }
        let accepts = |m: AuthMethod| route.auth.contains(&m);
        if self.proofs.is_empty() {
            return self.via == Via::Address
                && accepts(AuthMethod::Address)
                && address_classified
                && tenant == by_address;
        }
        let agent = self.agent.as_deref();
        let same = |t: usize, a: Option<&str>| t == tenant && a == agent;
        let each = self.proofs.iter().all(|p| match p {
            Proof::ApiKey(digest) => {
                accepts(AuthMethod::ApiKey)
                    && policy
                        .api_keys
                        .get(digest)
                        .is_some_and(|k| same(k.tenant, k.agent.as_deref()))
            }
            Proof::Jwt(print) => {
                accepts(AuthMethod::Jwt)
                    && policy
                        .jwt
                        .as_ref()
                        .is_some_and(|j| j.keys.iter().any(|k| k.print == *print))
            }
            Proof::Certificate => {
                accepts(AuthMethod::Mtls)
                    && cert.is_some_and(|c| {
                        matches!(policy.mtls.caller(c),
                            mtls::Mapped::Caller(t, a, _) if same(t, a.as_deref()))
                    })
            }
        });
        each && (!address_classified || tenant == by_address)
    }
}

#[cfg(test)]
#[path = "rejudge_tests.rs"]
mod tests;
