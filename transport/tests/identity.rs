//! Who may connect: mutual TLS with SPIFFE identities, over HTTP/3 and HTTP/2.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::{Lab, raw_request, router, start_server};
use fedmesh_transport::pki::Validity;
use fedmesh_transport::server::CLOSE_PEER_EXPIRED;
use fedmesh_transport::{Client, ClientError, PeerPolicy, Protocol, SpiffeId};
use http::StatusCode;

/// Starts a core server of `fl.example` and returns it with its lab.
async fn core_server() -> Result<(Lab, fedmesh_transport::Server)> {
    let lab = Lab::new("fl.example")?;
    let source = lab.source("core", "/core")?;
    let server = start_server(source, router(None)).await?;
    Ok((lab, server))
}

#[tokio::test]
async fn admits_valid_store_and_handler_sees_its_spiffe_id() -> Result<()> {
    let (lab, server) = core_server().await?;
    let store = lab.issue("store", "/store/emea/0042")?;

    let (status, body) = raw_request(server.quic_addr(), Some(&store)).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "spiffe://fl.example/store/emea/0042 HTTP/3");
    Ok(())
}

#[tokio::test]
async fn handler_sees_trust_domain_lowercased() -> Result<()> {
    let (lab, server) = core_server().await?;
    let uri = "spiffe://FL.example/store/emea/0042".to_owned();
    let issued = lab
        .ca
        .issue_with_uris(&[uri], Validity::starting_now(Duration::from_secs(600)))?;
    let store = issued.write_to(&lab.path("upper"))?;

    let (status, body) = raw_request(server.quic_addr(), Some(&store)).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "spiffe://fl.example/store/emea/0042 HTTP/3");
    Ok(())
}

/// With TLS 1.3 the client may finish its handshake before the server refuses its
/// certificate, so refusal shows either at connect or at the first request.
async fn assert_refused(
    lab: &Lab,
    server: &fedmesh_transport::Server,
    paths: Option<&fedmesh_transport::SvidPaths>,
) {
    let _ = lab;
    let outcome = raw_request(server.quic_addr(), paths).await;
    assert!(outcome.is_err(), "expected refusal, got {outcome:?}");
}

#[tokio::test]
async fn refuses_client_without_certificate() -> Result<()> {
    let (lab, server) = core_server().await?;
    assert_refused(&lab, &server, None).await;
    Ok(())
}

#[tokio::test]
async fn refuses_certificate_from_another_ca() -> Result<()> {
    let (lab, server) = core_server().await?;
    // Same trust domain name, different CA key: the chain does not verify.
    let rogue = Lab::new("fl.example")?;
    let paths = rogue.issue("store", "/store/emea/0042")?;
    assert_refused(&lab, &server, Some(&paths)).await;
    Ok(())
}

#[tokio::test]
async fn refuses_certificate_of_another_trust_domain() -> Result<()> {
    let (lab, server) = core_server().await?;
    // Signed by our CA, but naming another trust domain.
    let uri = "spiffe://other.example/store/emea/0042".to_owned();
    let issued = lab
        .ca
        .issue_with_uris(&[uri], Validity::starting_now(Duration::from_secs(600)))?;
    let paths = issued.write_to(&lab.path("foreign"))?;
    assert_refused(&lab, &server, Some(&paths)).await;
    Ok(())
}

#[tokio::test]
async fn refuses_expired_certificate() -> Result<()> {
    let (lab, server) = core_server().await?;
    let now = std::time::SystemTime::now();
    let validity = Validity {
        not_before: now - Duration::from_secs(7200),
        not_after: now - Duration::from_secs(3600),
    };
    let issued = lab.ca.issue("/store/emea/0042", validity)?;
    let paths = issued.write_to(&lab.path("expired"))?;
    assert_refused(&lab, &server, Some(&paths)).await;
    Ok(())
}

#[tokio::test]
async fn refuses_certificate_with_two_uri_sans() -> Result<()> {
    let (lab, server) = core_server().await?;
    let uris = [
        "spiffe://fl.example/store/emea/0042".to_owned(),
        "spiffe://fl.example/core".to_owned(),
    ];
    let issued = lab
        .ca
        .issue_with_uris(&uris, Validity::starting_now(Duration::from_secs(600)))?;
    let paths = issued.write_to(&lab.path("two-sans"))?;
    assert_refused(&lab, &server, Some(&paths)).await;
    Ok(())
}

#[tokio::test]
async fn client_api_works_over_http3_and_http2_with_same_identity() -> Result<()> {
    let (lab, server) = core_server().await?;
    let store = lab.source("store", "/store/emea/0042")?;

    let client = common::client(&server, store.clone())?;
    let text = client.get("/whoami").await?.bytes(1024).await?;
    assert_eq!(&text[..], b"spiffe://fl.example/store/emea/0042 HTTP/3");

    // Same server, QUIC pointed at a closed port: the TCP path carries the same identity.
    let mut config = common::client_config(&server);
    config.quic_addr = "127.0.0.1:9".parse()?;
    config.quic_connect_timeout = Duration::from_millis(300);
    let tcp_client = Client::new(config, store)?;
    let response = tcp_client.get("/whoami").await?;
    assert_eq!(response.protocol(), Protocol::Http2);
    assert_eq!(
        response.peer().spiffe_id().to_string(),
        "spiffe://fl.example/core"
    );
    assert_eq!(
        &response.bytes(1024).await?[..],
        b"spiffe://fl.example/store/emea/0042 HTTP/2"
    );
    Ok(())
}

