//! Concurrency caps shared with the fleet: this host's counts sent, the others' summed.

use super::*;

impl<B: Bans> Agent<B> {
    /// The concurrency caps configured, as the fleet names them, with what each counts:
    /// `in-flight/tenant/<tenant>`, `in-flight/tool/<tenant>/<rule's label>` (the keys the
    /// policy takes their slots under) and `connections/<tenant>`; at most [`CAPS_MAX`].
    pub(super) fn caps(&self) -> Vec<(String, CapOf)> {
        let snap = self.shared.snapshot.load();
        let limits = &self.shared.limits;
        let mut caps = Vec::new();
        for t in &snap.policy.tenants {
            if t.max_concurrent.is_some() {
                caps.push((
                    format!("in-flight/tenant/{}", t.name),
                    CapOf::InFlight(limits.key(("in-flight", &t.name))),
                ));
            }
            for r in t.rules().filter(|r| r.max_concurrent.is_some()) {
                caps.push((
                    format!("in-flight/tool/{}/{}", t.name, r.label),
                    CapOf::InFlight(limits.key(("in-flight", &t.name, &r.label))),
                ));
            }
        }
        for t in &snap.config.tenants {
            if t.max_connections.is_some() {
                caps.push((format!("connections/{}", t.name), CapOf::Conns(t.id)));
            }
        }
        caps.truncate(CAPS_MAX);
        caps
    }

    /// Publishes what this host holds under each concurrency cap (when it changed, and at
    /// every heartbeat) and reads the other live hosts' counts (see [`CAPS`]), every round
    /// while a cap is configured; a cap no longer configured is published once as 0 (a field
    /// gone counts as its last value on the other hosts). `None`: no cap.
    pub(super) fn caps_cmd(&mut self, beat: bool) -> Option<(redis::Cmd, Vec<CapSent>)> {
        let caps = self.caps();
        if caps.is_empty() && self.caps_sent.is_empty() {
            self.shared.fleet.caps.store(0, Relaxed);
            self.shared.fleet.in_flight_others.store(0, Relaxed);
            return None;
        }
        let limits = &self.shared.limits;
        let mut sent: Vec<CapSent> = Vec::with_capacity(caps.len());
        for (name, of) in caps {
            let here = match of {
                CapOf::InFlight(key) => u64::from(limits.in_flight_here(key)),
                CapOf::Conns(id) => self.shared.conns.total(id),
            };
            let send = beat || self.caps_sent.get(&name) != Some(&here);
            sent.push(CapSent {
                name,
                of: Some(of),
                here: send.then_some(here),
            });
        }
        let gone: Vec<String> = self
            .caps_sent
            .keys()
            .filter(|n| !sent.iter().any(|c| c.name == **n))
            .cloned()
            .collect();
        sent.extend(gone.into_iter().map(|name| CapSent {
            name,
            of: None,
            here: Some(0),
        }));
        let mut cmd = evalsha(S_CAPS, sent.len());
        for c in &sent {
            cmd.arg(self.keys.cap(&c.name));
        }
        cmd.arg(&self.host).arg(self.peers.len());
        for p in &self.peers {
            cmd.arg(p);
        }
        let secret = self.fleet.secret.as_ref();
        for c in &sent {
            match c.here {
                None => cmd.arg(""),
                Some(n) => cmd.arg(seal(
                    secret,
                    &self.fleet.name,
                    "caps",
                    &cap_field(&c.name, &self.host),
                    &n.to_string(),
                )),
            };
        }
        Some((cmd, sent))
    }

    /// Takes the other hosts' counts a caps exchange read (`peers`: the hosts it asked for, in
    /// order): each cap's sum over the live hosts becomes what its workers count as held
    /// elsewhere. A value not sealed with the fleet's secret, or unreadable (counted as
    /// ignored), or gone counts as the host's last valid count (its host writes it again at
    /// its next heartbeat): who writes Redis without the secret cannot lower a count.
    pub(super) fn absorb_caps(
        &mut self,
        sent: Vec<CapSent>,
        peers: &[String],
        reply: &[redis::Value],
    ) {
        let secret = self.fleet.secret.as_ref();
        let fleet = self.fleet.name.as_str();
        let mut ignored = reply.get(sent.len()).and_then(int).unwrap_or(0).max(0) as u64;
        let mut conns: Vec<(u32, u64)> = Vec::new();
        let mut in_flight = 0u64;
        let mut shared = 0u64;
        let mut seen: HashMap<String, u64> = HashMap::new();
        for (cap, row) in sent.into_iter().zip(reply) {
            let Some(of) = cap.of else {
                self.caps_sent.remove(&cap.name);
                continue;
            };
            if let Some(n) = cap.here {
                self.caps_sent.insert(cap.name.clone(), n);
            }
            shared += 1;
            let mut others = 0u64;
            if let redis::Value::Array(row) = row {
                for (peer, v) in peers.iter().zip(row) {
                    let raw = text(v).unwrap_or_default();
                    let field = cap_field(&cap.name, peer);
                    let last = self.caps_seen.get(&field).copied();
                    let n = match open(secret, fleet, "caps", &field, raw).and_then(parse_count) {
                        Some(n) => n,
                        // Not published yet (0), or gone (Redis lost it, or someone deleted
                        // it): the host's last count stands until it writes it again, at its
                        // next heartbeat at the latest.
                        None if raw.is_empty() => match last {
                            Some(n) => n,
                            None => continue,
                        },
                        None => {
                            // Not sealed with the fleet's secret, or unreadable: the host's
                            // last valid count stands until it writes its own again.
                            ignored += 1;
                            last.unwrap_or(0)
                        }
                    };
                    others = others.saturating_add(n);
                    seen.insert(field, n);
                }
            }
            match of {
                CapOf::InFlight(key) => {
                    in_flight = in_flight.saturating_add(others);
                    self.shared
                        .limits
                        .set_in_flight_others(key, u32::try_from(others).unwrap_or(u32::MAX));
                }
                CapOf::Conns(id) => conns.push((id, others)),
            }
        }
        self.caps_seen = seen;
        self.shared.limits.set_conns_others(&conns);
        // The first exchange of a new host reads no peers (the heartbeat that names them is
        // answered in the same round): its caps stay at its share until one that did.
        if !peers.is_empty() || self.shared.fleet.hosts.load(Relaxed) <= 1 {
            self.shared.limits.set_fleet_caps_read();
        }
        self.shared.fleet.caps.store(shared, Relaxed);
        self.shared.fleet.in_flight_others.store(in_flight, Relaxed);
        self.count_ignored(ignored);
    }
}
