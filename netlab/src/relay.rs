//! The relay of one store's link: a UDP and a TCP listener on the same port (the store's
//! view of the anycast address) that forward to a PoP chosen by an [`Upstream`], through a
//! [`Shaper`] per direction.
//!
//! UDP flows are keyed by the client's address; each gets its own upstream socket, so the
//! PoP sees one peer per store. A flow moves to another PoP when its PoP is no longer kept
//! (dead), and a QUIC Initial packet (a new connection) follows the current best choice, so
//! a drained PoP keeps its open connections while new ones go elsewhere. TCP connections
//! choose once, at accept.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::wan::{DropReason, Fate, Shaper, WanProfile};

/// Largest datagram the relay forwards.
const MAX_DATAGRAM: usize = 65_535;
/// Largest TCP chunk shaped as one unit.
const TCP_CHUNK: usize = 16 * 1024;
/// UDP flows idle this long are forgotten.
const FLOW_IDLE: Duration = Duration::from_secs(120);
/// How long a TCP connect to the chosen PoP may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Where a relay sends new flows, and whether an existing flow may stay where it is.
pub trait Upstream: Send + Sync + 'static {
    /// The address a new flow should go to now; `None` when nothing is reachable.
    fn choose(&self) -> Option<SocketAddr>;
    /// Whether a flow already going to `addr` may keep going there.
    fn keeps(&self, addr: SocketAddr) -> bool;
}

/// A fixed upstream: every flow goes to this address.
impl Upstream for SocketAddr {
    fn choose(&self) -> Option<SocketAddr> {
        Some(*self)
    }

    fn keeps(&self, _addr: SocketAddr) -> bool {
        true
    }
}

/// Why a relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A listener could not be bound.
    #[error("cannot bind the relay on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The profile is unusable.
    #[error(transparent)]
    Profile(#[from] crate::wan::ProfileError),
}

/// What crossed, or failed to cross, a relay; all counters since it started.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Bytes from the store towards the PoP that were delivered (UDP payloads and TCP).
    pub bytes_up: AtomicU64,
    /// Bytes from the PoP towards the store that were delivered.
    pub bytes_down: AtomicU64,
    /// Datagrams that arrived from either side.
    pub datagrams: AtomicU64,
    /// Datagrams lost at random.
    pub dropped_loss: AtomicU64,
    /// Datagrams dropped at a full queue.
    pub dropped_queue: AtomicU64,
    /// Datagrams dropped in an offline window.
    pub dropped_offline: AtomicU64,
    /// Datagrams dropped because UDP is blocked.
    pub dropped_blocked: AtomicU64,
    /// TCP connections accepted and forwarded.
    pub tcp_connections: AtomicU64,
    /// TCP connections refused or cut by an offline window or a missing upstream.
    pub tcp_refused: AtomicU64,
    /// UDP flows (re)pinned to a PoP.
    pub flows_routed: AtomicU64,
}

