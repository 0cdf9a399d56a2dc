//! Servers behind one anycast address share a stateless-reset key: when the server a client
//! talks to disappears and its packets reach another one, that one resets the connection
//! at once, and the client does not wait out its idle timeout.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::{Lab, UdpRelay, raw_connect, raw_h3, raw_whoami, router};
use fedmesh_transport::{KeepAlive, ResetKey, Server, ServerConfig};

async fn server(lab: &Lab, name: &str, key: Option<ResetKey>) -> Result<Server> {
    let config = ServerConfig {
        quic_addr: "127.0.0.1:0".parse()?,
        tcp_addr: None,
        // Longer than the test waits: only a reset can end the connection in time.
        keepalive: KeepAlive {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(60),
        },
        stateless_reset_key: key,
    };
    let source = lab.source(name, &format!("/pop/{name}"))?;
    Ok(Server::bind(config, source, router(None)).await?)
}

/// Connects through a relay to `first`, then moves the relay to `second` and sends on the
/// connection; returns how the connection ended within 5 s, if it did.
async fn moved_connection_end(
    first: &Server,
    second: &Server,
    lab: &Lab,
) -> Result<Option<quinn::ConnectionError>> {
    let relay = UdpRelay::start(first.quic_addr()).await?;
    let store = lab.issue("store", "/store/emea/0042")?;
    let conn = raw_connect(relay.addr, Some(&store)).await?;
    // A request answered: the handshake is confirmed and packets carry short headers, the
    // only ones a stateless reset answers.
    let mut h3 = raw_h3(&conn).await?;
    assert_eq!(raw_whoami(&mut h3).await?.0, http::StatusCode::OK);

    relay.move_to(second.quic_addr());
    let mut stream = conn.open_uni().await?;
    let _ = stream.write_all(&[0u8; 64]).await;
    Ok(tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .ok())
}

#[tokio::test]
async fn the_anycast_peer_resets_a_dead_servers_connection_at_once() -> Result<()> {
    let lab = Lab::new("fl.example")?;
    let key = ResetKey::from_hex(&"3c".repeat(32)).expect("key");
    let dead = server(&lab, "chicago-1", Some(key.clone())).await?;
    let peer = server(&lab, "chicago-2", Some(key)).await?;

    let end = moved_connection_end(&dead, &peer, &lab).await?;
    assert!(
        matches!(end, Some(quinn::ConnectionError::Reset)),
        "connection ended with {end:?}"
    );
    Ok(())
}

#[tokio::test]
async fn without_a_shared_key_the_peers_reset_is_ignored() -> Result<()> {
    let lab = Lab::new("fl.example")?;
    let dead = server(&lab, "chicago-1", None).await?;
    let peer = server(&lab, "chicago-2", None).await?;

    // The peer's reset carries a token the client cannot match: the connection lives on
    // until its idle timeout (30 s by quinn's default, longer than the test waits).
    let end = moved_connection_end(&dead, &peer, &lab).await?;
    assert!(end.is_none(), "connection ended with {end:?}");
    Ok(())
}

#[test]
fn reset_keys_parse_from_64_hex_digits_only() {
    assert!(ResetKey::from_hex(&format!("{}\n", "0f".repeat(32))).is_ok());
    let short = ResetKey::from_hex("abcd").unwrap_err();
    assert_eq!(short, "expected 64 hex digits, found 4 characters");
    let bad = ResetKey::from_hex(&"zz".repeat(32)).unwrap_err();
    assert_eq!(bad, "not hexadecimal");
    // The key never shows in logs.
    let key = ResetKey::new([1; 32]);
    assert_eq!(format!("{key:?}"), "ResetKey(..)");
}
