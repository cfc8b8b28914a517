//! One connection to `kvmtrace export`: the TLS handshake (bounded by
//! `--header-timeout`), then HTTP/1.1 with each request head bounded in time
//! (`--header-timeout`) and size (`--max-request-bytes`), basic auth, and the
//! configuration's headers on every response.
//!
//! Scrapes never overlap: the exporter is one `RefCell` on a single-threaded runtime and
//! a scrape reads the maps without yielding, so a scrape that arrives during another
//! waits for it and then makes its own read (each answer is as fresh as its request).

use std::{cell::RefCell, convert::Infallible, net::SocketAddr, rc::Rc, time::Duration};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use super::{
    Exporter,
    auth::Auth,
    respond,
    site::Site,
    slots::{Closed, Slot},
};

/// The first byte a TLS client sends: that of a handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// The answer to a plain-HTTP request on the TLS port.
const PLAIN_ON_TLS: &[u8] = b"HTTP/1.0 400 Bad Request\r\n\
    Content-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n\
    kvmtrace export serves HTTPS on this port: use https://\n";

/// What bounds a connection.
#[derive(Clone, Copy)]
pub struct Limits {
    /// For the TLS handshake, and then for each request head.
    pub header_timeout: Duration,
    /// The largest request head.
    pub max_request_bytes: usize,
}

/// What every connection shares.
pub struct Shared {
    pub exporter: RefCell<Exporter>,
    pub auth: Auth,
    pub limits: Limits,
}

/// Serves one connection until it ends, fails, or must make room for a newer one.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    site: Rc<Site>,
    (slot, closed): (Slot, Closed),
    shared: Rc<Shared>,
) {
    tokio::select! {
        () = connection(stream, peer, site, Rc::new(slot), shared) => {}
        _ = closed => log::debug!("connection from {peer}: closed to make room (--max-connections)"),
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    site: Rc<Site>,
    slot: Rc<Slot>,
    shared: Rc<Shared>,
) {
    let Some(acceptor) = site.tls.clone() else {
        return http(stream, peer, site, slot, shared).await;
    };
    match tokio::time::timeout(shared.limits.header_timeout, handshake(stream, &acceptor)).await {
        Ok(Ok(Some(tls))) => http(tls, peer, site, slot, shared).await,
        Ok(Ok(None)) => {
            log::debug!("connection from {peer}: plain HTTP on the TLS port (answered 400)")
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
            // A client that speaks TLS and was refused (its certificate, its versions).
            log::info!("connection from {peer}: TLS handshake failed: {e}");
        }
        Ok(Err(e)) => log::debug!("connection from {peer}: TLS handshake: {e}"),
        Err(_) => log::debug!("connection from {peer}: no TLS handshake within --header-timeout"),
    }
}

/// The TLS handshake; `None` when the client spoke plain HTTP instead (it is told so)
/// or left before saying anything.
async fn handshake(
    mut stream: TcpStream,
    acceptor: &TlsAcceptor,
) -> std::io::Result<Option<TlsStream<TcpStream>>> {
    let mut first = [0; 1];
    if stream.peek(&mut first).await? == 0 {
        return Ok(None);
    }
    if first[0] != TLS_HANDSHAKE {
        stream.write_all(PLAIN_ON_TLS).await?;
        stream.shutdown().await?;
        return Ok(None);
    }
    acceptor.accept(stream).await.map(Some)
}

/// HTTP/1.1 on `io` until the client is done.
async fn http<I>(io: I, peer: SocketAddr, site: Rc<Site>, slot: Rc<Slot>, shared: Rc<Shared>)
where
    I: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let limits = shared.limits;
    let service = service_fn(move |req: Request<Incoming>| {
        let (site, slot, shared) = (Rc::clone(&site), Rc::clone(&slot), Rc::clone(&shared));
        async move { Ok::<_, Infallible>(answer(&req, &site, &slot, &shared).await) }
    });
    if let Err(e) = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // hyper's floor for its read buffer is 8 KiB; the head's own limit is below.
        .max_buf_size(limits.max_request_bytes.max(8192))
        .max_header_size(limits.max_request_bytes)
        .serve_connection(TokioIo::new(io), service)
        .await
    {
        log::debug!("connection from {peer}: {e}");
    }
}

/// The answer to one request: 401 unless basic auth lets it through.
async fn answer(
    req: &Request<Incoming>,
    site: &Site,
    slot: &Slot,
    shared: &Shared,
) -> Response<Full<Bytes>> {
    let authorization = req.headers().get(header::AUTHORIZATION);
    let mut response = if shared.auth.allows(&site.users, authorization).await {
        slot.proven();
        respond(&shared.exporter, req)
    } else {
        let mut r = Response::new(Full::new(Bytes::from_static(
            b"401 Unauthorized: give a user and password of basic_auth_users\n",
        )));
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        let headers = r.headers_mut();
        headers.insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic"),
        );
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    for (name, value) in &site.headers {
        response.headers_mut().insert(name.clone(), value.clone());
    }
    response
}
