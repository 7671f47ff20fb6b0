//! Bans and tool-pin approvals exchanged with the fleet, sealed where a secret is set.

use super::*;

/// How far apart the ends of a ban kept by a host and of a ban the fleet lifted may be for
/// them to be the same ban: a ban's end is kept to the second in the state store, and its time
/// left is read back from the kernel's map.
const LIFT_SAME_END_MS: u64 = 2_000;

impl<B: Bans> Agent<B> {
    /// Sends the bans made here and takes those made elsewhere (into the kernel's ban map, by
    /// the control thread's ban path); a ban lifted here is lifted in the fleet.
    /// `read`: the bans' hash as [`Agent::read_hash_cmd`] read it.
    pub(super) async fn exchange_bans(
        &mut self,
        c: &mut MultiplexedConnection,
        read: HashRead,
    ) -> redis::RedisResult<()> {
        let key = self.keys.bans();
        // Read with the epoch, atomically: bans read from a Redis that lost its data since this
        // round's budgets would look lifted everywhere; the next round re-seeds it instead.
        // A value this host cannot read is ignored (and deleted), never a failed round.
        let (epoch, remote) = read;
        if epoch.is_none() || epoch != self.epoch {
            return Ok(());
        }
        let now = unix_ms();
        let secret = self.fleet.secret.as_ref();
        let fleet = self.fleet.name.as_str();
        let mut remote_live: HashMap<IpAddr, u64> = HashMap::new();
        // A lift is a `lifted:<end>` left until the lifted ban's end (sealed with a secret, so
        // that a ban deleted from Redis by someone without it is not lifted). A host that kept
        // the ban (in its state store, over a restart, or killed before it flushed the lift)
        // lifts it when it comes back, instead of publishing it again as a new ban.
        let mut lifted: HashMap<IpAddr, u64> = HashMap::new();
        let mut ended: Vec<Vec<u8>> = Vec::new();
        // Bans in Redis not sealed with the fleet's secret (or unreadable): never applied.
        let mut forged: HashSet<IpAddr> = HashSet::new();
        for (field, raw) in remote {
            let Some((k, ip)) = std::str::from_utf8(&field)
                .ok()
                .and_then(|k| Some((k, k.parse::<IpAddr>().ok()?)))
            else {
                self.shared.fleet.unsealed_ignored.fetch_add(1, Relaxed);
                ended.push(field);
                continue;
            };
            let raw = String::from_utf8_lossy(&raw);
            let value = open(secret, fleet, "bans", k, &raw).and_then(|v| {
                match v.strip_prefix("lifted:") {
                    Some(until) => until.parse::<u64>().ok().map(|u| (u, true)),
                    None => v.parse::<u64>().ok().map(|u| (u, false)),
                }
            });
            match value {
                Some((until, false)) if until > now => {
                    remote_live.insert(ip.to_canonical(), until);
                }
                Some((until, true)) if until > now => {
                    lifted.insert(ip.to_canonical(), until);
                }
                Some(_) => ended.push(field),
                None => {
                    self.shared.fleet.unsealed_ignored.fetch_add(1, Relaxed);
                    tracing::warn!(source = %ip, "fleet: a ban in Redis is not sealed with the fleet's secret (or unreadable); ignored");
                    // Replaced below by this host's own ban if it has one, else removed.
                    ended.push(field);
                    forged.insert(ip.to_canonical());
                }
            }
        }
        let local: HashMap<IpAddr, Duration> = self
            .bans
            .local()
            .into_iter()
            .map(|(ip, left)| (ip.to_canonical(), left))
            .collect();
        let mut pipe = redis::pipe();
        for k in &ended {
            pipe.hdel(&key, k).ignore();
        }
        // A lift is kept here until the lifted ban's end, and published again when Redis lost
        // it (its data flushed or evicted): a gateway that kept the ban over a restart and came
        // back after the loss published it again as a new ban, and the fleet took it (an
        // operator's review). A ban of the address made since, here or elsewhere, ends it.
        self.lifts.retain(|ip, until| {
            *until > now && !remote_live.contains_key(ip) && !local.contains_key(ip)
        });
        for (ip, until) in lifted.iter().filter(|(ip, _)| !local.contains_key(ip)) {
            let kept = self.lifts.entry(*ip).or_insert(*until);
            *kept = (*kept).max(*until);
        }
        for (ip, until) in &self.lifts {
            if !lifted.contains_key(ip) {
                let field = ip.to_string();
                let lift = seal(secret, fleet, "bans", &field, &format!("lifted:{until}"));
                pipe.hset(&key, field, lift).ignore();
            }
        }
        for (ip, until) in &remote_live {
            if !local.contains_key(ip) {
                if self.known_bans.contains(ip) {
                    // Known to the fleet, gone here: lifted by the operator here.
                    let field = ip.to_string();
                    let lift = seal(secret, fleet, "bans", &field, &format!("lifted:{until}"));
                    pipe.hset(&key, field, lift).ignore();
                    self.known_bans.remove(ip);
                    self.lifts.insert(*ip, *until);
                    continue;
                }
                let left = Duration::from_millis(until - now);
                if !self.bans.ban(*ip, left) {
                    continue;
                }
                self.known_bans.insert(*ip);
                self.shared.fleet.bans_received.fetch_add(1, Relaxed);
                tracing::warn!(source = %ip, ban_s = left.as_secs(), "fleet: banned here as another gateway of the fleet banned it");
            } else {
                self.known_bans.insert(*ip);
            }
        }
        let mut sent: HashSet<IpAddr> = HashSet::new();
        for (ip, left) in &local {
            let known = self.known_bans.contains(ip);
            let ends = now.saturating_add(u64::try_from(left.as_millis()).unwrap_or(u64::MAX));
            // At the first exchange of this process (a ban held now was kept over a restart),
            // not known here, and the fleet lifted a ban of the same end: the same ban. A ban
            // made later is never taken for it (one made again within 2 s of its lift was
            // dropped so: a review), and one made before the restart that ends elsewhen is
            // published.
            if !self.bans_exchanged
                && !known
                && !remote_live.contains_key(ip)
                && lifted
                    .get(ip)
                    .is_some_and(|until| until.abs_diff(ends) <= LIFT_SAME_END_MS)
            {
                self.bans.unban(*ip);
                tracing::info!(source = %ip, "fleet: a ban kept here was lifted in the fleet meanwhile; lifted here too");
                continue;
            }
            // With a secret, a known ban gone from Redis without a sealed lift (and not about
            // to end) was deleted by someone without the secret: published again, not lifted.
            let deleted = secret.is_some()
                && known
                && !remote_live.contains_key(ip)
                && !lifted.contains_key(ip)
                && *left > Duration::from_secs(2);
            if deleted && !forged.contains(ip) {
                tracing::warn!(source = %ip, "fleet: a ban was deleted from Redis without a sealed lift; published again");
            }
            if forged.contains(ip) || deleted || !known && !remote_live.contains_key(ip) {
                let left = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
                let field = ip.to_string();
                let until = seal(
                    secret,
                    fleet,
                    "bans",
                    &field,
                    &now.saturating_add(left).to_string(),
                );
                pipe.hset(&key, field, until).ignore();
                self.known_bans.insert(*ip);
                sent.insert(*ip);
                self.shared.fleet.bans_sent.fetch_add(1, Relaxed);
            }
        }
        // Known, gone from the fleet (lifted elsewhere, or ended; with a secret, by a sealed
        // lift): lifted here too.
        let gone: Vec<IpAddr> = self
            .known_bans
            .iter()
            .filter(|ip| !remote_live.contains_key(ip) && !sent.contains(ip))
            .copied()
            .collect();
        for ip in gone {
            self.known_bans.remove(&ip);
            if local.contains_key(&ip) {
                self.bans.unban(ip);
                tracing::info!(source = %ip, "fleet: ban lifted here as it was lifted in the fleet");
            }
        }
        if pipe.cmd_iter().next().is_some() {
            let _: () = pipe.query_async(c).await?;
        }
        self.bans_exchanged = true;
        Ok(())
    }

