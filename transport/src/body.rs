//! Message bodies shared by HTTP/3 and HTTP/2, so handlers and callers never see which one
//! carried them.
//!
//! Bodies stream: a [`SendBody`] yields pieces as the transport asks for them and a
//! [`RecvBody`] hands out pieces as they arrive, so a multi-gigabyte object is never held
//! in memory.

use std::fmt;
use std::io;
use std::pin::Pin;

use bytes::{Buf, Bytes};
use futures_util::stream::{BoxStream, Stream, StreamExt};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// Which HTTP version carried a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// HTTP/3 over QUIC.
    Http3,
    /// HTTP/2 over TLS on TCP, the fallback where UDP is blocked.
    Http2,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Http3 => "HTTP/3",
            Self::Http2 => "HTTP/2",
        })
    }
}

/// Size of the pieces read from a file for a streaming body.
const FILE_PIECE: usize = 256 * 1024;

/// A body to send: empty, one buffer, or a stream of buffers.
pub struct SendBody {
    inner: SendInner,
}

enum SendInner {
    Empty,
    Full(Bytes),
    Stream(BoxStream<'static, io::Result<Bytes>>),
}

impl SendBody {
    /// No body.
    pub fn empty() -> Self {
        Self {
            inner: SendInner::Empty,
        }
    }

    /// A body held in one buffer.
    pub fn from_bytes(bytes: impl Into<Bytes>) -> Self {
        Self {
            inner: SendInner::Full(bytes.into()),
        }
    }

    /// A body produced piece by piece; an error aborts the message.
    pub fn from_stream<S>(stream: S) -> Self
    where
        S: Stream<Item = io::Result<Bytes>> + Send + 'static,
    {
        Self {
            inner: SendInner::Stream(stream.boxed()),
        }
    }

    /// `len` bytes of `file` from `offset`, read in 256 KiB pieces as they are sent.
    pub fn from_file(file: tokio::fs::File, offset: u64, len: u64) -> Self {
        let state = (file, offset, len, false);
        let stream = futures_util::stream::try_unfold(
            state,
            |(mut file, offset, left, sought)| async move {
                if left == 0 {
                    return Ok::<_, io::Error>(None);
                }
                if !sought {
                    file.seek(io::SeekFrom::Start(offset)).await?;
                }
                let want = usize::try_from(left).unwrap_or(usize::MAX).min(FILE_PIECE);
                let mut piece = vec![0u8; want];
                file.read_exact(&mut piece).await?;
                Ok(Some((
                    Bytes::from(piece),
                    (file, offset, left - want as u64, true),
                )))
            },
        );
        Self::from_stream(stream)
    }

    /// The next piece, `None` at the end.
    pub(crate) async fn next(&mut self) -> Option<io::Result<Bytes>> {
        match std::mem::replace(&mut self.inner, SendInner::Empty) {
            SendInner::Empty => None,
            SendInner::Full(bytes) => Some(Ok(bytes)),
            SendInner::Stream(mut stream) => {
                let item = stream.next().await;
                if item.is_some() {
                    self.inner = SendInner::Stream(stream);
                }
                item
            }
        }
    }

    /// Converts into a body hyper can send.
    pub(crate) fn into_http_body(self) -> UnsyncBoxBody<Bytes, io::Error> {
        match self.inner {
            SendInner::Empty => http_body_util::Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed_unsync(),
            SendInner::Full(bytes) => http_body_util::Full::new(bytes)
                .map_err(|never| match never {})
                .boxed_unsync(),
            SendInner::Stream(stream) => {
                let frames = stream.map(|piece| piece.map(http_body::Frame::data));
                http_body_util::StreamBody::new(frames).boxed_unsync()
            }
        }
    }
}

impl Default for SendBody {
    fn default() -> Self {
        Self::empty()
    }
}

impl From<Bytes> for SendBody {
    fn from(bytes: Bytes) -> Self {
        Self::from_bytes(bytes)
    }
}

impl fmt::Debug for SendBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.inner {
            SendInner::Empty => "SendBody::Empty",
            SendInner::Full(_) => "SendBody::Full",
            SendInner::Stream(_) => "SendBody::Stream",
        })
    }
}

/// A body being received.
pub struct RecvBody {
    inner: RecvInner,
}

pub(crate) enum RecvInner {
    Empty,
    H3Server(h3::server::RequestStream<h3_quinn::RecvStream, Bytes>),
    H3Client(h3::client::RequestStream<h3_quinn::RecvStream, Bytes>),
    H2(hyper::body::Incoming),
    #[allow(dead_code)] // Only built by `RecvBody::from_stream`.
    Stream(Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>),
}

impl RecvBody {
    pub(crate) fn new(inner: RecvInner) -> Self {
        Self { inner }
    }

    /// A body with no bytes.
    pub fn empty() -> Self {
        Self {
            inner: RecvInner::Empty,
        }
    }

    /// A body that yields the pieces of `stream`; lets handlers be called without a
    /// network, and lets a caller wrap the body it was given.
    pub fn from_stream<S>(stream: S) -> Self
    where
        S: Stream<Item = io::Result<Bytes>> + Send + 'static,
    {
        Self {
            inner: RecvInner::Stream(Box::pin(stream)),
        }
    }

    /// The next piece as it arrives; `None` once the sender finished.
    ///
    /// # Errors
    /// [`BodyError::Stream`] when the stream was reset or the connection lost.
    ///
    /// # Cancel safety
    /// Cancel safe: a piece is either returned or left in the transport.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        match &mut self.inner {
            RecvInner::Empty => Ok(None),
            RecvInner::H3Server(stream) => {
                let piece = stream
                    .recv_data()
                    .await
                    .map_err(|e| BodyError::Stream(e.to_string()))?;
                Ok(piece.map(|mut buf| buf.copy_to_bytes(buf.remaining())))
            }
            RecvInner::H3Client(stream) => {
                let piece = stream
                    .recv_data()
                    .await
                    .map_err(|e| BodyError::Stream(e.to_string()))?;
                Ok(piece.map(|mut buf| buf.copy_to_bytes(buf.remaining())))
            }
            RecvInner::H2(incoming) => loop {
                let Some(frame) = incoming.frame().await else {
                    return Ok(None);
                };
                let frame = frame.map_err(|e| BodyError::Stream(e.to_string()))?;
                // Trailers carry nothing Fedmesh uses; skip them.
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
            },
            RecvInner::Stream(stream) => stream
                .next()
                .await
                .transpose()
                .map_err(|e| BodyError::Stream(e.to_string())),
        }
    }

    /// Collects the whole body, refusing more than `limit` bytes.
    ///
    /// # Errors
    /// [`BodyError::TooLarge`] past `limit`; [`BodyError::Stream`] when the stream fails.
    pub async fn to_bytes(&mut self, limit: usize) -> Result<Bytes, BodyError> {
        let mut collected = Vec::new();
        while let Some(piece) = self.chunk().await? {
            if collected.len() + piece.len() > limit {
                return Err(BodyError::TooLarge { limit });
            }
            collected.extend_from_slice(&piece);
        }
        Ok(Bytes::from(collected))
    }
}

impl fmt::Debug for RecvBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecvBody")
    }
}

/// A body could not be received.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// The stream was reset or the connection lost mid-body.
    #[error("body stream broke: {0}")]
    Stream(String),
    /// The body is longer than the caller accepts.
    #[error("body exceeds the {limit}-byte limit")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
}
