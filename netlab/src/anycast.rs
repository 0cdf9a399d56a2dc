//! The anycast front: one address for every store, routed per store to the nearest healthy
//! PoP of its metro, then to any other metro's.
//!
//! Each store's relay holds an [`AnycastView`]: its metro and its order of preference among
//! the PoPs (the "nearest" one differs per store, so a metro's stores spread over its
//! PoPs). A PoP's health comes from polling its `/readyz` over the transport, as a routing
//! daemon beside a real anycast PoP would, and from the launcher, which knows when it
//! killed a process. A `withdraw` answer keeps open flows but sends new ones elsewhere; a
//! dead PoP loses its flows too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::time::Duration;

use fedmesh_protocol::wire::{self, Readiness};
use fedmesh_transport::{
    Client, ClientConfig, KeepAlive, PeerPolicy, RetryPolicy, SendBody, SvidSource,
};
use http::{HeaderMap, Method, StatusCode};
use tokio::task::JoinHandle;

use crate::relay::Upstream;

/// One PoP behind the anycast address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PopEndpoint {
    /// A name unique in the lab, e.g. `chicago-1`.
    pub name: String,
    /// The metro it serves.
    pub metro: String,
    /// Its address (UDP and TCP).
    pub addr: SocketAddr,
}

/// What the front believes about a PoP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PopHealth {
    /// Serving and announcing.
    Up,
    /// Alive but withdrawn (draining): keep open flows, route new ones elsewhere.
    Withdrawn,
    /// Dead or unreachable: route everything elsewhere.
    Down,
}

impl PopHealth {
    fn from_u8(value: u8) -> Self {
        match value {
            0 => Self::Up,
            1 => Self::Withdrawn,
            _ => Self::Down,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            Self::Up => 0,
            Self::Withdrawn => 1,
            Self::Down => 2,
        }
    }
}

struct PopState {
    endpoint: PopEndpoint,
    health: AtomicU8,
    /// Consecutive failed probes; a PoP is declared down after two, so one slow answer
    /// under load does not move every flow.
    failures: AtomicU32,
}

/// The set of PoPs behind the anycast address and their health.
pub struct Anycast {
    pops: Vec<PopState>,
}

impl std::fmt::Debug for Anycast {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_map();
        for pop in &self.pops {
            list.entry(&pop.endpoint.name, &self.health_of(pop));
        }
        list.finish()
    }
}

impl Anycast {
    /// A front over `pops`, all assumed up until told otherwise.
    pub fn new(pops: Vec<PopEndpoint>) -> Arc<Self> {
        let pops = pops
            .into_iter()
            .map(|endpoint| PopState {
                endpoint,
                health: AtomicU8::new(PopHealth::Up.as_u8()),
                failures: AtomicU32::new(0),
            })
            .collect();
        Arc::new(Self { pops })
    }

    /// The PoPs.
    pub fn pops(&self) -> impl Iterator<Item = &PopEndpoint> {
        self.pops.iter().map(|p| &p.endpoint)
    }

    /// Sets a PoP's health by name (the launcher calls this when it kills or drains one).
    /// Returns false when no PoP has that name.
    pub fn set_health(&self, name: &str, health: PopHealth) -> bool {
        let Some(pop) = self.pops.iter().find(|p| p.endpoint.name == name) else {
            return false;
        };
        pop.health.store(health.as_u8(), Ordering::Relaxed);
        true
    }

    /// A PoP's health by name.
    pub fn health(&self, name: &str) -> Option<PopHealth> {
        self.pops
            .iter()
            .find(|p| p.endpoint.name == name)
            .map(|p| self.health_of(p))
    }

    fn health_of(&self, pop: &PopState) -> PopHealth {
        PopHealth::from_u8(pop.health.load(Ordering::Relaxed))
    }

    /// The view of the store in `metro` whose "nearest" PoP is picked by `salt` (e.g. the
    /// store's index): its metro's PoPs first, rotated by `salt`, then the other metros'.
    pub fn view(self: &Arc<Self>, metro: &str, salt: usize) -> AnycastView {
        let (mut local, mut remote): (Vec<usize>, Vec<usize>) =
            (0..self.pops.len()).partition(|&i| self.pops[i].endpoint.metro == metro);
        if !local.is_empty() {
            let n = local.len();
            local.rotate_left(salt % n);
        }
        if !remote.is_empty() {
            let n = remote.len();
            remote.rotate_left(salt % n);
        }
        local.extend(remote);
        AnycastView {
            front: Arc::clone(self),
            order: local,
        }
    }

    /// Polls every PoP's `/readyz` every `interval` as the identity of `source`, updating
    /// health: `200` up, `503` with `withdraw` withdrawn, two failed probes in a row down.
    /// A PoP set down by [`set_health`](Self::set_health) comes back once it answers again.
    ///
    /// Must be called inside a tokio runtime.
    pub fn spawn_health_poll(
        self: &Arc<Self>,
        source: Arc<dyn SvidSource>,
        interval: Duration,
    ) -> Vec<JoinHandle<()>> {
        (0..self.pops.len())
            .map(|i| {
                let front = Arc::clone(self);
                let source = Arc::clone(&source);
                tokio::spawn(async move { front.poll_one(i, source, interval).await })
            })
            .collect()
    }

