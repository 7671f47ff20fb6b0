//! The admin API's connections (control thread, tokio), served by hyper with bounds a listener
//! open to a network needs: at most [`MAX_CONNECTIONS`] at once (so idle connections cannot
//! take the process's file descriptors, which the data plane shares: past it, the connection
//! that has waited longest for its next request is closed for the new one, and when every
//! connection is serving a request the new one is closed as it is accepted) and at most
//! [`MAX_PER_ADDRESS`] of them from one address (so one client cannot hold them all and keep
//! the others' scrapes and health checks out), a request head within [`HEAD_TIMEOUT`] (the wait for the next request on a
//! kept-alive connection counts: an idle connection is closed after it) and a body within
//! [`BODY_TIMEOUT`] (see `control::admin`), and a write that makes no progress for
//! [`WRITE_TIMEOUT`] ends the connection ([`WriteDeadline`]: a client that pipelines requests
//! and never reads its answers held its connection for as long as it liked, since hyper reads
//! no next head while an answer waits to be written). [`LOOPBACK_RESERVED`] places are kept
//! for connections from this host: clients elsewhere, eight addresses of them, could otherwise
//! take every place, and the host's own health checks and operator commands with them. axum's
//! own `serve` has none of these bounds.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Notify, watch};

/// Admin connections open at once.
pub const MAX_CONNECTIONS: usize = 128;
/// Admin connections open at once from one address (an IPv6 /64 counts as one address).
pub const MAX_PER_ADDRESS: usize = 16;
/// From the connection's start, or the end of its last answer, to the end of a request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// From the request head to the end of its body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// A write (an answer to a client that does not read it) waits at most this long for room.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Places only connections from a loopback address may take.
pub const LOOPBACK_RESERVED: usize = 16;

/// Who is at the other end of an admin connection, and on which address it arrived (what the
/// token-less admin API asks of the socket table).
#[derive(Clone, Debug)]
pub struct Peer {
    pub client: SocketAddr,
    pub local: Option<SocketAddr>,
    /// The user owning the client's end, once looked up (`None` inside: it could not be
    /// told): a connection's owner does not change, and each lookup is a query to the kernel.
    pub owner: Arc<std::sync::OnceLock<Option<u32>>>,
}

impl Peer {
    pub fn new(client: SocketAddr, local: Option<SocketAddr>) -> Self {
        Self {
            client,
            local,
            owner: Arc::default(),
        }
    }
}

