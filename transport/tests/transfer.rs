//! Resumable, content-addressed uploads.

mod common;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use common::{Lab, router, same_contents, start_server, write_pattern_file};
use fedmesh_transport::transfer::ObjectStore;
use fedmesh_transport::{Client, ClientError, Server, ServerConfig};
use http::StatusCode;

const CHUNK: u64 = 256 << 10;

/// Binds a server on exactly the addresses of a stopped one, retrying while the old
/// sockets are released.
async fn restart_on(
    quic: std::net::SocketAddr,
    tcp: std::net::SocketAddr,
    lab: &Lab,
    store: &Arc<ObjectStore>,
) -> Result<Server> {
    let source = lab.source("core2", "/core")?;
    let mut last = None;
    for _ in 0..40 {
        let config = ServerConfig {
            quic_addr: quic,
            tcp_addr: Some(tcp),
            keepalive: common::fast_keepalive(),
            stateless_reset_key: None,
        };
        match Server::bind(config, source.clone(), router(Some(store))).await {
            Ok(server) => return Ok(server),
            Err(error) => last = Some(error),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(last.context("no bind attempt")?.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_cut_by_server_restart_resumes_without_resending_acknowledged_chunks() -> Result<()>
{
    let lab = Lab::new("fl.example")?;
    let store = ObjectStore::open(&lab.path("received"), 1 << 30)?;
    let server = start_server(lab.source("core", "/core")?, router(Some(&store))).await?;
    let (quic, tcp) = (server.quic_addr(), server.tcp_addr().context("tcp")?);

    // 16 MiB in 256 KiB chunks: 64 chunks.
    let file = lab.path("update.bin");
    write_pattern_file(&file, 16 << 20, 42)?;
    let mut config = common::client_config(&server);
    config.chunk_size = CHUNK;
    config.retry.max_attempts = 30;
    let client = Client::new(config, lab.source("store", "/store/emea/0042")?)?;

    // 1. Start the upload and kill the server once a quarter of the chunks are in.
    let mut progress = store.progress();
    let upload = tokio::spawn({
        let client = client.clone();
        let file = file.clone();
        async move { client.put_object(&file).await }
    });
    tokio::time::timeout(Duration::from_secs(30), progress.wait_for(|n| *n >= 16)).await??;
    server.abort().await;
    let acknowledged = store.stats().chunks_written;
    assert!(
        acknowledged < 64,
        "the upload finished before the cut; nothing to resume"
    );

    // 2. The same receiver comes back on the same addresses; the sender resumes.
    let _server = restart_on(quic, tcp, &lab, &store).await?;
    let report = tokio::time::timeout(Duration::from_secs(60), upload).await???;

    // 3. Every chunk was written exactly once, and the second attempt started where the
    //    receiver's acknowledgements ended.
    let stats = store.stats();
    assert_eq!(stats.chunks_written, 64);
    assert_eq!(stats.duplicate_chunks, 0);
    assert_eq!(report.resumed_from.first(), Some(&0));
    assert_eq!(
        report.resumed_from.get(1),
        Some(&acknowledged),
        "report: {report:?}"
    );
    let received = store.object_path(&report.digest).context("object stored")?;
    assert!(same_contents(&received, &file)?);
    Ok(())
}

#[tokio::test]
async fn resending_a_complete_object_sends_nothing() -> Result<()> {
    let lab = Lab::new("fl.example")?;
    let store = ObjectStore::open(&lab.path("received"), 1 << 30)?;
    let server = start_server(lab.source("core", "/core")?, router(Some(&store))).await?;
    let file = lab.path("model.bin");
    write_pattern_file(&file, 3 * CHUNK + 100, 7)?;
    let mut config = common::client_config(&server);
    config.chunk_size = CHUNK;
    let client = Client::new(config, lab.source("store", "/store/emea/0042")?)?;

    let first = client.put_object(&file).await?;
    assert!(!first.already_present);
    let written = store.stats().chunks_written;
    assert_eq!(written, 4, "3 full chunks and one of 100 bytes");

    let second = client.put_object(&file).await?;
    assert!(second.already_present);
    assert_eq!(second.digest, first.digest);
    assert_eq!(store.stats().chunks_written, written);
    assert_eq!(store.stats().objects_completed, 1);
    Ok(())
}

#[tokio::test]
async fn sender_refuses_object_over_limit_before_connecting() -> Result<()> {
    let lab = Lab::new("fl.example")?;
    let store = ObjectStore::open(&lab.path("received"), 1 << 30)?;
    let server = start_server(lab.source("core", "/core")?, router(Some(&store))).await?;
    let file = lab.path("big.bin");
    write_pattern_file(&file, 2 << 20, 1)?;
    let mut config = common::client_config(&server);
    config.max_object_size = 1 << 20;
    let client = Client::new(config, lab.source("store", "/store/emea/0042")?)?;

    match client.put_object(&file).await {
        Err(ClientError::ObjectTooLarge { size, limit }) => {
            assert_eq!((size, limit), (2 << 20, 1 << 20));
        }
        other => panic!("expected ObjectTooLarge, got {other:?}"),
    }
    assert_eq!(client.protocol().await, None, "no connection was opened");
    assert_eq!(server.quic_connections(), 0);
    Ok(())
}

#[tokio::test]
async fn receiver_refuses_object_over_its_limit() -> Result<()> {
    let lab = Lab::new("fl.example")?;
    let store = ObjectStore::open(&lab.path("received"), 1 << 20)?;
    let server = start_server(lab.source("core", "/core")?, router(Some(&store))).await?;
    let file = lab.path("big.bin");
    write_pattern_file(&file, 2 << 20, 1)?;
    let client = common::client(&server, lab.source("store", "/store/emea/0042")?)?;

    match client.put_object(&file).await {
        Err(ClientError::Status { status, message }) => {
            assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
            assert!(message.contains("exceeds"), "{message}");
        }
        other => panic!("expected 413, got {other:?}"),
    }
    assert_eq!(store.stats().chunks_written, 0);
    Ok(())
}

#[tokio::test]
async fn downloads_a_stored_object_byte_identical() -> Result<()> {
    let lab = Lab::new("fl.example")?;
    let store = ObjectStore::open(&lab.path("received"), 1 << 30)?;
    let server = start_server(lab.source("core", "/core")?, router(Some(&store))).await?;
    let file = lab.path("model.bin");
    write_pattern_file(&file, 5 << 20, 9)?;
    let client = common::client(&server, lab.source("store", "/store/emea/0042")?)?;
    let report = client.put_object(&file).await?;

    let mut response = client
        .get(&format!("/objects/{}/data", report.digest))
        .await?;
    let copy = lab.path("copy.bin");
    let mut out = std::fs::File::create(&copy)?;
    while let Some(piece) = response.body_mut().chunk().await? {
        std::io::Write::write_all(&mut out, &piece)?;
    }
    drop(out);
    assert!(same_contents(&copy, &file)?);
    Ok(())
}

#[tokio::test]
async fn upload_over_http2_fallback_is_byte_identical() -> Result<()> {
    let lab = Lab::new("fl.example")?;
    let store = ObjectStore::open(&lab.path("received"), 1 << 30)?;
    let server = start_server(lab.source("core", "/core")?, router(Some(&store))).await?;
    let file = lab.path("update.bin");
    write_pattern_file(&file, 3 << 20, 5)?;
    let mut config = common::client_config(&server);
    config.quic_addr = "127.0.0.1:9".parse()?;
    config.quic_connect_timeout = Duration::from_millis(300);
    let client = Client::new(config, lab.source("store", "/store/emea/0042")?)?;

    let report = client.put_object(&file).await?;
    assert_eq!(
        client.protocol().await,
        Some(fedmesh_transport::Protocol::Http2)
    );
    let received = store.object_path(&report.digest).context("object stored")?;
    assert!(same_contents(&received, &file)?);
    Ok(())
}

#[tokio::test]
async fn receiver_refuses_chunk_that_does_not_match_its_digest() -> Result<()> {
    let lab = Lab::new("fl.example")?;
    let store = ObjectStore::open(&lab.path("received"), 1 << 30)?;
    let server = start_server(lab.source("core", "/core")?, router(Some(&store))).await?;
    let mut config = common::client_config(&server);
    config.chunk_size = CHUNK;
    let client = Client::new(config, lab.source("store", "/store/emea/0042")?)?;
    let file = lab.path("update.bin");
    write_pattern_file(&file, 2 * CHUNK, 3)?;
    let bytes = std::fs::read(&file)?;
    let (digest, _) = fedmesh_transport::transfer::manifest_of_file(&file, CHUNK)?;

    // 1. Announce the true manifest: each chunk's SHA-256.
    let mut digests = Vec::new();
    for chunk in bytes.chunks(CHUNK as usize) {
        digests.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, chunk).as_ref());
    }
    let mut headers = http::HeaderMap::new();
    headers.insert("fedmesh-object-size", (2 * CHUNK).into());
    headers.insert("fedmesh-chunk-size", CHUNK.into());
    let path = format!("/objects/{digest}/manifest");
    let body = fedmesh_transport::SendBody::from_bytes(digests);
    client
        .request(http::Method::PUT, &path, headers, body)
        .await?
        .success()
        .await?;

    // 2. Send the chunks with one bit flipped in the second.
    let mut tampered = bytes.clone();
    tampered[CHUNK as usize + 10] ^= 1;
    let mut headers = http::HeaderMap::new();
    headers.insert("fedmesh-first-chunk", 0u64.into());
    let path = format!("/objects/{digest}/chunks");
    let body = fedmesh_transport::SendBody::from_bytes(tampered);
    let response = client
        .request(http::Method::PUT, &path, headers, body)
        .await?;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let stats = store.stats();
    assert_eq!((stats.chunks_written, stats.corrupt_chunks), (1, 1));
    assert!(store.object_path(&digest).is_none());

    // 3. An honest sender resumes after the good chunk and completes the object.
    let report = client.put_object(&file).await?;
    assert_eq!(report.resumed_from, vec![1]);
    let received = store.object_path(&digest).context("object stored")?;
    assert!(same_contents(&received, &file)?);
    Ok(())
}

/// Announces `file`'s manifest in `chunk` pieces as `client`; the answer's status.
async fn announce(
    client: &Client,
    file: &std::path::Path,
    chunk: u64,
) -> Result<(fedmesh_transport::transfer::ObjectDigest, StatusCode)> {
    let bytes = std::fs::read(file)?;
    let (digest, _) = fedmesh_transport::transfer::manifest_of_file(file, chunk)?;
    let mut digests = Vec::new();
    for piece in bytes.chunks(chunk as usize) {
        digests.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, piece).as_ref());
    }
    let mut headers = http::HeaderMap::new();
    headers.insert("fedmesh-object-size", (bytes.len() as u64).into());
    headers.insert("fedmesh-chunk-size", chunk.into());
    let path = format!("/objects/{digest}/manifest");
    let body = fedmesh_transport::SendBody::from_bytes(digests);
    let response = client
        .request(http::Method::PUT, &path, headers, body)
        .await?;
    Ok((digest, response.status()))
}