impl RelayStats {
    fn count_drop(&self, reason: DropReason) {
        let counter = match reason {
            DropReason::Loss => &self.dropped_loss,
            DropReason::Queue => &self.dropped_queue,
            DropReason::Offline => &self.dropped_offline,
            DropReason::Blocked => &self.dropped_blocked,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Datagrams dropped for any reason.
    pub fn dropped(&self) -> u64 {
        [
            &self.dropped_loss,
            &self.dropped_queue,
            &self.dropped_offline,
            &self.dropped_blocked,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

/// A running relay. Dropping it stops every task and closes every socket.
pub struct Relay {
    addr: SocketAddr,
    stats: Arc<RelayStats>,
    link: Arc<Link>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Both directions of a link, shared by its UDP flows and TCP connections: the bandwidth
/// cap is per link, not per connection.
struct Link {
    up: Mutex<Shaper>,
    down: Mutex<Shaper>,
    stats: Arc<RelayStats>,
    /// Set by the lab to take the store off the network (churn), on top of the schedule.
    cut: AtomicBool,
}

impl Link {
    fn fate(&self, up: bool, udp: bool, bytes: usize) -> Fate {
        if self.cut.load(Ordering::Relaxed) {
            return Fate::Drop(DropReason::Offline);
        }
        let shaper = if up { &self.up } else { &self.down };
        let mut shaper = shaper.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if udp {
            shaper.datagram(now, bytes)
        } else {
            shaper.segment(now, bytes)
        }
    }
}

impl Relay {
    /// Starts a relay listening on `listen` (UDP and TCP on the same port; port 0 picks a
    /// free one) that forwards to `upstream` through `profile`, seeded by `seed`. The run's
    /// clock (offline windows) starts now.
    ///
    /// Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`RelayError`] when the profile is invalid or a socket cannot be bound.
    pub async fn start(
        listen: SocketAddr,
        upstream: Arc<dyn Upstream>,
        profile: WanProfile,
        seed: u64,
    ) -> Result<Self, RelayError> {
        Self::start_at(listen, upstream, profile, seed, Instant::now()).await
    }

    /// As [`start`](Self::start), with the run's clock started at `start`, so many relays
    /// share one schedule.
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub async fn start_at(
        listen: SocketAddr,
        upstream: Arc<dyn Upstream>,
        profile: WanProfile,
        seed: u64,
        start: Instant,
    ) -> Result<Self, RelayError> {
        profile.validate()?;
        let (udp, tcp) = bind_pair(listen).await?;
        let addr = udp.local_addr().map_err(|source| RelayError::Bind {
            addr: listen,
            source,
        })?;
        let stats = Arc::new(RelayStats::default());

        // The two directions draw from separate streams of the same seed.
        let link = Arc::new(Link {
            up: Mutex::new(Shaper::new(profile.clone(), seed.wrapping_mul(2), start)),
            down: Mutex::new(Shaper::new(
                profile.clone(),
                seed.wrapping_mul(2) + 1,
                start,
            )),
            stats: Arc::clone(&stats),
            cut: AtomicBool::new(false),
        });
        let (online_tx, online_rx) = watch::channel(!profile.is_offline(Duration::ZERO));
        let tasks = vec![
            tokio::spawn(watch_schedule(profile, start, Arc::clone(&link), online_tx)),
            tokio::spawn(serve_udp(
                Arc::new(udp),
                Arc::clone(&upstream),
                Arc::clone(&link),
            )),
            tokio::spawn(serve_tcp(tcp, upstream, Arc::clone(&link), online_rx)),
        ];
        Ok(Self {
            addr,
            stats,
            link,
            tasks,
        })
    }

    /// Takes the store off the network (`true`: everything dropped, TCP cut) or puts it
    /// back, whatever the schedule says; the lab's store churn.
    pub fn set_cut(&self, cut: bool) {
        self.link.cut.store(cut, Ordering::Relaxed);
    }

    /// The address stores dial (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The relay's counters.
    pub fn stats(&self) -> &Arc<RelayStats> {
        &self.stats
    }
}

/// Binds UDP first, then TCP on the same port, retrying a few ports when the TCP side of a
/// picked port is taken.
async fn bind_pair(listen: SocketAddr) -> Result<(UdpSocket, TcpListener), RelayError> {
    let mut last = None;
    for _ in 0..16 {
        let udp = UdpSocket::bind(listen)
            .await
            .map_err(|source| RelayError::Bind {
                addr: listen,
                source,
            })?;
        let addr = udp.local_addr().map_err(|source| RelayError::Bind {
            addr: listen,
            source,
        })?;
        match TcpListener::bind(addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(source) if listen.port() == 0 => last = Some(RelayError::Bind { addr, source }),
            Err(source) => return Err(RelayError::Bind { addr, source }),
        }
    }
    Err(last.unwrap_or(RelayError::Bind {
        addr: listen,
        source: std::io::Error::other("no free port pair"),
    }))
}

/// Publishes whether the link is up, checking the schedule and the cut every 20 ms.
async fn watch_schedule(
    profile: WanProfile,
    start: Instant,
    link: Arc<Link>,
    online: watch::Sender<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        let up = !profile.is_offline(start.elapsed()) && !link.cut.load(Ordering::Relaxed);
        online.send_if_modified(|state| std::mem::replace(state, up) != up);
    }
}

/// Sends each queued packet at its delivery time; times never go backwards, so one task
/// per direction keeps the queue in order.
fn spawn_sender<T: Send + 'static>(
    send: impl Fn(T) + Send + 'static,
) -> (mpsc::UnboundedSender<(Instant, T)>, JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, T)>();
    let task = tokio::spawn(async move {
        while let Some((at, item)) = rx.recv().await {
            tokio::time::sleep_until(at.into()).await;
            send(item);
        }
    });
    (tx, task)
}

struct Flow {
    target: SocketAddr,
    socket: Arc<UdpSocket>,
    last_seen: Instant,
    reader: JoinHandle<()>,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A QUIC long-header Initial packet: form and fixed bits set, type 0 (RFC 9000 17.2.2).
fn is_quic_initial(packet: &[u8]) -> bool {
    packet.first().is_some_and(|b| b & 0xf0 == 0xc0)
}

async fn serve_udp(front: Arc<UdpSocket>, upstream: Arc<dyn Upstream>, link: Arc<Link>) {
    // Downlink: PoP -> store, sent from the front socket to the store's address.
    let down_front = Arc::clone(&front);
    let down_stats = Arc::clone(&link.stats);
    let (down_tx, down_task) = spawn_sender(move |(client, packet): (SocketAddr, Bytes)| {
        if down_front.try_send_to(&packet, client).is_ok() {
            down_stats
                .bytes_down
                .fetch_add(packet.len() as u64, Ordering::Relaxed);
        }
    });
    let _down_guard = AbortGuard(down_task);
    let up_stats = Arc::clone(&link.stats);
    let (up_tx, up_task) = spawn_sender(move |(socket, packet): (Arc<UdpSocket>, Bytes)| {
        if socket.try_send(&packet).is_ok() {
            up_stats
                .bytes_up
                .fetch_add(packet.len() as u64, Ordering::Relaxed);
        }
    });
    let _up_guard = AbortGuard(up_task);

    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut last_sweep = Instant::now();
    loop {
        let Ok((len, client)) = front.recv_from(&mut buf).await else {
            continue;
        };
        let packet = Bytes::copy_from_slice(&buf[..len]);
        link.stats.datagrams.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        if now.duration_since(last_sweep) > FLOW_IDLE / 4 {
            flows.retain(|_, flow| now.duration_since(flow.last_seen) < FLOW_IDLE);
            last_sweep = now;
        }

        // 1. Shape first: a dropped packet must not move a flow.
        let at = match link.fate(true, true, len) {
            Fate::Deliver(at) => at,
            Fate::Drop(reason) => {
                link.stats.count_drop(reason);
                continue;
            }
        };

        // 2. Pin the flow: keep it unless its PoP is gone or a new connection starts
        //    while a better PoP is announced.
        let reroute = match flows.get(&client) {
            None => true,
            Some(flow) => {
                !upstream.keeps(flow.target)
                    || (is_quic_initial(&packet) && upstream.choose() != Some(flow.target))
            }
        };
        if reroute {
            flows.remove(&client);
            let Some(target) = upstream.choose() else {
                link.stats.count_drop(DropReason::Offline);
                continue;
            };
            let Ok(flow) = open_flow(client, target, &link, down_tx.clone()).await else {
                continue;
            };
            link.stats.flows_routed.fetch_add(1, Ordering::Relaxed);
            flows.insert(client, flow);
        }
        let Some(flow) = flows.get_mut(&client) else {
            continue;
        };
        flow.last_seen = now;
        let _ = up_tx.send((at, (Arc::clone(&flow.socket), packet)));
    }
}

async fn open_flow(
    client: SocketAddr,
    target: SocketAddr,
    link: &Arc<Link>,
    down_tx: mpsc::UnboundedSender<(Instant, (SocketAddr, Bytes))>,
) -> std::io::Result<Flow> {
    let local: SocketAddr = if target.is_ipv4() {
        "127.0.0.1:0".parse().map_err(std::io::Error::other)?
    } else {
        "[::1]:0".parse().map_err(std::io::Error::other)?
    };
    let socket = Arc::new(UdpSocket::bind(local).await?);
    socket.connect(target).await?;
    let reader_socket = Arc::clone(&socket);
    let link = Arc::clone(link);
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let Ok(len) = reader_socket.recv(&mut buf).await else {
                // ICMP unreachable surfaces as an error on a connected socket: the PoP
                // is gone; the flow re-routes on the store's next packet.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            link.stats.datagrams.fetch_add(1, Ordering::Relaxed);
            match link.fate(false, true, len) {
                Fate::Deliver(at) => {
                    let packet = Bytes::copy_from_slice(&buf[..len]);
                    let _ = down_tx.send((at, (client, packet)));
                }
                Fate::Drop(reason) => link.stats.count_drop(reason),
            }
        }
    });
    Ok(Flow {
        target,
        socket,
        last_seen: Instant::now(),
        reader,
    })
}

struct AbortGuard(JoinHandle<()>);

impl Drop for AbortGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn serve_tcp(
    listener: TcpListener,
    upstream: Arc<dyn Upstream>,
    link: Arc<Link>,
    online: watch::Receiver<bool>,
) {
    loop {
        let Ok((store, _)) = listener.accept().await else {
            continue;
        };
        // An offline link or no reachable PoP: the connection is closed at once, which
        // the store sees as refused.
        let target = upstream.choose();
        let (true, Some(target)) = (*online.borrow(), target) else {
            link.stats.tcp_refused.fetch_add(1, Ordering::Relaxed);
            drop(store);
            continue;
        };
        let link = Arc::clone(&link);
        let online = online.clone();
        tokio::spawn(async move {
            let Ok(Ok(pop)) =
                tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await
            else {
                link.stats.tcp_refused.fetch_add(1, Ordering::Relaxed);
                return;
            };
            link.stats.tcp_connections.fetch_add(1, Ordering::Relaxed);
            let _ = store.set_nodelay(true);
            let _ = pop.set_nodelay(true);
            splice(store, pop, link, online).await;
        });
    }
}

/// Copies both directions through the link's shapers until either side closes or the link
/// goes offline (which cuts the connection, as a dead line would).
async fn splice(
    store: TcpStream,
    pop: TcpStream,
    link: Arc<Link>,
    mut online: watch::Receiver<bool>,
) {
    let (store_read, store_write) = store.into_split();
    let (pop_read, pop_write) = pop.into_split();
    let up = pump(store_read, pop_write, Arc::clone(&link), true);
    let down = pump(pop_read, store_write, Arc::clone(&link), false);
    let offline = async {
        loop {
            if !*online.borrow_and_update() {
                return;
            }
            if online.changed().await.is_err() {
                // No schedule: the link never goes down.
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        () = offline => {
            link.stats.tcp_refused.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One direction of a TCP connection: a reader that stamps each chunk with its delivery
/// time and a writer that waits for it, with a bounded queue between them for backpressure.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Arc<Link>,
    up: bool,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Bytes)>(64);
    let stats = Arc::clone(&link.stats);
    let reader = async move {
        let mut buf = vec![0u8; TCP_CHUNK];
        loop {
            let len = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(len) => len,
            };
            // Offline windows are enforced by cutting the connection, and TCP is never
            // lost here, so every chunk gets a delivery time.
            let at = match link.fate(up, false, len) {
                Fate::Deliver(at) => at,
                Fate::Drop(_) => Instant::now(),
            };
            if tx
                .send((at, Bytes::copy_from_slice(&buf[..len])))
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at.into()).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            let counter = if up {
                &stats.bytes_up
            } else {
                &stats.bytes_down
            };
            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
