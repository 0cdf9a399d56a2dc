//! The anycast front over real transport servers: a store reaches the nearest PoP of its
//! metro, moves to the other PoP when that one dies, and new connections avoid a PoP that
//! withdraws while open ones stay.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use fedmesh_netlab::anycast::{Anycast, PopEndpoint, PopHealth};
use fedmesh_netlab::relay::Relay;
use fedmesh_netlab::wan::WanProfile;
use fedmesh_transport::{Client, ClientConfig, PeerPolicy, SvidSource};

async fn name_via(client: &Client) -> Result<String> {
    let body = client.get("/name").await?.bytes(64).await?;
    Ok(String::from_utf8(body.to_vec())?)
}

fn store_client(relay: &Relay, store: &Arc<dyn SvidSource>) -> Result<Client> {
    let mut config = ClientConfig::new(relay.addr(), PeerPolicy::PathPrefix("/pop/".into()));
    config.quic_connect_timeout = Duration::from_millis(500);
    config.retry.base = Duration::from_millis(100);
    config.retry.cap = Duration::from_millis(500);
    Ok(Client::new(config, Arc::clone(store))?)
}

async fn wait_for(front: &Anycast, name: &str, health: PopHealth) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while front.health(name) != Some(health) {
        if Instant::now() > deadline {
            bail!("{name} never became {health:?}: {front:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_moves_to_the_metros_other_pop_when_one_dies() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = common::pki(dir.path())?;
    let pop_id = common::source(&pki.pops[0].1)?;
    let store = common::source(&pki.stores[0].1)?;
    let first = common::fake_pop(Arc::clone(&pop_id), "chicago-1", Default::default()).await?;
    let second = common::fake_pop(pop_id, "chicago-2", Default::default()).await?;
    let front = Anycast::new(vec![
        PopEndpoint {
            name: "chicago-1".into(),
            metro: "chicago".into(),
            addr: first.quic_addr(),
        },
        PopEndpoint {
            name: "chicago-2".into(),
            metro: "chicago".into(),
            addr: second.quic_addr(),
        },
    ]);
    let _poll = front.spawn_health_poll(Arc::clone(&store), Duration::from_millis(100));
    let view = Arc::new(front.view("chicago", 0));
    let relay = Relay::start("127.0.0.1:0".parse()?, view, WanProfile::default(), 1).await?;
    let client = store_client(&relay, &store)?;

    // 1. The nearest PoP answers.
    assert_eq!(name_via(&client).await?, "chicago-1");

    // 2. It dies: the poll marks it down and the same store, same socket, reaches the
    //    other PoP on its next request.
    first.abort().await;
    wait_for(&front, "chicago-1", PopHealth::Down).await?;
    assert_eq!(name_via(&client).await?, "chicago-2");
    assert!(relay.stats().flows_routed.load(Ordering::Relaxed) >= 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_pop_gets_no_new_connections_but_keeps_open_ones() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = common::pki(dir.path())?;
    let pop_id = common::source(&pki.pops[0].1)?;
    let store = common::source(&pki.stores[0].1)?;
    let withdraw = Arc::new(AtomicBool::new(false));
    let first = common::fake_pop(Arc::clone(&pop_id), "chicago-1", Arc::clone(&withdraw)).await?;
    let second = common::fake_pop(pop_id, "chicago-2", Default::default()).await?;
    let front = Anycast::new(vec![
        PopEndpoint {
            name: "chicago-1".into(),
            metro: "chicago".into(),
            addr: first.quic_addr(),
        },
        PopEndpoint {
            name: "chicago-2".into(),
            metro: "chicago".into(),
            addr: second.quic_addr(),
        },
    ]);
    let _poll = front.spawn_health_poll(Arc::clone(&store), Duration::from_millis(100));
    let relay = Relay::start(
        "127.0.0.1:0".parse()?,
        Arc::new(front.view("chicago", 0)),
        WanProfile::default(),
        1,
    )
    .await?;
    let open = store_client(&relay, &store)?;
    assert_eq!(name_via(&open).await?, "chicago-1");

    // The PoP drains: its readiness says withdraw.
    withdraw.store(true, Ordering::Relaxed);
    wait_for(&front, "chicago-1", PopHealth::Withdrawn).await?;
    let fresh = store_client(&relay, &store)?;
    assert_eq!(name_via(&fresh).await?, "chicago-2");
    assert_eq!(name_via(&open).await?, "chicago-1");
    Ok(())
}
