//! The fleet-wide side of policy's limits: tokens of each fleet-wide rate leased to this host,
//! and each budget's spend sent and the fleet's totals read back.

use super::*;

impl<B: Bans> Agent<B> {
    /// Asks for each lease the tokens the last round's demand suggests (and one spare), at
    /// most two rounds of the fleet's rate: what a host holds unused is the bound by which the
    /// fleet may exceed its limit.
    /// Answers the command (see [`RATES`]) and, for each lease asked for, its key and the
    /// tokens asked; `None` when no lease needs tokens.
    pub(super) fn rates_cmd(&mut self) -> Option<(redis::Cmd, Vec<(u64, u64)>)> {
        let round_s = self.fleet.round.as_secs_f64();
        let mut asks: Vec<(u64, String, u64, u64, u64, u64)> = Vec::new();
        let hosts = self.shared.fleet.hosts.load(Relaxed).max(1);
        let mut idle: Vec<u64> = Vec::new();
        let mut leases = 0u64;
        self.shared.limits.for_each_lease(|key, lease| {
            leases += 1;
            // A lease in use that holds two rounds of what it was asked for since the last
            // round, and most of its share of the burst, is not asked for in every other round:
            // its demand counts at the next (so its want stays among the live wants Redis
            // shares the rate by, which are those of the last four rounds).
            let pending = lease.demand();
            let held = lease.tokens();
            let reserve = lease.burst.load(Relaxed).div_ceil(hosts).max(1);
            if pending > 0
                && held >= pending.saturating_add(1).saturating_mul(2)
                && held >= reserve - reserve / 4
                && self.rested.insert(key)
            {
                return;
            }
            self.rested.remove(&key);
            let demand = lease.take_demand();
            let rounds_idle = self.idle.entry(key).or_insert(0);
            if demand == 0 {
                *rounds_idle += 1;
                if *rounds_idle > IDLE_ROUNDS {
                    idle.push(key);
                    return;
                }
            } else {
                *rounds_idle = 0;
            }
            let rate = lease.rate.load(Relaxed);
            let burst = lease.burst.load(Relaxed);
            let cap = ((rate as f64 * round_s * 2.0).ceil() as u64).max(1);
            // Kept at hand: this host's share of the burst (`reserve`), so that a burst arriving
            // between two rounds is served (one spare token met 429 on the second of five quick
            // calls).
            let want = (demand + 1)
                .max(reserve)
                .saturating_sub(held)
                .min(cap.max(reserve));
            if want > 0 {
                asks.push((
                    key,
                    self.keys.rate(&lease.name, rate, burst.max(1)),
                    rate,
                    burst,
                    want,
                    held,
                ));
            }
        });
        self.shared.fleet.leases.store(leases, Relaxed);
        if !idle.is_empty() {
            for k in &idle {
                self.idle.remove(k);
                self.rested.remove(k);
            }
            self.shared.limits.drop_leases(&idle);
        }
        if asks.is_empty() {
            return None;
        }
        let mut cmd = evalsha(S_RATES, asks.len());
        for (_, name, ..) in &asks {
            cmd.arg(name);
        }
        cmd.arg(&self.host)
            .arg(
                u64::try_from(self.fleet.round.as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1),
            )
            .arg(self.peers.len());
        for p in &self.peers {
            cmd.arg(p);
        }
        for (_, _, rate, burst, want, held) in &asks {
            cmd.arg(*rate).arg((*burst).max(1)).arg(*want).arg(*held);
        }
        Some((
            cmd,
            asks.into_iter()
                .map(|(key, .., want, _)| (key, want))
                .collect(),
        ))
    }

    /// Adds to each lease what Redis granted of what [`Agent::rates_cmd`] asked.
    pub(super) fn absorb_rates(&mut self, asks: &[(u64, u64)], reply: &[redis::Value]) {
        let count = |v: &redis::Value| u64::try_from(int(v).unwrap_or(0)).unwrap_or(0);
        if let Some(bad) = reply.get(asks.len()) {
            self.count_ignored(count(bad));
        }
        // Never take more than was asked, whatever Redis answers (thousandths of a token).
        let granted: HashMap<u64, u64> = asks
            .iter()
            .zip(reply)
            .map(|((key, want), n)| (*key, count(n).min(want.saturating_mul(MILLI as u64))))
            .collect();
        let mut total = 0;
        self.shared.limits.for_each_lease(|key, lease| {
            if let Some(n) = granted.get(&key) {
                lease.grant_milli(*n);
                total += *n;
            }
        });
        self.shared.fleet.tokens_granted.fetch_add(total, Relaxed);
    }

