//! Liveness: keepalives hold an idle connection open, and a vanished peer is noticed
//! within the keepalive timeout.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use common::{Lab, UdpRelay, router, start_server};
use fedmesh_transport::{Client, KeepAlive, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEEPALIVE: KeepAlive = KeepAlive {
    interval: Duration::from_millis(200),
    timeout: Duration::from_secs(1),
};

#[tokio::test]
async fn idle_connection_outlives_the_idle_timeout() -> Result<()> {
    let lab = Lab::new("fl.example")?;
    let server = start_server(lab.source("core", "/core")?, router(None)).await?;
    let mut config = common::client_config(&server);
    config.keepalive = KEEPALIVE;
    let client = Client::new(config, lab.source("store", "/store/emea/0042")?)?;
    client.get("/whoami").await?;

    // Three idle timeouts without a request: only keepalives flow.
    tokio::time::sleep(3 * KEEPALIVE.timeout).await;
    assert_eq!(client.protocol().await, Some(Protocol::Http3));
    assert_eq!(
        server.quic_connections(),
        1,
        "the server kept the same connection"
    );
    client.get("/whoami").await?;
    assert_eq!(server.quic_connections(), 1);
    Ok(())
}

#[tokio::test]
async fn vanished_peer_is_detected_within_the_keepalive_timeout() -> Result<()> {
    let lab = Lab::new("fl.example")?;
    let server = start_server(lab.source("core", "/core")?, router(None)).await?;
    let relay = UdpRelay::start(server.quic_addr()).await?;
    let mut config = common::client_config(&server);
    config.quic_addr = relay.addr;
    config.keepalive = KEEPALIVE;
    let client = Client::new(config, lab.source("store", "/store/emea/0042")?)?;
    assert_eq!(client.get("/whoami").await?.protocol(), Protocol::Http3);

    // Cut the link: no close frame reaches either side.
    relay.cut();
    let cut_at = Instant::now();
    while client.protocol().await.is_some() && cut_at.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let detected = cut_at.elapsed();
    // The idle timeout is 1 s; allow two more for timer slack on a loaded machine.
    assert!(
        detected < Duration::from_secs(3),
        "dead peer noticed after {detected:?}"
    );
    while server.quic_connections() > 0 && cut_at.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        server.quic_connections(),
        0,
        "the server also dropped the connection"
    );
    Ok(())
}

/// Forwards one TCP connection to the server; once cut, swallows bytes both ways without
/// closing anything, as a dead link does.
async fn tcp_relay(server: SocketAddr, cut: Arc<AtomicBool>) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let Ok((client, _)) = listener.accept().await else {
            return;
        };
        let Ok(upstream) = TcpStream::connect(server).await else {
            return;
        };
        let (client_read, client_write) = client.into_split();
        let (server_read, server_write) = upstream.into_split();
        tokio::spawn(pump(client_read, server_write, Arc::clone(&cut)));
        pump(server_read, client_write, cut).await;
    });
    Ok(addr)
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<AtomicBool>,
) {
    let mut buffer = vec![0u8; 65536];
    while let Ok(n) = from.read(&mut buffer).await {
        if n == 0 {
            return;
        }
        if !cut.load(Ordering::Relaxed) && to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn vanished_peer_on_http2_is_detected_by_ping_timeout() -> Result<()> {
    let lab = Lab::new("fl.example")?;
    let server = start_server(lab.source("core", "/core")?, router(None)).await?;
    let cut = Arc::new(AtomicBool::new(false));
    let relay = tcp_relay(server.tcp_addr().expect("tcp"), Arc::clone(&cut)).await?;
    let blackhole = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut config = common::client_config(&server);
    config.quic_addr = blackhole.local_addr()?;
    config.quic_connect_timeout = Duration::from_millis(300);
    config.tcp_addr = relay;
    config.keepalive = KEEPALIVE;
    let client = Client::new(config, lab.source("store", "/store/emea/0042")?)?;
    assert_eq!(client.get("/whoami").await?.protocol(), Protocol::Http2);

    // Idle past the timeout first: pings keep the connection.
    tokio::time::sleep(2 * KEEPALIVE.timeout).await;
    assert_eq!(client.protocol().await, Some(Protocol::Http2));

    cut.store(true, Ordering::Relaxed);
    let cut_at = Instant::now();
    while client.protocol().await.is_some() && cut_at.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let detected = cut_at.elapsed();
    // A ping every 200 ms, 1 s to answer it; two more seconds of slack.
    assert!(
        detected < Duration::from_secs(3),
        "dead peer noticed after {detected:?}"
    );
    Ok(())
}
