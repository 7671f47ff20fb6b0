//! Sessions ended on one gateway of the fleet, ended on all: sent to Redis and read back.

use super::*;

impl<B: Bans> Agent<B> {
    /// Takes the sessions ended here since the last round into the outbox; if the queue
    /// dropped some, those ended since the last take are found in the table.
    pub(super) fn take_ended(&mut self) {
        let ended = &self.shared.ended_sessions;
        let (fresh, overflowed) = ended.take_fresh(MAX_ENDED);
        let since = self.ended_taken_s.saturating_sub(1);
        self.ended_taken_s = crate::policy::limits::State::unix_s();
        let missed: Vec<u64> = if overflowed {
            ended
                .entries()
                .into_iter()
                .filter(|(_, when)| *when >= since)
                .map(|(k, _)| k)
                .collect()
        } else {
            Vec::new()
        };
        self.queue_ended(fresh.into_iter().chain(missed));
    }

    /// Queues ends to send, keeping the last [`MAX_ENDED`] (what the stream keeps).
    pub(super) fn queue_ended(&mut self, keys: impl IntoIterator<Item = u64>) {
        self.outbox.extend(keys);
        let over = self.outbox.len().saturating_sub(MAX_ENDED);
        self.outbox.drain(..over);
    }

    /// Every session ended known here, to be sent again (Redis lost them).
    pub(super) fn republish_ended(&mut self) {
        let mut all = self.shared.ended_sessions.entries();
        all.sort_unstable_by_key(|(_, when)| *when);
        self.queue_ended(all.into_iter().map(|(k, _)| k));
    }

    /// Sends sessions ended here and reads those ended elsewhere (see [`ENDED`]): when some
    /// wait to be sent, when the last read was cut short, or when `due` (the heartbeat's
    /// cadence). Answers the command and what it sends, read with [`Agent::absorb_ended`].
    pub(super) fn ended_cmd(&mut self, due: bool) -> Option<(redis::Cmd, Vec<u64>)> {
        if !due && self.outbox.is_empty() && !self.ended_more {
            return None;
        }
        let n = self.outbox.len().min(ENDED_SEND);
        let sent: Vec<u64> = self.outbox.drain(..n).collect();
        let mut cmd = evalsha(S_ENDED, 1);
        cmd.arg(self.keys.ended())
            .arg(&self.ended_cursor)
            .arg(ENDED_READ)
            .arg(MAX_ENDED);
        let secret = self.fleet.secret.as_ref();
        for k in &sent {
            cmd.arg(seal(
                secret,
                &self.fleet.name,
                "ended",
                "",
                &format!("{k:016x}"),
            ));
        }
        Some((cmd, sent))
    }

    /// What an ended sessions' exchange would have sent is sent at the next round.
    pub(super) fn ended_failed(&mut self, sent: Vec<u64>) {
        for k in sent.into_iter().rev() {
            self.outbox.push_front(k);
        }
    }

    /// Takes the sessions ended elsewhere that an [`ENDED`] exchange read. An entry not sealed
    /// with the fleet's secret, or unreadable, is ignored (and counted): who writes Redis
    /// without the secret ends no session.
    pub(super) fn absorb_ended(&mut self, sent: &[u64], reply: &[redis::Value]) {
        let secret = self.fleet.secret.as_ref();
        let fleet = self.fleet.name.as_str();
        let stats = &self.shared.fleet;
        stats
            .sessions_ended_sent
            .fetch_add(sent.len() as u64, Relaxed);
        let mut ignored = reply.first().and_then(int).unwrap_or(0).max(0) as u64;
        let reset = reply.get(1).and_then(int) == Some(1);
        let cursor = reply
            .get(2)
            .and_then(text)
            .filter(|c| is_stream_id(c))
            .unwrap_or("0-0")
            .to_owned();
        let entries = reply.get(3..).unwrap_or_default();
        let now_s = crate::policy::limits::State::unix_s();
        let mut received = 0u64;
        for pair in entries.chunks(2) {
            let [id, value] = pair else { continue };
            // When Redis added it: the hosts' clocks do not matter.
            let when = text(id)
                .and_then(|id| id.split_once('-'))
                .and_then(|(ms, _)| ms.parse::<u64>().ok())
                .map_or(now_s, |ms| ms / 1000);
            let key = text(value)
                .and_then(|raw| open(secret, fleet, "ended", "", raw))
                .filter(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|hex| u64::from_str_radix(hex, 16).ok());
            match key {
                Some(k) => {
                    if self.shared.ended_sessions.absorb(k, when) {
                        received += 1;
                    }
                }
                None => ignored += 1,
            }
        }
        stats.sessions_ended_received.fetch_add(received, Relaxed);
        self.count_ignored(ignored);
        self.ended_more = entries.len() / 2 >= ENDED_READ;
        if reset {
            // The entry this host read last is gone: Redis lost the stream (or someone deleted
            // it). Read again from the start, and what is known here is sent again.
            tracing::warn!(
                redis = shown(&self.fleet.redis),
                "fleet: the stream of ended sessions lost entries this host had read; the sessions ended known here are published again"
            );
            self.republish_ended();
        }
        self.ended_cursor = cursor;
    }
}
