//! Shared pieces of the lab's socket tests: a dev PKI, fake PoPs and a UDP echo.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use fedmesh_transport::pki::{DevPkiLayout, DevPkiSpec, write_dev_pki};
use fedmesh_transport::server::{Request, Response};
use fedmesh_transport::{FileSvidSource, KeepAlive, Router, Server, ServerConfig, SvidSource};
use http::{Method, StatusCode};
use tokio::net::UdpSocket;

/// A dev PKI with one PoP metro (`chicago`) and one store (`north/2`).
pub fn pki(dir: &Path) -> Result<DevPkiLayout> {
    let spec = DevPkiSpec {
        trust_domain: "fedmesh.test".into(),
        ca_lifetime: Duration::from_secs(86_400),
        svid_lifetime: Duration::from_secs(3_600),
        pops: vec!["chicago".into()],
        stores: vec![("north".into(), "2".into())],
    };
    Ok(write_dev_pki(dir, &spec)?)
}

/// Loads an SVID source.
pub fn source(paths: &fedmesh_transport::SvidPaths) -> Result<Arc<dyn SvidSource>> {
    Ok(FileSvidSource::load(paths.clone())?)
}

/// A free port on 127.0.0.1 for both UDP and TCP (released again: the caller binds it).
pub fn free_port_pair() -> Result<SocketAddr> {
    for _ in 0..32 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let addr = udp.local_addr()?;
        if std::net::TcpListener::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    anyhow::bail!("no free udp+tcp port pair")
}

/// A fake PoP: answers `GET /name` with `name`, and `GET /readyz` with `ready`'s body.
pub async fn fake_pop(
    source: Arc<dyn SvidSource>,
    name: &'static str,
    withdraw: Arc<std::sync::atomic::AtomicBool>,
) -> Result<Server> {
    let router = Router::new()
        .route(Method::GET, "/name", move |_r: Request| async move {
            Response::text(StatusCode::OK, name)
        })
        .route(Method::GET, "/readyz", move |_r: Request| {
            let withdrawn = withdraw.load(std::sync::atomic::Ordering::Relaxed);
            async move {
                if withdrawn {
                    Response::json(StatusCode::SERVICE_UNAVAILABLE, &"withdraw")
                } else {
                    Response::json(StatusCode::OK, &"ready")
                }
            }
        });
    let addr = free_port_pair()?;
    let config = ServerConfig {
        quic_addr: addr,
        tcp_addr: Some(addr),
        keepalive: KeepAlive {
            interval: Duration::from_millis(300),
            timeout: Duration::from_secs(1),
        },
        stateless_reset_key: None,
    };
    Ok(Server::bind(config, source, router).await?)
}

/// A UDP echo server; returns its address.
pub async fn udp_echo() -> Result<SocketAddr> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    let addr = socket.local_addr()?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((len, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..len], from).await;
        }
    });
    Ok(addr)
}