    async fn poll_one(&self, index: usize, source: Arc<dyn SvidSource>, interval: Duration) {
        let pop = &self.pops[index];
        let mut config =
            ClientConfig::new(pop.endpoint.addr, PeerPolicy::PathPrefix("/pop/".into()));
        config.quic_connect_timeout = Duration::from_millis(500);
        config.tcp_connect_timeout = Duration::from_millis(500);
        config.keepalive = KeepAlive {
            interval: Duration::from_millis(500),
            timeout: Duration::from_secs(2),
        };
        config.retry = RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        };
        let Ok(client) = Client::new(config, source) else {
            return;
        };
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            let probe = client.request(
                Method::GET,
                wire::READY,
                HeaderMap::new(),
                SendBody::empty(),
            );
            let health =
                match tokio::time::timeout(interval.max(Duration::from_secs(1)), probe).await {
                    Ok(Ok(response)) => Some(readiness(response).await),
                    Ok(Err(_)) | Err(_) => None,
                };
            let next = match health {
                Some(health) => {
                    pop.failures.store(0, Ordering::Relaxed);
                    health
                }
                None if pop.failures.fetch_add(1, Ordering::Relaxed) >= 1 => PopHealth::Down,
                None => continue,
            };
            let before = pop.health.swap(next.as_u8(), Ordering::Relaxed);
            if before != next.as_u8() {
                tracing::info!(pop.name = %pop.endpoint.name, health = ?next, "pop health changed");
            }
        }
    }
}

/// Reads a `/readyz` answer. Any answer other than an explicit withdraw means the PoP is
/// alive and serving (a PoP that refuses the lab's identity still answers).
async fn readiness(response: fedmesh_transport::ClientResponse) -> PopHealth {
    let status = response.status();
    let body = response.bytes(4_096).await.unwrap_or_default();
    let withdrawn = serde_json::from_slice::<Readiness>(&body).ok() == Some(Readiness::Withdraw);
    if withdrawn || status == StatusCode::SERVICE_UNAVAILABLE {
        PopHealth::Withdrawn
    } else {
        PopHealth::Up
    }
}

/// One store's view of the anycast address.
#[derive(Clone)]
pub struct AnycastView {
    front: Arc<Anycast>,
    order: Vec<usize>,
}

impl std::fmt::Debug for AnycastView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self
            .order
            .iter()
            .map(|&i| &self.front.pops[i].endpoint.name)
            .collect();
        f.debug_struct("AnycastView")
            .field("order", &names)
            .finish()
    }
}

impl Upstream for AnycastView {
    fn choose(&self) -> Option<SocketAddr> {
        self.order
            .iter()
            .map(|&i| &self.front.pops[i])
            .find(|p| self.front.health_of(p) == PopHealth::Up)
            .map(|p| p.endpoint.addr)
    }

    fn keeps(&self, addr: SocketAddr) -> bool {
        self.front
            .pops
            .iter()
            .filter(|p| p.endpoint.addr == addr)
            .any(|p| self.front.health_of(p) != PopHealth::Down)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn front() -> Arc<Anycast> {
        let pop = |name: &str, metro: &str, port| PopEndpoint {
            name: name.into(),
            metro: metro.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        Anycast::new(vec![
            pop("chi-1", "chicago", 1001),
            pop("chi-2", "chicago", 1002),
            pop("mil-1", "milwaukee", 2001),
        ])
    }

    #[test]
    fn stores_spread_over_their_metros_pops() {
        let front = front();
        let a = front.view("chicago", 0).choose();
        let b = front.view("chicago", 1).choose();
        assert_ne!(a, b);
        assert_eq!(
            front.view("milwaukee", 5).choose().map(|a| a.port()),
            Some(2001)
        );
    }

    #[test]
    fn a_dead_pop_moves_its_stores_to_the_metros_other_pop_then_any_metro() {
        let front = front();
        let view = front.view("chicago", 0);
        assert_eq!(view.choose().map(|a| a.port()), Some(1001));
        front.set_health("chi-1", PopHealth::Down);
        assert_eq!(view.choose().map(|a| a.port()), Some(1002));
        assert!(!view.keeps(SocketAddr::from(([127, 0, 0, 1], 1001))));
        front.set_health("chi-2", PopHealth::Down);
        assert_eq!(view.choose().map(|a| a.port()), Some(2001));
        front.set_health("mil-1", PopHealth::Down);
        assert_eq!(view.choose(), None);
    }

    #[test]
    fn a_withdrawn_pop_keeps_its_flows_but_gets_no_new_ones() {
        let front = front();
        let view = front.view("chicago", 0);
        front.set_health("chi-1", PopHealth::Withdrawn);
        assert_eq!(view.choose().map(|a| a.port()), Some(1002));
        assert!(view.keeps(SocketAddr::from(([127, 0, 0, 1], 1001))));
    }
}