/// Sends the first `count` chunks of `file` as `client`; the answer's status.
async fn send_chunks(
    client: &Client,
    file: &std::path::Path,
    digest: &fedmesh_transport::transfer::ObjectDigest,
    count: u64,
) -> Result<StatusCode> {
    let bytes = std::fs::read(file)?;
    let mut headers = http::HeaderMap::new();
    headers.insert("fedmesh-first-chunk", 0u64.into());
    let path = format!("/objects/{digest}/chunks");
    let body = bytes[..(count * CHUNK) as usize].to_vec();
    let body = fedmesh_transport::SendBody::from_bytes(body);
    let response = client
        .request(http::Method::PUT, &path, headers, body)
        .await?;
    Ok(response.status())
}

#[tokio::test]
async fn status_request_leaves_a_chunk_being_written_in_place() -> Result<()> {
    let lab = Lab::new("fl.example")?;
    let root = lab.path("received");
    let store = ObjectStore::open(&root, 1 << 30)?;
    let server = start_server(lab.source("core", "/core")?, router(Some(&store))).await?;
    let mut config = common::client_config(&server);
    config.chunk_size = CHUNK;
    let client = Client::new(config, lab.source("store", "/store/emea/0042")?)?;
    let file = lab.path("update.bin");
    write_pattern_file(&file, 2 * CHUNK, 11)?;
    let (digest, status) = announce(&client, &file, CHUNK).await?;
    assert_eq!(status, StatusCode::OK);

    // 1. The staging file as it is while chunk 1 is half written: chunk 0 and 1000 bytes.
    let bytes = std::fs::read(&file)?;
    let part = root.join("staging").join(format!("{digest}.part"));
    std::fs::write(&part, &bytes[..CHUNK as usize + 1000])?;

    // 2. A retrying sender asks for the status: one chunk acknowledged, nothing cut.
    let status = client.object_status(&digest).await?.context("status")?;
    assert_eq!((status.received_chunks, status.total_chunks), (1, 2));
    assert_eq!(std::fs::metadata(&part)?.len(), CHUNK + 1000);

    // 3. The upload resumes after chunk 0 and completes.
    let report = client.put_object(&file).await?;
    assert_eq!(report.resumed_from, vec![1]);
    let received = store.object_path(&digest).context("object stored")?;
    assert!(same_contents(&received, &file)?);
    Ok(())
}