/// An accepted connection's stream and its [`Peer`].
pub trait Accept {
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept(&mut self) -> impl Future<Output = (Self::Io, Peer)> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&mut self) -> (Self::Io, Peer) {
        loop {
            match tokio::net::TcpListener::accept(self).await {
                Ok((stream, client)) => {
                    let local = stream.local_addr().ok();
                    return (stream, Peer::new(client, local));
                }
                Err(e) => {
                    tracing::warn!("admin accept failed: {e}");
                    // Out of descriptors, say: the next try comes a little later.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// How many connections one address may have open, asked on each accept (a reload changes it).
pub type PerAddress = Arc<dyn Fn() -> usize + Send + Sync>;

/// Places for connections: at most `total` at once, and `per_address()` from one address.
#[derive(Clone)]
pub struct Slots {
    total: usize,
    /// Of `total`, places only loopback clients may take.
    reserved: usize,
    per_address: PerAddress,
    taken: Arc<Mutex<Taken>>,
}

/// Places taken in all, by address, and each by its connection.
#[derive(Default)]
struct Taken {
    all: usize,
    by: HashMap<IpAddr, usize>,
    /// Every place held, by its number.
    held: HashMap<u64, Held>,
    next: u64,
}

struct Held {
    address: IpAddr,
    /// Since when the connection waits for its client (`None` while a request is served): the
    /// one waiting longest gives its place up to a new connection when every place is taken.
    waiting_since: Option<Instant>,
    /// Told when its place was given up: its connection ends.
    given_up: Arc<Notify>,
    /// An answer waits for its client to take more of it: the place is not given up.
    writing: Arc<AtomicBool>,
}

/// A connection's place, given back when dropped.
pub struct Slot {
    taken: Arc<Mutex<Taken>>,
    number: u64,
    given_up: Arc<Notify>,
    writing: Arc<AtomicBool>,
}

/// Why a connection got no place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Every place is taken.
    Full,
    /// Its address holds as many as one address may.
    Address,
}

impl Slots {
    pub fn new(total: usize, reserved: usize, per_address: PerAddress) -> Self {
        Self {
            total,
            reserved,
            per_address,
            taken: Arc::default(),
        }
    }

    /// A place for a connection from `client`; when every place is taken, or every place its
    /// address may take, the place of the connection (of that address) that has waited
    /// longest for its client's next request is given up for it (that connection ends, and its
    /// address is returned, with the limit that was reached). Idle kept-alive connections from
    /// a few addresses held every place, keeping scrapes and health checks out; now holding a
    /// place takes a request in progress, which takes a credential (or the loopback address
    /// a token-less admin API listens on).
    pub fn take(&self, client: IpAddr) -> Result<(Slot, Option<(IpAddr, Refused)>), Refused> {
        // The client's source as every limit takes it.
        let address = crate::policy::limits::source_of(client);
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        let total = if client.to_canonical().is_loopback() {
            self.total
        } else {
            self.total.saturating_sub(self.reserved)
        };
        // The place of the connection that has waited longest for its client's next request
        // (of `only` this address, or of any), if one waits.
        let longest = |taken: &Taken, only: Option<IpAddr>| {
            taken
                .held
                .iter()
                .filter(|(_, h)| only.is_none_or(|a| h.address == a))
                .filter(|(_, h)| !h.writing.load(Ordering::Relaxed))
                .filter_map(|(n, h)| h.waiting_since.map(|since| (since, *n)))
                .min()
                .map(|(_, n)| n)
        };
        let mut freed = None;
        if taken.by.get(&address).copied().unwrap_or(0) >= (self.per_address)() {
            // Its address's idle connections give way to it, as all do when every place is
            // taken: 16 bare connections from loopback, sending nothing, kept every local
            // client (health checks, `gateway top`, upgrades) out (an attacker's review).
            let Some(n) = longest(&taken, Some(address)) else {
                return Err(Refused::Address);
            };
            let held = taken.give_back(n).expect("a place held");
            held.given_up.notify_one();
            freed = Some((held.address, Refused::Address));
        } else if taken.all >= total {
            let Some(n) = longest(&taken, None) else {
                return Err(Refused::Full);
            };
            let held = taken.give_back(n).expect("a place held");
            held.given_up.notify_one();
            freed = Some((held.address, Refused::Full));
        }
        *taken.by.entry(address).or_insert(0) += 1;
        taken.all += 1;
        let number = taken.next;
        taken.next += 1;
        let given_up = Arc::new(Notify::new());
        let writing = Arc::new(AtomicBool::new(false));
        taken.held.insert(
            number,
            Held {
                address,
                waiting_since: Some(Instant::now()),
                given_up: Arc::clone(&given_up),
                writing: Arc::clone(&writing),
            },
        );
        Ok((
            Slot {
                taken: Arc::clone(&self.taken),
                number,
                given_up,
                writing,
            },
            freed,
        ))
    }
}

impl Taken {
    /// Gives back place `n`, if it is still held.
    fn give_back(&mut self, n: u64) -> Option<Held> {
        let held = self.held.remove(&n)?;
        self.all -= 1;
        if let Some(count) = self.by.get_mut(&held.address) {
            *count -= 1;
            if *count == 0 {
                self.by.remove(&held.address);
            }
        }
        Some(held)
    }
}

impl Slot {
    /// Marks a request in progress until the returned guard drops: meanwhile the place is
    /// not given up for another connection.
    pub fn serving(self: &Arc<Self>) -> Serving {
        self.set_waiting(None);
        Serving(Arc::clone(self))
    }

    fn set_waiting(&self, since: Option<Instant>) {
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = taken.held.get_mut(&self.number) {
            held.waiting_since = since;
        }
    }

    /// Set by the connection while an answer waits for its client ([`WriteDeadline::marking`]).
    pub fn writing(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.writing)
    }

    /// Done when the place was given up for a new connection.
    pub async fn given_up(&self) {
        self.given_up.notified().await;
    }
}

/// A request in progress on a [`Slot`]'s connection.
pub struct Serving(Arc<Slot>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.set_waiting(Some(Instant::now()));
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        taken.give_back(self.number);
    }
}

/// Says a refused connection: counted, and said once per 1,000 of each kind, so that a flood
/// is not also a flood of lines.
pub fn say_refused(why: Refused, client: SocketAddr, refused: &mut [u64; 2]) {
    let n = &mut refused[why as usize];
    if n.is_multiple_of(1000) {
        match why {
            Refused::Full => tracing::warn!(
                %client,
                "admin API: {MAX_CONNECTIONS} connections are open, each in a request or a TLS handshake; a new one is closed ({} so far)",
                *n + 1
            ),
            Refused::Address => tracing::warn!(
                %client,
                "admin API: as many connections as one address may have are open from one \
                 address (admin.max_connections_per_address), a new one from there is closed \
                 ({} so far)",
                *n + 1
            ),
        }
    }
    *n += 1;
}

/// Serves `app` on what `listener` accepts until `stop` turns true; then accepts no more and
/// lets each open connection finish the request it is on.
pub async fn serve(
    mut listener: impl Accept,
    app: axum::Router,
    mut stop: watch::Receiver<bool>,
    per_address: PerAddress,
) {
    let slots = Slots::new(MAX_CONNECTIONS, LOOPBACK_RESERVED, per_address);
    let mut refused = [0u64; 2];
    let mut freed = [0u64; 2];
    loop {
        let (io, peer) = tokio::select! {
            () = stopped(&mut stop) => return,
            accepted = listener.accept() => accepted,
        };
        let slot = match slots.take(peer.client.ip()) {
            Ok((slot, given_up_by)) => {
                if let Some((idle, reached)) = given_up_by {
                    // Counted, and said once per 1,000, by the limit reached.
                    let freed = &mut freed[reached as usize];
                    if freed.is_multiple_of(1000) {
                        match reached {
                            Refused::Full => tracing::warn!(
                                client = %peer.client,
                                idle_from = %idle,
                                "admin API: {MAX_CONNECTIONS} connections are open; the one idle \
                                 longest is closed for a new one ({} so far)",
                                *freed + 1
                            ),
                            Refused::Address => tracing::warn!(
                                client = %peer.client,
                                "admin API: as many connections as one address may have are \
                                 open from one address (admin.max_connections_per_address); \
                                 the one of them idle longest is closed for a new one ({} so far)",
                                *freed + 1
                            ),
                        }
                    }
                    *freed += 1;
                }
                Arc::new(slot)
            }
            Err(why) => {
                say_refused(why, peer.client, &mut refused);
                continue;
            }
        };
        let app = hyper_util::service::TowerToHyperService::new(
            app.clone()
                .layer(axum::Extension(axum::extract::ConnectInfo(peer))),
        );
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let marks = Arc::clone(&slot);
            // A request in progress holds its place, and so does an answer waiting for its
            // client to take more of it (a large answer to a slow reader was cut for a new
            // connection); between requests the place can be given up for a new connection
            // (`Slots::take`).
            let service = hyper::service::service_fn(move |req| {
                let serving = marks.serving();
                let answer = hyper::service::Service::call(&app, req);
                async move {
                    let answer = answer.await;
                    drop(serving);
                    answer
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(
                    TokioIo::new(WriteDeadline::new(io, WRITE_TIMEOUT).marking(slot.writing())),
                    service,
                );
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = slot.given_up() => {}
                () = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

/// A connection whose writes fail (`TimedOut`) once one has waited [`WRITE_TIMEOUT`] for room
/// without any progress: the answer goes nowhere, and the connection is closed.
pub struct WriteDeadline<Io> {
    io: Io,
    timeout: Duration,
    /// Armed while a write waits.
    waiting: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Set while a write waits, for others to see ([`WriteDeadline::marking`]).
    blocked: Option<Arc<AtomicBool>>,
}

impl<Io> WriteDeadline<Io> {
    pub fn new(io: Io, timeout: Duration) -> Self {
        Self {
            io,
            timeout,
            waiting: None,
            blocked: None,
        }
    }

    /// Sets `blocked` while a write waits for room, and clears it when one goes through.
    pub fn marking(mut self, blocked: Arc<AtomicBool>) -> Self {
        self.blocked = Some(blocked);
        self
    }

    /// `poll`'s result, unless a write has waited too long: then `TimedOut`.
    fn bounded<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        poll: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::task::Poll;
        if let Some(blocked) = &self.blocked {
            blocked.store(poll.is_pending(), Ordering::Relaxed);
        }
        if poll.is_ready() {
            self.waiting = None;
            return poll;
        }
        let timeout = self.timeout;
        let timer = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the admin client read nothing of its answer in time",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<Io: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteDeadline<Io> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<Io: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteDeadline<Io> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        self.bounded(cx, poll)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.bounded(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let poll = std::pin::Pin::new(&mut self.io).poll_flush(cx);
        self.bounded(cx, poll)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let poll = std::pin::Pin::new(&mut self.io).poll_shutdown(cx);
        self.bounded(cx, poll)
    }
}

/// Once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A place taken and serving a request, so that it is not given up for another.
    fn busy(taken: Result<(Slot, Option<(IpAddr, Refused)>), Refused>) -> (Arc<Slot>, Serving) {
        let slot = Arc::new(taken.expect("a place").0);
        let serving = slot.serving();
        (slot, serving)
    }

    #[test]
    fn places_are_bounded_in_all_and_by_address() {
        let slots = Slots::new(5, 0, Arc::new(|| 2));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let a_mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let b_same_64: IpAddr = "2001:db8::ffff:1".parse().unwrap();
        let c: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        let a1 = busy(slots.take(a));
        let _a2 = busy(slots.take(a_mapped));
        assert_eq!(
            slots.take(a).err(),
            Some(Refused::Address),
            "one address, mapped or not"
        );
        let _b1 = busy(slots.take(b));
        let _b2 = busy(slots.take(b_same_64));
        assert_eq!(slots.take(b).err(), Some(Refused::Address), "one /64");
        let _c1 = busy(slots.take(c));
        assert_eq!(slots.take(c).err(), Some(Refused::Full), "five in all");
        drop(a1);
        let _c2 = busy(Ok(slots
            .take(c)
            .expect("a place given back is taken again")));
        assert_eq!(slots.take(a).err(), Some(Refused::Full));
    }

    /// Past the cap, the connection waiting longest for its next request gives its place up;
    /// one serving a request never does, and a place given up is not given back twice.
    #[tokio::test]
    async fn the_connection_idle_longest_makes_room_and_one_serving_does_not() {
        let slots = Slots::new(3, 0, Arc::new(|| 10));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = Arc::new(slots.take(ip("192.0.2.1")).unwrap().0);
        tokio::time::sleep(Duration::from_millis(2)).await;
        let b = Arc::new(slots.take(ip("192.0.2.2")).unwrap().0);
        tokio::time::sleep(Duration::from_millis(2)).await;
        let c = Arc::new(slots.take(ip("192.0.2.3")).unwrap().0);
        let a_serving = a.serving();
        let (d, freed) = slots.take(ip("192.0.2.4")).unwrap();
        assert_eq!(
            freed,
            Some((ip("192.0.2.2"), Refused::Full)),
            "b waited longest; a is serving"
        );
        tokio::time::timeout(Duration::from_secs(1), b.given_up())
            .await
            .expect("b is told");
        drop(b);
        let _c_serving = c.serving();
        let _d_serving = Arc::new(d).serving();
        assert_eq!(
            slots.take(ip("192.0.2.5")).err(),
            Some(Refused::Full),
            "every connection is serving"
        );
        drop(a_serving);
        let (_e, freed) = slots.take(ip("192.0.2.5")).unwrap();
        assert_eq!(
            freed,
            Some((ip("192.0.2.1"), Refused::Full)),
            "a, done serving"
        );
        drop(a);
        let taken = slots.taken.lock().unwrap();
        assert_eq!((taken.all, taken.held.len(), taken.by.len()), (3, 3, 3));
    }

    /// An address at its cap whose connections wait idle: the one idle longest gives way to a
    /// new one of that address (idle connections of one address kept its every new client
    /// out); one that serves a request does not.
    #[tokio::test]
    async fn an_addresss_idle_connections_give_way_to_its_new_one() {
        let slots = Slots::new(100, 0, Arc::new(|| 2));
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let first = Arc::new(slots.take(local).unwrap().0);
        tokio::time::sleep(Duration::from_millis(2)).await;
        let _second = Arc::new(slots.take(local).unwrap().0);
        let (third, freed) = slots.take(local).expect("the idle one gives way");
        assert_eq!(freed, Some((local, Refused::Address)));
        tokio::time::timeout(Duration::from_secs(1), first.given_up())
            .await
            .expect("the first is told");
        drop(first);
        let _serving = [Arc::new(third).serving(), Arc::clone(&_second).serving()];
        assert_eq!(slots.take(local).err(), Some(Refused::Address));
    }

    /// Clients elsewhere leave [`LOOPBACK_RESERVED`] places to this host's own.
    #[test]
    fn places_are_kept_for_this_host() {
        let slots = Slots::new(LOOPBACK_RESERVED + 2, LOOPBACK_RESERVED, Arc::new(|| 100));
        let far: IpAddr = "192.0.2.1".parse().unwrap();
        let _far = [busy(slots.take(far)), busy(slots.take(far))];
        assert_eq!(slots.take(far).err(), Some(Refused::Full));
        let mut here = Vec::new();
        for local in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
            here.push(slots.take(local.parse().unwrap()).unwrap());
        }
        assert_eq!(here.len(), 3);
    }

    /// A write that waits for room longer than its timeout fails; one that makes progress
    /// does not.
    #[tokio::test]
    async fn a_write_that_waits_too_long_fails() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (near, mut far) = tokio::io::duplex(64);
        let mut near = WriteDeadline::new(near, Duration::from_millis(100));
        near.write_all(&[0; 64]).await.unwrap();
        let mut buf = [0; 64];
        far.read_exact(&mut buf).await.unwrap();
        near.write_all(&[0; 64]).await.unwrap();
        let e = near.write_all(&[0; 1]).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    }

    #[test]
    fn an_address_without_connections_is_forgotten() {
        let slots = Slots::new(4, 0, Arc::new(|| 2));
        for i in 0..1000u32 {
            drop(slots.take(IpAddr::from(i.to_be_bytes())).unwrap());
        }
        let taken = slots.taken.lock().unwrap();
        assert_eq!(taken.all, 0);
        assert!(taken.by.is_empty() && taken.held.is_empty());
    }
}
