//! MQTT over WebSocket (MQTT 5.0 §6): the HTTP upgrade on path `/mqtt` with the `mqtt`
//! subprotocol, and [`WsStream`], which makes the WebSocket look like a byte stream so the
//! connection task runs unchanged over it.
//!
//! MQTT rides in binary messages, and a packet may span messages or a message carry
//! several packets, so incoming message payloads are simply concatenated. Each write
//! becomes one binary message. A text message is a protocol error that closes the
//! connection [MQTT-6.0.0-1]; pings are answered by tungstenite while reading.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// The only request path served, as MQTT.js and paho use by default.
pub const PATH: &str = "/mqtt";

/// Subprotocols accepted, in order of preference (`mqttv3.1` is what old clients ask for).
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Runs the server side of the WebSocket handshake on `stream`.
///
/// `max_message` bounds one WebSocket message (and frame), so a client cannot make the
/// broker buffer more than about one maximum-size MQTT packet.
pub async fn accept<S>(stream: S, max_message: usize) -> Result<WsStream<S>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    let inner =
        tokio_tungstenite::accept_hdr_async_with_config(stream, check_upgrade, Some(config))
            .await?;
    Ok(WsStream {
        inner,
        pending: Bytes::new(),
        eof: false,
    })
}

/// Accepts an upgrade only on [`PATH`], and picks the `mqtt` subprotocol. A request that
/// names no subprotocol at all is let through (some embedded clients omit it); one that
/// names only others is refused, as the browser would refuse our answer anyway.
// The signature is tungstenite's handshake callback; its error is an HTTP response.
#[allow(clippy::result_large_err)]
fn check_upgrade(request: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
    if request.uri().path() != PATH {
        return Err(refusal(
            StatusCode::NOT_FOUND,
            format!("MQTT over WebSocket is served on {PATH}"),
        ));
    }
    let offered: Vec<&str> = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if offered.is_empty() {
        return Ok(response);
    }
    let chosen = SUBPROTOCOLS
        .iter()
        .find(|want| offered.iter().any(|p| p.eq_ignore_ascii_case(want)));
    match chosen {
        Some(protocol) => {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(protocol),
            );
            Ok(response)
        }
        None => Err(refusal(
            StatusCode::BAD_REQUEST,
            "the WebSocket subprotocol must be mqtt".into(),
        )),
    }
}

fn refusal(status: StatusCode, why: String) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(why));
    *response.status_mut() = status;
    response
}

/// A WebSocket carrying MQTT, read and written as a byte stream.
pub struct WsStream<S> {
    inner: WebSocketStream<S>,
    /// The unread rest of the last binary message.
    pending: Bytes,
    /// The peer closed (Close frame or end of stream).
    eof: bool,
}

fn to_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::from(io::ErrorKind::NotConnected)
        }
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.pending = data,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => this.eof = true,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text WebSocket message: MQTT travels in binary messages",
                    )));
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let inner = &mut self.get_mut().inner;
        ready!(Pin::new(&mut *inner).poll_ready(cx)).map_err(to_io)?;
        Pin::new(inner)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(to_io)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner)
            .poll_flush(cx)
            .map_err(to_io)
    }

    /// Sends a Close frame; the peer's answering Close then reads as end of stream.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner)
            .poll_close(cx)
            .map_err(to_io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    async fn pair(
        path: &str,
        protocol: Option<&str>,
    ) -> (
        Result<WsStream<DuplexStream>, WsError>,
        Result<WebSocketStream<DuplexStream>, WsError>,
    ) {
        let (server, client) = duplex(64 * 1024);
        let mut request = format!("ws://localhost{path}")
            .into_client_request()
            .expect("request");
        if let Some(p) = protocol {
            request.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_str(p).expect("header"),
            );
        }
        let (s, c) = tokio::join!(
            accept(server, 1024),
            tokio_tungstenite::client_async(request, client)
        );
        (
            s,
            c.map(|(ws, response)| {
                if protocol.is_some() {
                    assert_eq!(
                        response.headers().get(header::SEC_WEBSOCKET_PROTOCOL),
                        Some(&HeaderValue::from_static("mqtt"))
                    );
                }
                ws
            }),
        )
    }

    #[tokio::test]
    async fn bytes_cross_message_boundaries_both_ways() {
        let (server, client) = pair("/mqtt", Some("mqtt")).await;
        let (mut server, mut client) = (server.expect("server"), client.expect("client"));
        // One MQTT PINGREQ split over two messages, then a ping, then two bytes more.
        client
            .send(Message::Binary(Bytes::from_static(&[0xC0])))
            .await
            .expect("send");
        client
            .send(Message::Ping(Bytes::from_static(b"hi")))
            .await
            .expect("ping");
        client
            .send(Message::Binary(Bytes::from_static(&[0x00, 0xC0, 0x00])))
            .await
            .expect("send");
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(got, [0xC0, 0x00, 0xC0, 0x00]);

        server.write_all(&[0xD0, 0x00]).await.expect("write");
        server.flush().await.expect("flush");
        loop {
            match client.next().await.expect("open").expect("message") {
                Message::Binary(b) => {
                    assert_eq!(&b[..], &[0xD0, 0x00]);
                    break;
                }
                Message::Pong(p) => assert_eq!(&p[..], b"hi"),
                other => panic!("unexpected {other:?}"),
            }
        }

        // Close from the server reads as end of stream on both sides.
        server.shutdown().await.expect("close");
        assert!(matches!(client.next().await, Some(Ok(Message::Close(_)))));
        drop(client);
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.ok();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn text_message_is_an_error() {
        let (server, client) = pair("/mqtt", None).await;
        let (mut server, mut client) = (server.expect("server"), client.expect("client"));
        client.send(Message::text("hello")).await.expect("send");
        let mut byte = [0u8; 1];
        let e = server.read(&mut byte).await.expect_err("text refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    /// The HTTP status the client saw when the upgrade was refused.
    fn refused_with(client: Result<WebSocketStream<DuplexStream>, WsError>) -> StatusCode {
        match client {
            Err(WsError::Http(response)) => response.status(),
            Err(other) => panic!("refused without an HTTP answer: {other:?}"),
            Ok(_) => panic!("upgrade accepted"),
        }
    }

    #[tokio::test]
    async fn wrong_path_or_subprotocol_is_refused() {
        let (server, client) = pair("/other", Some("mqtt")).await;
        assert!(server.is_err());
        assert_eq!(refused_with(client), StatusCode::NOT_FOUND);
        let (server, client) = pair("/mqtt", Some("chat, superchat")).await;
        assert!(server.is_err());
        assert_eq!(refused_with(client), StatusCode::BAD_REQUEST);
        let (server, client) = pair("/mqtt?x=1", Some("chat, mqtt")).await;
        assert!(server.is_ok() && client.is_ok());
    }

    #[tokio::test]
    async fn oversized_message_is_refused() {
        let (server, client) = pair("/mqtt", Some("mqtt")).await;
        let (mut server, mut client) = (server.expect("server"), client.expect("client"));
        let big = Bytes::from(vec![0u8; 4096]);
        let _ = client.send(Message::Binary(big)).await;
        let mut byte = [0u8; 1];
        let e = server
            .read(&mut byte)
            .await
            .expect_err("oversized message refused");
        // The refusal is the size bound, not some other failure of the stream.
        let cause = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<WsError>());
        assert!(
            matches!(
                cause,
                Some(WsError::Capacity(
                    tokio_tungstenite::tungstenite::error::CapacityError::MessageTooLong { .. }
                ))
            ),
            "{e:?}"
        );
    }
}