#[tokio::test]
async fn client_refuses_server_with_unexpected_spiffe_id_without_retrying() -> Result<()> {
    let (lab, server) = core_server().await?;
    let store = lab.source("store", "/store/emea/0042")?;
    let mut config = common::client_config(&server);
    config.expected_server = PeerPolicy::Exact(SpiffeId::new("spiffe://fl.example/pop/chicago")?);
    let client = Client::new(config, store)?;

    let started = std::time::Instant::now();
    let outcome = client.get("/whoami").await;
    assert!(
        matches!(outcome, Err(ClientError::Refused(_))),
        "a core server must not pass for a PoP: {outcome:?}"
    );
    // A refusal is final: no backoff rounds, no fallback to TCP.
    assert!(started.elapsed() < Duration::from_secs(2));
    Ok(())
}

#[tokio::test]
async fn client_with_untrusted_svid_is_told_it_was_refused() -> Result<()> {
    let (_lab, server) = core_server().await?;
    let rogue = Lab::new("fl.example")?;
    let client = common::client(&server, rogue.source("store", "/store/emea/0042")?)?;

    let outcome = client.get("/whoami").await;
    assert!(
        matches!(outcome, Err(ClientError::Refused(_))),
        "{outcome:?}"
    );
    Ok(())
}

#[tokio::test]
async fn closes_connection_when_peer_certificate_expires() -> Result<()> {
    let (lab, server) = core_server().await?;
    let now = std::time::SystemTime::now();
    let validity = Validity {
        not_before: now - Duration::from_secs(60),
        not_after: now + Duration::from_secs(2),
    };
    let paths = lab
        .ca
        .issue("/store/emea/0042", validity)?
        .write_to(&lab.path("short"))?;

    let conn = common::raw_connect(server.quic_addr(), Some(&paths)).await?;
    let mut session = common::raw_h3(&conn).await?;
    let (status, _) = common::raw_whoami(&mut session).await?;
    assert_eq!(status, StatusCode::OK);

    // Certificate times have one-second resolution: allow the rest of that second plus one.
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await?;
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                close.error_code,
                quinn::VarInt::from_u32(CLOSE_PEER_EXPIRED)
            );
        }
        other => panic!("expected an application close for expiry, got {other}"),
    }
    Ok(())
}

#[tokio::test]
async fn rotated_svid_is_presented_on_new_connections_without_restart() -> Result<()> {
    let lab = Lab::new("fl.example")?;
    let paths = lab.issue("core", "/core")?;
    let source = fedmesh_transport::FileSvidSource::load(paths.clone())?;
    let _watch = source.watch(Duration::from_millis(50));
    let server = start_server(source.clone(), router(None)).await?;
    let store = lab.source("store", "/store/emea/0042")?;

    let before = common::client(&server, store.clone())?
        .get("/whoami")
        .await?;
    assert_eq!(
        before.peer().certificate_sha256(),
        common::leaf_sha256(&paths.chain)?
    );

    // Rotate on disk and wait for the watcher to pick it up.
    let issued = lab
        .ca
        .issue("/core", Validity::starting_now(Duration::from_secs(7200)))?;
    let rotated = common::rotate(&issued, &lab.path("core"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while source.generation() == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        source.generation(),
        1,
        "the watcher reloads the rotated files"
    );

    let after = common::client(&server, store)?.get("/whoami").await?;
    assert_eq!(
        after.peer().certificate_sha256(),
        common::leaf_sha256(&rotated.chain)?
    );
    assert_ne!(
        after.peer().certificate_sha256(),
        before.peer().certificate_sha256()
    );
    Ok(())
}

#[tokio::test]
async fn open_connection_is_refused_once_its_ca_leaves_the_bundle() -> Result<()> {
    let lab = Lab::new("fl.example")?;
    let paths = lab.issue("core", "/core")?;
    let source = fedmesh_transport::FileSvidSource::load(paths.clone())?;
    let server = start_server(source.clone(), router(None)).await?;
    let store = lab.issue("store", "/store/emea/0042")?;
    let conn = common::raw_connect(server.quic_addr(), Some(&store)).await?;
    let mut session = common::raw_h3(&conn).await?;
    assert_eq!(common::raw_whoami(&mut session).await?.0, StatusCode::OK);

    // The trust domain moves to a new CA and the old one leaves the bundle: the store's
    // certificate is no longer trusted, even on the connection it already has.
    let successor = Lab::new("fl.example")?;
    std::fs::write(&paths.bundle, successor.ca.certificate_pem())?;
    assert!(source.reload()?);
    let (status, body) = common::raw_whoami(&mut session).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    Ok(())
}