    /// Publishes this host's spend in each budget window and takes the fleet's totals: the sum
    /// over the hosts of the highest-numbered valid spend seen of each (see [`BUDGETS`]).
    /// Answers the command and what it sent, read with [`Agent::absorb_budgets`]; `None` when
    /// the round has nothing to say or to learn of budgets (no budget configured, none
    /// counted or known here, nothing to write back) and `force` is not set.
    pub(super) fn budgets_cmd(&mut self, force: bool) -> Option<(redis::Cmd, BudgetRound)> {
        let mut counts = self.shared.limits.fleet_counts();
        // Runs last: the reads of a round are bounded, and the windows of tenants and agents
        // come first.
        counts.sort_by_key(|c| c.what.is_run());
        let quiet = counts.is_empty()
            && self.learned
            && self.own.is_empty()
            && self.seen.is_empty()
            && self.rewrite.is_empty()
            && self.drop_fields.is_empty()
            && !self
                .shared
                .snapshot
                .load()
                .policy
                .tenants
                .iter()
                .any(|t| t.budget.is_some());
        if quiet && !force {
            return None;
        }
        let secret = self.fleet.secret.clone();
        let fleet = self.fleet.name.clone();
        let mut seq = self.seq;
        // This host's spend after this round, kept once Redis has answered.
        let mut changed: Vec<(String, Spend)> = Vec::new();
        let mut puts: Vec<(String, String)> =
            std::mem::take(&mut self.rewrite).into_iter().collect();
        let mut gets: Vec<String> = Vec::new();
        let mut sent: HashMap<String, i64> = HashMap::new();
        for count in &counts {
            let Some(wf) = window_field(&count.what, count.len_s, count.window) else {
                continue;
            };
            let mine = format!("{wf}|{}", self.host);
            if self.learned {
                let amount = match self.own.get(&wf) {
                    Some(s) => s.amount.saturating_add(count.delta),
                    // First spend here in this window: what is above the others' spend.
                    None => {
                        (i64::try_from(count.used).unwrap_or(i64::MAX) - self.others(&wf)).max(0)
                    }
                };
                if self
                    .own
                    .get(&wf)
                    .map_or(amount != 0, |s| s.amount != amount)
                {
                    seq += 1;
                    let raw = seal(
                        secret.as_ref(),
                        &fleet,
                        "budgets",
                        &mine,
                        &format!("{amount}|{seq}"),
                    );
                    puts.push((mine.clone(), raw.clone()));
                    changed.push((wf.clone(), Spend { amount, seq, raw }));
                }
                sent.insert(wf.clone(), count.delta);
            }
            if gets.len() < BUDGET_GETS {
                gets.push(mine);
                if let Some(hosts) = self.seen.get(&wf) {
                    gets.extend(
                        hosts
                            .keys()
                            .take(BUDGET_GETS.saturating_sub(gets.len()))
                            .map(|h| format!("{wf}|{h}")),
                    );
                }
            }
        }
        let drops = std::mem::take(&mut self.drop_fields);
        let mut cmd = evalsha(S_BUDGETS, 2);
        cmd.arg(self.keys.budgets())
            .arg(self.keys.epoch())
            .arg(URL_SAFE_NO_PAD.encode(crate::session::new_key()))
            .arg(&self.cursor)
            // Larger steps until the hash was read whole once: budgets are closed until then.
            .arg(if self.shared.limits.fleet_unread() {
                BUDGET_SCAN * 8
            } else {
                BUDGET_SCAN
            })
            .arg(drops.len())
            .arg(puts.len());
        for f in &drops {
            cmd.arg(f);
        }
        for (f, v) in &puts {
            cmd.arg(f).arg(v);
        }
        for f in &gets {
            cmd.arg(f);
        }
        Some((
            cmd,
            BudgetRound {
                seq,
                changed,
                puts,
                gets,
                sent,
                drops,
            },
        ))
    }

