//! Networks that drop UDP: the client falls back to HTTP/2 on TCP and returns to HTTP/3
//! once QUIC works again.

mod common;

use std::time::{Duration, Instant};

use anyhow::Result;
use common::{Lab, router, start_server};
use fedmesh_transport::{Client, Protocol, Server, ServerConfig};

#[tokio::test]
async fn request_succeeds_over_http2_when_udp_is_blocked() -> Result<()> {
    let lab = Lab::new("fl.example")?;
    let server = start_server(lab.source("core", "/core")?, router(None)).await?;
    let store = lab.source("store", "/store/emea/0042")?;

    // A UDP socket that reads nothing and answers nothing: packets vanish as behind a
    // router that drops UDP, while TCP to the server works.
    let blackhole = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut config = common::client_config(&server);
    config.quic_addr = blackhole.local_addr()?;
    config.quic_connect_timeout = Duration::from_secs(1);
    let client = Client::new(config, store)?;

    let started = Instant::now();
    let response = client.get("/whoami").await?;
    let elapsed = started.elapsed();
    assert_eq!(response.protocol(), Protocol::Http2);
    assert_eq!(
        &response.bytes(1024).await?[..],
        b"spiffe://fl.example/store/emea/0042 HTTP/2"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "fallback took {elapsed:?}"
    );
    Ok(())
}

#[tokio::test]
async fn client_returns_to_http3_once_quic_is_reachable_again() -> Result<()> {
    let lab = Lab::new("fl.example")?;
    let core = lab.source("core", "/core")?;
    let tcp_server = start_server(core.clone(), router(None)).await?;
    let store = lab.source("store", "/store/emea/0042")?;

    // 1. UDP blocked: the first request goes over HTTP/2.
    let blackhole = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let udp_addr = blackhole.local_addr()?;
    let mut config = common::client_config(&tcp_server);
    config.quic_addr = udp_addr;
    config.quic_connect_timeout = Duration::from_millis(500);
    config.quic_retry_after = Duration::from_secs(1);
    let client = Client::new(config, store)?;
    assert_eq!(client.get("/whoami").await?.protocol(), Protocol::Http2);

    // 2. UDP unblocked: a QUIC server now answers on that port.
    drop(blackhole);
    let quic_config = ServerConfig {
        quic_addr: udp_addr,
        tcp_addr: None,
        keepalive: common::fast_keepalive(),
        stateless_reset_key: None,
    };
    let _quic_server = Server::bind(quic_config, core, router(None)).await?;

    // 3. Before the retry interval the client stays on TCP; after it, it moves back.
    assert_eq!(client.get("/whoami").await?.protocol(), Protocol::Http2);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(client.get("/whoami").await?.protocol(), Protocol::Http3);
    Ok(())
}
