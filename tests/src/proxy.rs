//! A TCP fault proxy: put it between a taskpod process and Postgres (or anything) to
//! inject the network faults a process kill cannot: a lost reply to a committed
//! transaction (an *ambiguous commit*), a request dropped on the wire, and a peer that
//! goes silent with its sockets still open (no FIN, no RST: only timeouts notice).
//!
//! Modes are switched at run time and apply to every connection, open or new:
//! - [`Mode::Pass`]: bytes flow both ways (also what [`FaultProxy::heal`] restores);
//! - [`Mode::ResetOn`]: when a client-to-server read contains `pattern` (also across
//!   two reads), both sockets are reset (RST, via a zero linger). With
//!   [`Delivery::Drop`] that read is not forwarded: the server never sees it. With
//!   [`Delivery::Deliver`] it is forwarded, the server's answer is awaited (at most
//!   [`REPLY_WAIT`]) and discarded, then both sides are reset: the server executed it
//!   (for `COMMIT`, committed it) and the client cannot know. A "message" is what one
//!   read returned; Postgres clients write a query's messages together, so it is one
//!   query in practice;
//! - [`Mode::Hold`]: no byte moves either way and every socket stays open; new
//!   connections are accepted and held too (the upstream connection is made only once
//!   the hold ends). What was sent meanwhile is delivered after healing, as TCP would
//!   after a partition;
//! - [`Mode::Strand`]: the connections open when it was set go silent as with
//!   [`Mode::Hold`], while later ones pass: a half-open connection (a NAT or load
//!   balancer that forgot it), which only a client's own timeouts can notice and a new
//!   connection cures;
//! - [`Mode::SilenceOn`]: a partition of a few connections only. The first
//!   `connections` connections whose client sends `pattern` forward that message (the
//!   server acts on it: for `COMMIT`, commits) and then go silent both ways with their
//!   sockets open, until healed; every other connection, open or new, passes. A client
//!   learns of it only from its own timeouts, and the server keeps its session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};

/// How long a [`Delivery::Deliver`] reset waits for the server's answer before
/// resetting anyway.
pub const REPLY_WAIT: Duration = Duration::from_secs(2);

/// What the proxy does with the bytes it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass,
    ResetOn {
        pattern: Vec<u8>,
        delivery: Delivery,
        /// Reset one connection only, then pass again: the fault hits one call, its
        /// retry goes through.
        once: bool,
    },
    Hold,
    /// Connections numbered below `below` (in accept order, from 0) are held; the
    /// others pass. See [`FaultProxy::strand_open`].
    Strand {
        below: u64,
    },
    /// Silences the next `connections` connections that carry `pattern`, right after
    /// forwarding it; the count goes down as they are taken.
    SilenceOn {
        pattern: Vec<u8>,
        connections: u32,
    },
    /// A dead pooler: every connection, open or new, is reset as soon as the client
    /// sends anything (new ones at once), so calls fail fast instead of hanging.
    Refuse,
}

/// Whether the message that triggers a reset reaches the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Not forwarded: the request is lost.
    Drop,
    /// Forwarded and answered, the answer lost: an ambiguous outcome.
    Deliver,
    /// The message carrying the pattern passes, and the next one from the same client
    /// is forwarded and its answer lost. A client that prepares statements (sqlx) sends
    /// a statement's text in a Parse message and runs it with the Bind and Execute
    /// that follow: this makes the statement run and its answer vanish.
    DeliverNext,
}

#[derive(Debug, Default)]
struct Stats {
    connections: AtomicU64,
    resets: AtomicU64,
    silenced: AtomicU64,
}

/// A running proxy; dropping it closes its listener and every connection.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    stats: Arc<Stats>,
    acceptor: AbortHandle,
}