    /// A budgets exchange that failed: what it would have deleted or written back is sent again
    /// next round (this host's new spend is worked out again from its counts).
    pub(super) fn budgets_failed(&mut self, round: BudgetRound) {
        self.drop_fields.extend(round.drops);
        // This host's own spend of the round is not: its sequence number was not kept, and the
        // next round publishes the spend anew, with it (the same number again would not
        // replace the older value in Redis).
        let own: HashSet<String> = round
            .changed
            .iter()
            .map(|(wf, _)| format!("{wf}|{}", self.host))
            .collect();
        self.rewrite
            .extend(round.puts.into_iter().filter(|(f, _)| !own.contains(f)));
    }

    /// Takes what a budgets exchange answered: the fleet's spend, merged into this host's counts.
    pub(super) fn absorb_budgets(&mut self, round: BudgetRound, reply: Vec<redis::Value>) {
        let BudgetRound {
            seq,
            changed,
            gets,
            sent,
            ..
        } = round;
        self.seq = seq;
        for (wf, s) in changed {
            self.own.insert(wf, s);
        }
        let mut reply = reply.iter();
        let epoch = reply.next().and_then(text).unwrap_or_default().to_owned();
        let mut ignored = reply.next().and_then(int).unwrap_or(0).max(0) as u64;
        self.cursor = reply
            .next()
            .and_then(text)
            .filter(|c| c.parse::<u64>().is_ok())
            .unwrap_or("0")
            .to_owned();
        let n = usize::try_from(reply.next().and_then(int).unwrap_or(0)).unwrap_or(0);
        if self.epoch.as_ref().is_some_and(|e| *e != epoch) {
            // Redis lost the fleet's state (FLUSHALL, eviction, a restart without persistence,
            // its epoch deleted): everything known here is published again.
            tracing::warn!(
                redis = shown(&self.fleet.redis),
                "fleet: Redis lost the fleet's state (its epoch is gone or changed); budgets, bans, approvals and ended sessions are published again from here"
            );
            self.shared.fleet.reseeds.fetch_add(1, Relaxed);
            self.agree_session = true;
            self.known_bans.clear();
            self.agreed_pins.clear();
            self.agreed_pending.clear();
            self.republish_ended();
            let own = self
                .own
                .iter()
                .map(|(wf, s)| (format!("{wf}|{}", self.host), s.raw.clone()));
            let others = self.seen.iter().flat_map(|(wf, hosts)| {
                hosts
                    .iter()
                    .map(move |(h, s)| (format!("{wf}|{h}"), s.raw.clone()))
            });
            let all: Vec<(String, String)> = own.chain(others).collect();
            self.rewrite.extend(all);
        }
        self.epoch = Some(epoch);
        for (field, value) in gets.iter().zip(reply.by_ref().take(n)) {
            match bytes(value) {
                Some([]) | None => {
                    // Gone from Redis (deleted by someone, or lost): published again.
                    if let Some(known) = self.known(field) {
                        self.rewrite.insert(field.clone(), known.raw.clone());
                    }
                }
                Some(raw) => ignored += self.absorb(field.as_bytes(), raw),
            }
        }
        let rest: Vec<&redis::Value> = reply.collect();
        for pair in rest.chunks(2) {
            if let [f, v] = pair {
                let (Some(f), Some(v)) = (bytes(f), bytes(v)) else {
                    continue;
                };
                ignored += self.absorb(f, v);
            }
        }
        self.count_ignored(ignored);
        // Windows that ended are forgotten.
        let now = crate::policy::limits::State::unix_s();
        let live = |wf: &String| parse_window_field(wf).filter(|w| w.end > now);
        self.own.retain(|wf, _| live(wf).is_some());
        // Each field read once: whether it is live, and whether it counts a run.
        let (mut count, mut runs) = (0, 0);
        self.seen.retain(|wf, hosts| {
            let Some(w) = live(wf).filter(|_| !hosts.is_empty()) else {
                return false;
            };
            count += hosts.len();
            if w.what.is_run() {
                runs += hosts.len();
            }
            true
        });
        self.seen_count = count;
        self.seen_runs = runs;
        if !self.learned {
            // The first read: this host's counts rise to the others' spend at once (a gateway
            // that starts after a budget was spent refuses from its first request); its own
            // spend is set at the next round, to what they hold above the others'.
            self.learned = true;
            let firsts: Vec<(String, i64)> = self
                .seen
                .keys()
                .map(|wf| (wf.clone(), self.others(wf)))
                .collect();
            for (wf, others) in firsts {
                if let Some(w) = parse_window_field(&wf) {
                    let total = u64::try_from(others.max(0)).unwrap_or(0);
                    self.shared
                        .limits
                        .fleet_floor(w.what, w.len_s, w.window, total);
                }
            }
            self.budgets_read_if_scanned();
            return;
        }
        let mut windows: HashSet<&String> = self.seen.keys().collect();
        windows.extend(self.own.keys());
        windows.extend(sent.keys());
        for wf in windows {
            let Some(w) = parse_window_field(wf) else {
                continue;
            };
            let total = self.own.get(wf).map_or(0, |s| s.amount) + self.others(wf);
            self.shared.limits.fleet_merge(
                w.what,
                w.len_s,
                w.window,
                sent.get(wf).copied().unwrap_or(0),
                u64::try_from(total.max(0)).unwrap_or(0),
            );
        }
        self.budgets_read_if_scanned();
    }