    /// Reads a hash of the fleet's and the epoch, atomically ([`READ_HASH`]); either key of the
    /// wrong type is deleted (and counted). The reply is read with [`Agent::parse_read_hash`].
    pub(super) fn read_hash_cmd(&self, key: &str) -> redis::Cmd {
        let mut cmd = evalsha(S_READ_HASH, 2);
        cmd.arg(key).arg(self.keys.epoch());
        cmd
    }

    /// The epoch and the fields and values a [`READ_HASH`] answered.
    pub(super) fn parse_read_hash(&self, reply: Vec<redis::Value>) -> HashRead {
        let mut reply = reply.iter();
        self.count_ignored(reply.next().and_then(int).unwrap_or(0).max(0) as u64);
        let epoch = reply
            .next()
            .and_then(text)
            .filter(|e| !e.is_empty())
            .map(str::to_owned);
        let rest: Vec<&redis::Value> = reply.collect();
        let pairs = rest
            .chunks(2)
            .filter_map(|p| match p {
                [k, v] => Some((bytes(k)?.to_vec(), bytes(v)?.to_vec())),
                _ => None,
            })
            .collect();
        (epoch, pairs)
    }

    /// Sends pins first seen, approved or found changed here, and takes those of elsewhere: an
    /// approval on one host unhides the tool on all, and a changed definition one host found
    /// is held on all, those that never listed the tool too (they pin what the fleet pinned).
    /// Before, a host took only approvals of tools it had listed itself: on another host, a
    /// client that calls without listing called the changed tool the fleet held (an attacker's
    /// review).
    /// `read`: the pins' hash as [`Agent::read_hash_cmd`] read it.
    pub(super) async fn exchange_pins(
        &mut self,
        c: &mut MultiplexedConnection,
        read: HashRead,
    ) -> redis::RedisResult<()> {
        let key = self.keys.pins();
        let (_, remote) = read;
        let remote: HashMap<String, String> = remote
            .into_iter()
            .filter_map(|(k, v)| {
                // A field that is not UTF-8 names no tool of this host's: left alone.
                Some((
                    String::from_utf8(k).ok()?,
                    String::from_utf8_lossy(&v).into_owned(),
                ))
            })
            .collect();
        let mut pipe = redis::pipe();
        let mut any = false;
        let secret = self.fleet.secret.as_ref();
        let fleet = self.fleet.name.as_str();
        let held = |p: &crate::policy::pins::Pin| p.pending.as_ref().map(|(d, _)| d.clone());
        let local = self.shared.pins.snapshot();
        let known: HashSet<&str> = local.iter().map(|(n, _)| n.as_str()).collect();
        let upstreams: HashSet<String> = self
            .shared
            .snapshot
            .load()
            .config
            .upstreams
            .iter()
            .map(|u| u.name.clone())
            .collect();
        // Pins of the fleet this host has none of, for its own upstreams: taken as they are,
        // but for a name a listing here would not pin by first sight (one that hides a
        // character, or reads as another pinned or offered name of its upstream: a record
        // written into Redis made a lookalike of a pinned tool visible on a host that never
        // listed it, a review). Such a name is left to this host's own listings.
        let mut looks: HashMap<String, usize> = HashMap::new();
        for name in remote
            .keys()
            .map(String::as_str)
            .chain(known.iter().copied())
        {
            if let Some((up, tool)) = name.split_once('/') {
                *looks
                    .entry(crate::policy::pins::looks_key(up, tool))
                    .or_default() += 1;
            }
        }
        for (name, raw) in &remote {
            let Some((up, tool)) = name.split_once('/') else {
                continue;
            };
            if !upstreams.contains(up) || known.contains(name.as_str()) {
                continue;
            }
            let plain = !crate::policy::pins::hides_characters(tool)
                && looks
                    .get(&crate::policy::pins::looks_key(up, tool))
                    .is_some_and(|n| *n == 1)
                && self.shared.pins.looks_like(up, tool).is_none();
            if !plain {
                continue;
            }
            let Some(mut theirs) = open(secret, fleet, "pins", name, raw)
                .and_then(|j| serde_json::from_str::<crate::policy::pins::Pin>(j).ok())
            else {
                continue;
            };
            theirs.configured = None;
            self.agreed_pins
                .insert(name.clone(), theirs.approved.clone());
            self.agreed_pending.insert(name.clone(), held(&theirs));
            self.shared.pins.restore(name.clone(), theirs);
        }
        for (name, pin) in local {
            let raw = remote.get(&name);
            let theirs = raw
                .and_then(|r| open(secret, fleet, "pins", &name, r))
                .and_then(|j| serde_json::from_str::<crate::policy::pins::Pin>(j).ok());
            let forged = raw.is_some() && theirs.is_none();
            if forged {
                // Not sealed with the fleet's secret (or unreadable): ignored, and replaced by
                // what this host knows.
                self.shared.fleet.unsealed_ignored.fetch_add(1, Relaxed);
                tracing::warn!(tool = %name, "fleet: a pin in Redis is not sealed with the fleet's secret (or unreadable); ignored");
            }
            let publish = |pipe: &mut redis::Pipeline, nx: bool| {
                let Ok(j) = serde_json::to_string(&strip(&pin)) else {
                    return false;
                };
                let j = seal(secret, fleet, "pins", &name, &j);
                if nx {
                    pipe.hset_nx(&key, &name, j).ignore();
                } else {
                    pipe.hset(&key, &name, j).ignore();
                }
                true
            };
            let agreed = self.agreed_pins.get(&name);
            match theirs {
                None => {
                    any |= publish(&mut pipe, !forged);
                    self.agreed_pins.insert(name.clone(), pin.approved.clone());
                    self.agreed_pending.insert(name, held(&pin));
                }
                Some(theirs) if theirs.approved == pin.approved => {
                    self.agreed_pins.insert(name.clone(), pin.approved.clone());
                    let (mine, fleets) = (held(&pin), held(&theirs));
                    if mine != fleets {
                        let changed_here = self.agreed_pending.get(&name) != Some(&mine);
                        if changed_here {
                            // Found changed by a listing here, or rejected here.
                            any |= publish(&mut pipe, false);
                            self.agreed_pending.insert(name, mine);
                        } else {
                            // Found changed elsewhere: held here too.
                            let mut adopted = (*pin).clone();
                            adopted.pending = theirs.pending;
                            self.agreed_pending.insert(name.clone(), fleets);
                            self.shared.pins.restore(name, adopted);
                        }
                    } else {
                        self.agreed_pending.insert(name, mine);
                    }
                }
                Some(theirs) => {
                    let changed_here = agreed.is_some_and(|a| *a != pin.approved);
                    if changed_here || pin.configured.is_some() {
                        // Approved here since the last agreement: the fleet takes it.
                        any |= publish(&mut pipe, false);
                        self.agreed_pins.insert(name.clone(), pin.approved.clone());
                        self.agreed_pending.insert(name, held(&pin));
                    } else {
                        // Approved elsewhere: taken here, with what the fleet holds for
                        // approval, or else what waits here unless it is what was approved.
                        let fleets = held(&theirs);
                        let mut adopted = theirs;
                        adopted.configured = None;
                        if adopted.pending.is_none() {
                            adopted.pending =
                                pin.pending.clone().filter(|(d, _)| *d != adopted.approved);
                        }
                        tracing::info!(
                            tool = %name,
                            approved = %adopted.approved,
                            "fleet: tool definition approved by another gateway of the fleet"
                        );
                        self.agreed_pins
                            .insert(name.clone(), adopted.approved.clone());
                        // A change still held here and not in the fleet is sent next round.
                        self.agreed_pending.insert(name.clone(), fleets);
                        self.shared.pins.restore(name, adopted);
                        self.shared.fleet.approvals_received.fetch_add(1, Relaxed);
                    }
                }
            }
        }
        if any {
            let _: () = pipe.query_async(c).await?;
        }
        Ok(())
    }
}
