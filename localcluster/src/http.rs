//! HTTP GET from inside a network namespace (the agents' and the controller's endpoints),
//! with hyper's HTTP/1.1 client: the connection is opened in the namespace, the request and
//! response (chunked or not) are hyper's.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::netns::Netns;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// GETs `path` from `addr`, connecting from inside `netns`. Returns the status code and the
/// body (lossily decoded as UTF-8 once it is complete). Runs on a thread and runtime of its
/// own, so it may be called from synchronous code and from inside a tokio runtime alike.
pub fn get_in(netns: &Netns, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    // A socket stays in the namespace it was created in: connect there, talk from anywhere.
    let stream = netns
        .within(move || std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT))?
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nonblocking(true)?;
    let target = path.to_owned();
    std::thread::spawn(move || -> Result<(u16, String)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let io = TokioIo::new(tokio::net::TcpStream::from_std(stream)?);
            let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(connection);
            let request = hyper::Request::get(target.as_str())
                .header(hyper::header::HOST, addr.to_string())
                .body(Empty::<Bytes>::new())?;
            let exchange = async {
                let response = sender.send_request(request).await?;
                let status = response.status().as_u16();
                let body = response.into_body().collect().await?.to_bytes();
                Ok::<_, anyhow::Error>((status, String::from_utf8_lossy(&body).into_owned()))
            };
            tokio::time::timeout(RESPONSE_TIMEOUT, exchange)
                .await
                .with_context(|| {
                    format!("no complete answer from {addr} within {RESPONSE_TIMEOUT:?}")
                })?
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the HTTP client thread panicked"))?
    .with_context(|| format!("GET {path} from {addr}"))
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        path::Path,
    };

    use super::*;

    /// Serves one connection with `response` and returns the request it read.
    fn serve_once(response: &'static [u8]) -> (SocketAddr, std::thread::JoinHandle<String>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buffer = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                let n = stream.read(&mut buffer).unwrap();
                assert!(n > 0, "the client closed before sending its request");
                request.extend_from_slice(&buffer[..n]);
            }
            stream.write_all(response).unwrap();
            String::from_utf8(request).unwrap()
        });
        (addr, server)
    }

    #[test]
    fn chunked_bodies_split_inside_a_character_are_joined_before_decoding() {
        // "é" is two bytes (c3 a9), split over two chunks: decoding per chunk would break it.
        let (addr, server) = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              4\r\ncaf\xc3\r\n3\r\n\xa9 \xe2\r\n2\r\n\x82\xac\r\n0\r\n\r\n",
        );
        // This process's own namespace: the path works like a named one.
        let here = Netns::at_path(Path::new("/proc/self/ns/net"));
        let (status, body) = get_in(&here, addr, "/metrics?x=1").unwrap();
        assert_eq!((status, body.as_str()), (200, "café €"));
        let request = server.join().unwrap();
        assert!(
            request.starts_with("GET /metrics?x=1 HTTP/1.1\r\n"),
            "{request}"
        );
    }

    #[test]
    fn status_codes_and_plain_bodies_are_returned() {
        let (addr, server) =
            serve_once(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 8\r\n\r\nwaiting\n");
        let here = Netns::at_path(Path::new("/proc/self/ns/net"));
        assert_eq!(
            get_in(&here, addr, "/readyz").unwrap(),
            (503, "waiting\n".to_owned())
        );
        server.join().unwrap();
    }

    #[test]
    fn a_closed_port_is_an_error_naming_the_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let here = Netns::at_path(Path::new("/proc/self/ns/net"));
        let error = format!("{:#}", get_in(&here, addr, "/").unwrap_err());
        assert!(error.contains(&addr.to_string()), "{error}");
    }
}