    /// Budgets open once the scan of the spend hash has gone round once (its cursor back at
    /// `0`): before, each round reads one step of it, and a host that opened them after its
    /// first step judged on counts that missed the spend further on (a review padded the hash
    /// with 15,000 fields: five new hosts each admitted a spent budget of five again).
    fn budgets_read_if_scanned(&self) {
        if self.cursor == "0" {
            self.shared.limits.set_fleet_budgets_read();
        }
    }

    /// The other hosts' spend in window `wf`, as known here.
    pub(super) fn others(&self, wf: &str) -> i64 {
        self.seen
            .get(wf)
            .map_or(0, |h| h.values().map(|s| s.amount).sum())
    }

    /// What this host knows of a budget field (`<window field>|<host>`).
    pub(super) fn known(&self, field: &str) -> Option<&Spend> {
        let (wf, host) = split_host(field)?;
        if host == self.host {
            self.own.get(wf)
        } else {
            self.seen.get(wf)?.get(host)
        }
    }

    /// Takes a budget field read from Redis: a valid value newer than known is remembered; one
    /// older than known (written back), or one this host does not write under its own name,
    /// is replaced by what is known; one that is not valid (unsealed, unreadable) is deleted.
    /// Answers how many values were ignored.
    pub(super) fn absorb(&mut self, field: &[u8], raw: &[u8]) -> u64 {
        let secret = self.fleet.secret.as_ref();
        let fleet = self.fleet.name.as_str();
        let parsed = std::str::from_utf8(field).ok().and_then(|f| {
            let (wf, host) = split_host(f)?;
            let run = parse_window_field(wf)?.what.is_run();
            let value = std::str::from_utf8(raw).ok()?;
            let spend = open(secret, fleet, "budgets", f, value).and_then(parse_spend)?;
            Some((f, wf, host, run, spend, value))
        });
        let Some((f, wf, host, run, (amount, seq), value)) = parsed else {
            self.drop_fields.push(field.to_vec());
            if let Some(known) = std::str::from_utf8(field).ok().and_then(|f| self.known(f)) {
                self.rewrite.insert(
                    String::from_utf8_lossy(field).into_owned(),
                    known.raw.clone(),
                );
            }
            return 1;
        };
        if host == self.host {
            return match self.own.get(wf) {
                Some(mine) if mine.seq != seq => {
                    // Not this host's latest: written back, or not by this host.
                    self.rewrite.insert(f.to_owned(), mine.raw.clone());
                    if seq > mine.seq {
                        self.drop_fields.push(field.to_vec());
                    }
                    1
                }
                _ => 0,
            };
        }
        let full = !room_for(self.seen_count, self.seen_runs, run);
        let hosts = self.seen.entry(wf.to_owned()).or_default();
        match hosts.get(host) {
            Some(known) if known.seq > seq => {
                // An older value written back: what is known here stands, and is published.
                self.rewrite.insert(f.to_owned(), known.raw.clone());
                1
            }
            Some(known) if known.seq == seq => 0,
            None if full => 1,
            known => {
                if known.is_none() {
                    self.seen_count += 1;
                    self.seen_runs += usize::from(run);
                }
                hosts.insert(
                    host.to_owned(),
                    Spend {
                        amount,
                        seq,
                        raw: value.to_owned(),
                    },
                );
                0
            }
        }
    }
}