#[tokio::test]
async fn sender_refuses_status_with_more_chunks_than_the_object() -> Result<()> {
    let lab = Lab::new("fl.example")?;
    // A receiver that claims u64::MAX chunks of an upload with the sender's sizes.
    let router = fedmesh_transport::Router::new().route(
        http::Method::GET,
        "/objects/{digest}",
        |request: fedmesh_transport::Request| async move {
            let status = fedmesh_transport::transfer::ObjectStatus {
                digest: request.param("digest").unwrap_or_default().to_owned(),
                size: 2 * CHUNK,
                chunk_size: CHUNK,
                received_chunks: u64::MAX,
                total_chunks: 2,
                complete: false,
            };
            fedmesh_transport::Response::json(StatusCode::OK, &status)
        },
    );
    let server = start_server(lab.source("core", "/core")?, router).await?;
    let mut config = common::client_config(&server);
    config.chunk_size = CHUNK;
    let client = Client::new(config, lab.source("store", "/store/emea/0042")?)?;
    let file = lab.path("update.bin");
    write_pattern_file(&file, 2 * CHUNK, 12)?;

    match client.put_object(&file).await {
        Err(ClientError::Malformed(message)) => {
            assert!(message.contains("received_chunks"), "{message}");
        }
        other => panic!("expected a malformed-reply error, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn another_peer_cannot_reset_an_upload_in_progress() -> Result<()> {
    let lab = Lab::new("fl.example")?;
    let store = ObjectStore::open(&lab.path("received"), 1 << 30)?;
    let server = start_server(lab.source("core", "/core")?, router(Some(&store))).await?;
    let mut config = common::client_config(&server);
    config.chunk_size = CHUNK;
    let owner = Client::new(config.clone(), lab.source("store", "/store/emea/0042")?)?;
    let other = Client::new(config, lab.source("store2", "/store/emea/0043")?)?;
    let file = lab.path("update.bin");
    write_pattern_file(&file, 3 * CHUNK, 13)?;

    // 1. The owner announces the object and sends one chunk of three.
    let (digest, status) = announce(&owner, &file, CHUNK).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        send_chunks(&owner, &file, &digest, 1).await?,
        StatusCode::OK
    );

    // 2. Another peer's manifest (a different chunk size) and chunks are refused.
    let (_, status) = announce(&other, &file, 2 * CHUNK).await?;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        send_chunks(&other, &file, &digest, 1).await?,
        StatusCode::CONFLICT
    );

    // 3. The owner's progress survived: it resumes after chunk 0.
    let report = owner.put_object(&file).await?;
    assert_eq!(report.resumed_from, vec![1]);
    assert_eq!(store.stats().chunks_written, 3);

    // 4. A complete object is idempotent for every peer.
    let again = other.put_object(&file).await?;
    assert!(again.already_present);
    Ok(())
}