impl Mode {
    /// Whether connection number `id` may move no byte in this mode.
    fn holds(&self, id: u64) -> bool {
        match self {
            Self::Hold => true,
            Self::Strand { below } => id < *below,
            _ => false,
        }
    }
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`, in [`Mode::Pass`].
    ///
    /// # Errors
    /// When no port can be bound.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the proxy")?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(Mode::Pass);
        let stats = Arc::new(Stats::default());
        let acceptor = tokio::spawn(accept_loop(
            listener,
            upstream,
            mode.clone(),
            Arc::clone(&stats),
        ))
        .abort_handle();
        Ok(Self {
            addr,
            upstream,
            mode,
            stats,
            acceptor,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    pub fn mode(&self) -> Mode {
        self.mode.borrow().clone()
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Back to [`Mode::Pass`]; held connections resume.
    pub fn heal(&self) {
        self.set_mode(Mode::Pass);
    }

    pub fn hold(&self) {
        self.set_mode(Mode::Hold);
    }

    /// Every connection open now goes silent (no byte either way, no FIN, no RST) until
    /// [`FaultProxy::heal`]; connections made after this pass.
    pub fn strand_open(&self) {
        self.set_mode(Mode::Strand {
            below: self.connections(),
        });
    }

    pub fn refuse(&self) {
        self.set_mode(Mode::Refuse);
    }

    pub fn reset_on(&self, pattern: &[u8], delivery: Delivery) {
        self.set_mode(Mode::ResetOn {
            pattern: pattern.to_vec(),
            delivery,
            once: false,
        });
    }

    /// Resets the first connection that carries `pattern`, then heals by itself.
    pub fn reset_once_on(&self, pattern: &[u8], delivery: Delivery) {
        self.set_mode(Mode::ResetOn {
            pattern: pattern.to_vec(),
            delivery,
            once: true,
        });
    }

    /// Silences the first `connections` connections that send `pattern`, after
    /// forwarding it, until [`FaultProxy::heal`] (see [`Mode::SilenceOn`]).
    pub fn silence_on(&self, pattern: &[u8], connections: u32) {
        self.set_mode(Mode::SilenceOn {
            pattern: pattern.to_vec(),
            connections,
        });
    }

    /// Connections silenced by [`Mode::SilenceOn`] so far.
    pub fn silenced(&self) -> u64 {
        self.stats.silenced.load(Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.stats.connections.load(Ordering::Relaxed)
    }

    /// Connections reset by [`Mode::ResetOn`] so far.
    pub fn resets(&self) -> u64 {
        self.stats.resets.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The acceptor owns the connections' JoinSet: aborting it drops them all.
        self.acceptor.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    stats: Arc<Stats>,
) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let id = stats.connections.fetch_add(1, Ordering::Relaxed);
        let _ = client.set_nodelay(true);
        connections.spawn(serve(
            client,
            id,
            upstream,
            mode.clone(),
            Arc::clone(&stats),
        ));
    }
}

/// Waits while the mode is [`Mode::Hold`]. False when the proxy is gone.
async fn wait_while_held(mode: &mut watch::Receiver<Mode>) -> bool {
    mode.wait_for(|m| *m != Mode::Hold).await.is_ok()
}

async fn serve(
    mut client: TcpStream,
    id: u64,
    upstream: SocketAddr,
    switch: watch::Sender<Mode>,
    stats: Arc<Stats>,
) {
    let mut mode = switch.subscribe();
    if !wait_while_held(&mut mode).await {
        return;
    }
    if *mode.borrow() == Mode::Refuse {
        stats.resets.fetch_add(1, Ordering::Relaxed);
        reset(&client);
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        reset(&client);
        return;
    };
    let _ = server.set_nodelay(true);
    if pump(&mut client, &mut server, id, &mut mode, &switch, &stats).await == End::Reset {
        stats.resets.fetch_add(1, Ordering::Relaxed);
        reset(&client);
        reset(&server);
    }
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    Closed,
    Reset,
}

async fn pump(
    client: &mut TcpStream,
    server: &mut TcpStream,
    id: u64,
    mode: &mut watch::Receiver<Mode>,
    switch: &watch::Sender<Mode>,
    stats: &Stats,
) -> End {
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let mut up = vec![0u8; 16 * 1024];
    let mut down = vec![0u8; 16 * 1024];
    // The end of what went upstream, so a pattern split across two reads is found.
    let mut tail: Vec<u8> = Vec::new();
    let (mut client_done, mut server_done) = (false, false);
    // A `DeliverNext` fault fired on this connection: the next message is its victim.
    let mut armed = false;
    // A `SilenceOn` fault took this connection: it stays silent until the mode changes
    // to anything but another `SilenceOn`.
    let mut silenced = false;
    while !(client_done && server_done) {
        let current = mode.borrow_and_update().clone();
        silenced &= matches!(current, Mode::SilenceOn { .. });
        let held = current.holds(id) || silenced;
        tokio::select! {
            changed = mode.changed() => {
                if changed.is_err() {
                    return End::Closed;
                }
            }
            read = client_read.read(&mut up), if !held && !client_done => {
                let n = match read {
                    Ok(0) | Err(_) => {
                        client_done = true;
                        let _ = server_write.shutdown().await;
                        continue;
                    }
                    Ok(n) => n,
                };
                let chunk = &up[..n];
                if current == Mode::Refuse {
                    return End::Reset;
                }
                if armed {
                    if server_write.write_all(chunk).await.is_ok() {
                        let _ = tokio::time::timeout(REPLY_WAIT, server_read.read(&mut down)).await;
                    }
                    return End::Reset;
                }
                if let Mode::SilenceOn { pattern, .. } = &current {
                    let mut window = tail.clone();
                    window.extend_from_slice(chunk);
                    if contains(&window, pattern) && take_silence(switch) {
                        stats.silenced.fetch_add(1, Ordering::Relaxed);
                        silenced = true;
                        tail.clear();
                        if server_write.write_all(chunk).await.is_err() {
                            return End::Reset;
                        }
                        continue;
                    }
                    let keep = pattern.len().saturating_sub(1);
                    tail = window[window.len().saturating_sub(keep)..].to_vec();
                }
                if let Mode::ResetOn { pattern, delivery, once } = &current {
                    let mut window = tail.clone();
                    window.extend_from_slice(chunk);
                    // A one-shot reset belongs to the first connection that claims it.
                    let fire = contains(&window, pattern)
                        && (!*once
                            || switch.send_if_modified(|m| {
                                let ours = *m == current;
                                if ours {
                                    *m = Mode::Pass;
                                }
                                ours
                            }));
                    if fire && *delivery == Delivery::DeliverNext {
                        // Pass this one (and its answer) on; the next message runs it.
                        armed = true;
                        if server_write.write_all(chunk).await.is_err() {
                            return End::Reset;
                        }
                        continue;
                    }
                    if fire {
                        if *delivery == Delivery::Deliver && server_write.write_all(chunk).await.is_ok() {
                            // The answer proves the server acted; it is not passed on.
                            let _ = tokio::time::timeout(REPLY_WAIT, server_read.read(&mut down)).await;
                        }
                        return End::Reset;
                    }
                    let keep = pattern.len().saturating_sub(1);
                    tail = window[window.len().saturating_sub(keep)..].to_vec();
                }
                if server_write.write_all(chunk).await.is_err() {
                    return End::Reset;
                }
            }
            read = server_read.read(&mut down), if !held && !server_done => {
                match read {
                    Ok(0) | Err(_) => {
                        server_done = true;
                        let _ = client_write.shutdown().await;
                    }
                    Ok(n) => {
                        if client_write.write_all(&down[..n]).await.is_err() {
                            return End::Reset;
                        }
                    }
                }
            }
        }
    }
    End::Closed
}

/// Takes one connection off a [`Mode::SilenceOn`] count; false when none is left (or
/// the mode changed meanwhile).
fn take_silence(switch: &watch::Sender<Mode>) -> bool {
    switch.send_if_modified(|m| match m {
        Mode::SilenceOn { connections, .. } if *connections > 0 => {
            *connections -= 1;
            true
        }
        _ => false,
    })
}

/// Closes with an RST instead of a FIN: the peer's next read fails at once.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// An echo server that also records every byte it received.
    struct Echo {
        addr: SocketAddr,
        received: Arc<Mutex<Vec<u8>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Echo {
        async fn start() -> anyhow::Result<Self> {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let received = Arc::new(Mutex::new(Vec::new()));
            let log = Arc::clone(&received);
            let task = tokio::spawn(async move {
                while let Ok((mut conn, _)) = listener.accept().await {
                    let log = Arc::clone(&log);
                    tokio::spawn(async move {
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = conn.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            if let Ok(mut log) = log.lock() {
                                log.extend_from_slice(&buf[..n]);
                            }
                            if conn.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            });
            Ok(Self {
                addr,
                received,
                task,
            })
        }

        fn received(&self) -> String {
            self.received
                .lock()
                .map(|r| String::from_utf8_lossy(&r).into_owned())
                .unwrap_or_default()
        }
    }

    impl Drop for Echo {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// Sends `msg` and reads the echo, with a short deadline: `None` when nothing
    /// came back in time.
    async fn round_trip(conn: &mut TcpStream, msg: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
        conn.write_all(msg).await?;
        read_exact_within(conn, msg.len(), Duration::from_millis(300)).await
    }

    async fn read_exact_within(
        conn: &mut TcpStream,
        len: usize,
        within: Duration,
    ) -> anyhow::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; len];
        match tokio::time::timeout(within, conn.read_exact(&mut buf)).await {
            Ok(read) => {
                read?;
                Ok(Some(buf))
            }
            Err(_) => Ok(None),
        }
    }

    /// What the client sees after a reset: an error or end of stream, never data.
    async fn is_cut_off(conn: &mut TcpStream) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn pass_forwards_both_ways() -> anyhow::Result<()> {
        let echo = Echo::start().await?;
        let proxy = FaultProxy::start(echo.addr).await?;
        let mut conn = TcpStream::connect(proxy.addr()).await?;
        assert_eq!(
            round_trip(&mut conn, b"hello").await?,
            Some(b"hello".to_vec())
        );
        assert_eq!(proxy.connections(), 1);
        assert_eq!(echo.received(), "hello");
        Ok(())
    }

    #[tokio::test]
    async fn hold_silences_open_and_new_connections_until_healed() -> anyhow::Result<()> {
        let echo = Echo::start().await?;
        let proxy = FaultProxy::start(echo.addr).await?;
        let mut open = TcpStream::connect(proxy.addr()).await?;
        assert!(round_trip(&mut open, b"before").await?.is_some());

        proxy.hold();
        assert_eq!(
            round_trip(&mut open, b"held").await?,
            None,
            "no echo while held"
        );
        let mut new = TcpStream::connect(proxy.addr()).await?;
        assert_eq!(
            round_trip(&mut new, b"new").await?,
            None,
            "accepted, but silent"
        );
        assert_eq!(echo.received(), "before", "nothing reached the server");

        proxy.heal();
        let within = Duration::from_secs(5);
        assert_eq!(
            read_exact_within(&mut open, 4, within).await?,
            Some(b"held".to_vec())
        );
        assert_eq!(
            read_exact_within(&mut new, 3, within).await?,
            Some(b"new".to_vec())
        );
        assert_eq!(proxy.resets(), 0);
        Ok(())
    }

    #[tokio::test]
    async fn strand_silences_the_open_connections_only() -> anyhow::Result<()> {
        let echo = Echo::start().await?;
        let proxy = FaultProxy::start(echo.addr).await?;
        let mut open = TcpStream::connect(proxy.addr()).await?;
        assert!(round_trip(&mut open, b"before").await?.is_some());

        proxy.strand_open();
        assert_eq!(round_trip(&mut open, b"lost").await?, None, "stranded");
        let mut new = TcpStream::connect(proxy.addr()).await?;
        assert_eq!(
            round_trip(&mut new, b"new").await?,
            Some(b"new".to_vec()),
            "a later connection passes"
        );
        assert_eq!(echo.received(), "beforenew");
        assert_eq!(proxy.resets(), 0);
        Ok(())
    }

    #[tokio::test]
    async fn a_one_shot_reset_cuts_the_first_carrier_only_then_heals() -> anyhow::Result<()> {
        let echo = Echo::start().await?;
        let proxy = FaultProxy::start(echo.addr).await?;
        proxy.reset_once_on(b"COMMIT", Delivery::Drop);
        let mut first = TcpStream::connect(proxy.addr()).await?;
        first.write_all(b"COMMIT;").await?;
        assert!(is_cut_off(&mut first).await);
        assert_eq!(proxy.mode(), Mode::Pass, "healed by itself");
        let mut retry = TcpStream::connect(proxy.addr()).await?;
        assert_eq!(
            round_trip(&mut retry, b"COMMIT;").await?,
            Some(b"COMMIT;".to_vec())
        );
        assert_eq!(proxy.resets(), 1);
        Ok(())
    }

    #[tokio::test]
    async fn deliver_next_runs_the_message_after_the_pattern_and_loses_its_answer()
    -> anyhow::Result<()> {
        let echo = Echo::start().await?;
        let proxy = FaultProxy::start(echo.addr).await?;
        proxy.reset_once_on(b"PARSE", Delivery::DeliverNext);
        let mut conn = TcpStream::connect(proxy.addr()).await?;
        assert_eq!(
            round_trip(&mut conn, b"PARSE;").await?,
            Some(b"PARSE;".to_vec()),
            "the carrier passes both ways"
        );
        conn.write_all(b"EXECUTE;").await?;
        assert!(is_cut_off(&mut conn).await);
        assert_eq!(echo.received(), "PARSE;EXECUTE;", "the server ran it");
        assert_eq!(proxy.resets(), 1);
        Ok(())
    }

    #[tokio::test]
    async fn silence_takes_the_first_carriers_only_after_forwarding_until_healed()
    -> anyhow::Result<()> {
        let echo = Echo::start().await?;
        let proxy = FaultProxy::start(echo.addr).await?;
        let mut first = TcpStream::connect(proxy.addr()).await?;
        let mut other = TcpStream::connect(proxy.addr()).await?;
        proxy.silence_on(b"COMMIT", 1);
        assert_eq!(
            round_trip(&mut first, b"COMMIT;").await?,
            None,
            "no answer on a silenced connection"
        );
        assert_eq!(echo.received(), "COMMIT;", "the server got it");
        assert_eq!(
            round_trip(&mut other, b"COMMIT;").await?,
            Some(b"COMMIT;".to_vec()),
            "the count is spent: others pass"
        );
        assert_eq!(
            round_trip(&mut first, b"more").await?,
            None,
            "silent both ways"
        );
        assert_eq!(proxy.silenced(), 1);
        proxy.heal();
        assert_eq!(
            read_exact_within(&mut first, 11, Duration::from_secs(5)).await?,
            Some(b"COMMIT;more".to_vec()),
            "healed: what was held flows"
        );
        assert_eq!(proxy.resets(), 0);
        Ok(())
    }

    #[tokio::test]
    async fn refuse_cuts_open_and_new_connections_at_once() -> anyhow::Result<()> {
        let echo = Echo::start().await?;
        let proxy = FaultProxy::start(echo.addr).await?;
        let mut open = TcpStream::connect(proxy.addr()).await?;
        assert!(round_trip(&mut open, b"before").await?.is_some());
        proxy.refuse();
        open.write_all(b"after").await?;
        assert!(is_cut_off(&mut open).await);
        let mut new = TcpStream::connect(proxy.addr()).await?;
        assert!(is_cut_off(&mut new).await);
        proxy.heal();
        let mut healed = TcpStream::connect(proxy.addr()).await?;
        assert!(round_trip(&mut healed, b"again").await?.is_some());
        assert_eq!(echo.received(), "beforeagain");
        Ok(())
    }

    #[tokio::test]
    async fn reset_on_drop_loses_the_message_and_cuts_both_sides() -> anyhow::Result<()> {
        let echo = Echo::start().await?;
        let proxy = FaultProxy::start(echo.addr).await?;
        let mut conn = TcpStream::connect(proxy.addr()).await?;
        assert!(round_trip(&mut conn, b"BEGIN;").await?.is_some());

        proxy.reset_on(b"COMMIT", Delivery::Drop);
        assert!(
            round_trip(&mut conn, b"SELECT 1;").await?.is_some(),
            "other messages pass"
        );
        conn.write_all(b"COMMIT;").await?;
        assert!(is_cut_off(&mut conn).await);
        assert_eq!(proxy.resets(), 1);
        assert_eq!(
            echo.received(),
            "BEGIN;SELECT 1;",
            "the server never saw COMMIT"
        );

        proxy.heal();
        let mut again = TcpStream::connect(proxy.addr()).await?;
        assert!(
            round_trip(&mut again, b"COMMIT;").await?.is_some(),
            "healed"
        );
        Ok(())
    }

    #[tokio::test]
    async fn reset_on_deliver_is_an_ambiguous_commit() -> anyhow::Result<()> {
        let echo = Echo::start().await?;
        let proxy = FaultProxy::start(echo.addr).await?;
        proxy.reset_on(b"COMMIT", Delivery::Deliver);
        let mut conn = TcpStream::connect(proxy.addr()).await?;
        // Split across two messages: still found. The first half passes (and is
        // echoed) before the second completes the pattern.
        assert_eq!(
            round_trip(&mut conn, b"xx COM").await?,
            Some(b"xx COM".to_vec())
        );
        conn.write_all(b"MIT yy").await?;
        assert!(is_cut_off(&mut conn).await, "the client gets no answer");
        assert!(
            echo.received().ends_with("MIT yy"),
            "the server got all of it: {}",
            echo.received()
        );
        assert_eq!(proxy.resets(), 1);
        Ok(())
    }
}
