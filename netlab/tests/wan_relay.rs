//! The WAN relay over real sockets: the loss and latency a store sees match its profile, a
//! blocked UDP path forces the transport onto HTTP/2, and an offline window cuts then
//! restores the link.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Result;
use fedmesh_netlab::relay::Relay;
use fedmesh_netlab::wan::{OfflineWindow, WanProfile};
use fedmesh_transport::{Client, ClientConfig, PeerPolicy, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const ANY: &str = "127.0.0.1:0";

/// Sends `count` numbered datagrams `gap` apart through `relay` to an echo and returns the
/// round-trip time of each one that came back, by sequence number and send time.
async fn echo_through(relay: SocketAddr, count: u32, gap: Duration) -> Result<Vec<(f64, f64)>> {
    let socket = Arc::new(UdpSocket::bind(ANY).await?);
    socket.connect(relay).await?;
    let started = Instant::now();
    let receiver = Arc::clone(&socket);
    let collect = tokio::spawn(async move {
        let mut back = HashMap::new();
        let mut buf = [0u8; 64];
        // Bounded: stop once nothing has come back for a second.
        while let Ok(Ok(len)) =
            tokio::time::timeout(Duration::from_secs(1), receiver.recv(&mut buf)).await
        {
            if len == 4 {
                let seq = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                back.insert(seq, started.elapsed());
            }
        }
        back
    });
    let mut sent = Vec::new();
    for seq in 0..count {
        sent.push(started.elapsed());
        socket.send(&seq.to_be_bytes()).await?;
        tokio::time::sleep(gap).await;
    }
    let back = collect.await?;
    Ok((0..count)
        .filter_map(|seq| {
            let at = back.get(&seq)?;
            let sent = sent[seq as usize];
            Some((sent.as_secs_f64(), (*at - sent).as_secs_f64() * 1e3))
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measured_loss_and_latency_match_the_profile() -> Result<()> {
    let echo = common::udp_echo().await?;
    let profile = WanProfile {
        loss_percent: 5.0,
        latency_ms: 20.0,
        jitter_ms: 5.0,
        ..WanProfile::default()
    };
    let relay = Relay::start(ANY.parse()?, Arc::new(echo), profile, 42).await?;
    let replies = echo_through(relay.addr(), 1_000, Duration::from_millis(1)).await?;

    // A reply survives loss twice: 0.95^2 = 0.9025, so about 902 of 1000 come back
    // (binomial sd 9.4; 850-950 is over five sd either side).
    assert!(
        (850..=950).contains(&replies.len()),
        "{} replies",
        replies.len()
    );
    let mut rtts: Vec<f64> = replies.iter().map(|(_, rtt)| *rtt).collect();
    rtts.sort_by(f64::total_cmp);
    let median = rtts[rtts.len() / 2];
    // Each direction adds 20 +- 5 ms: the round trip is at least 30 ms, about 40 ms in the
    // median, plus scheduling on a busy machine.
    assert!(rtts[0] >= 29.0, "min rtt {}", rtts[0]);
    assert!((38.0..=60.0).contains(&median), "median rtt {median}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_udp_forces_the_http2_fallback() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = common::pki(dir.path())?;
    let pop = common::fake_pop(
        common::source(&pki.pops[0].1)?,
        "chicago-1",
        Arc::new(AtomicBool::new(false)),
    )
    .await?;
    let store = common::source(&pki.stores[0].1)?;

    for (blocked, expected) in [(false, Protocol::Http3), (true, Protocol::Http2)] {
        let profile = WanProfile {
            udp_blocked: blocked,
            latency_ms: 5.0,
            ..WanProfile::default()
        };
        let relay = Relay::start(ANY.parse()?, Arc::new(pop.quic_addr()), profile, 1).await?;
        let mut config = ClientConfig::new(relay.addr(), PeerPolicy::PathPrefix("/pop/".into()));
        config.quic_connect_timeout = Duration::from_millis(500);
        let client = Client::new(config, Arc::clone(&store))?;
        let response = client.get("/name").await?;
        assert_eq!(response.protocol(), expected, "udp blocked: {blocked}");
        assert_eq!(&response.bytes(64).await?[..], b"chicago-1");
        if blocked {
            assert!(
                relay
                    .stats()
                    .dropped_blocked
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > 0
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_window_drops_everything_then_the_link_recovers() -> Result<()> {
    let echo = common::udp_echo().await?;
    let tcp_echo = TcpListener::bind(ANY).await?;
    let tcp_addr = tcp_echo.local_addr()?;
    // One relay per protocol, both on the same schedule, each with its own echo.
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = tcp_echo.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 256];
                while let Ok(len) = stream.read(&mut buf).await {
                    if len == 0 || stream.write_all(&buf[..len]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let profile = WanProfile {
        offline: vec![OfflineWindow {
            start_s: 0.4,
            duration_s: 0.6,
            every_s: None,
        }],
        ..WanProfile::default()
    };
    let start = Instant::now();
    let udp = Relay::start_at(ANY.parse()?, Arc::new(echo), profile.clone(), 1, start).await?;
    let tcp = Relay::start_at(ANY.parse()?, Arc::new(tcp_addr), profile, 1, start).await?;

    // 1. A TCP connection opened before the window is cut when it starts.
    let mut early = TcpStream::connect(tcp.addr()).await?;
    early.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    early.read_exact(&mut buf).await?;

    // 2. UDP every 20 ms for 1.4 s: replies before 0.4 s and after 1.0 s only.
    let replies = echo_through(udp.addr(), 70, Duration::from_millis(20)).await?;
    let sent_at: Vec<f64> = replies.iter().map(|(t, _)| *t).collect();
    assert!(
        sent_at.iter().all(|t| *t < 0.42 || *t > 0.98),
        "{sent_at:?}"
    );
    assert!(
        sent_at.iter().filter(|t| **t < 0.38).count() >= 15,
        "{sent_at:?}"
    );
    assert!(
        sent_at.iter().filter(|t| **t > 1.02).count() >= 15,
        "{sent_at:?}"
    );
    let cut = tokio::time::timeout(Duration::from_secs(1), early.read(&mut buf)).await?;
    assert!(
        matches!(cut, Ok(0) | Err(_)),
        "connection survived the window: {cut:?}"
    );

    // 3. After the window, new TCP connections work again.
    let mut late = TcpStream::connect(tcp.addr()).await?;
    late.write_all(b"pong").await?;
    late.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"pong");
    Ok(())
}
