//! The agent side of the plugin protocol: [`serve`] accepts plugin connections and hands
//! each request to a [`CniHandler`].
//!
//! Every connection runs in its own task, so a slow or silent client never delays another,
//! and every request's handler runs in a task of its own, so that
//! * a handler panic is caught and answered with code 999 instead of killing the server;
//! * a plugin that gives up (its read timeout expired, or the runtime killed it) does not
//!   cancel a half-done `ADD` or `DEL`: the handler always runs to completion, and the
//!   runtime's retry finds a consistent state.
//!
//! Malformed requests are answered with a CNI decode error (6); requests of another
//! protocol version with "try again later" (11).

use std::any::Any;
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::protocol::{
    AddRequest, CheckRequest, DelRequest, GcRequest, MAX_FRAME_BYTES, Reply, Request, RequestFrame,
    ResponseFrame, StatusRequest, encode_frame,
};
use crate::spec::{CniError, CniResult};

/// How long a client may take to send its request after connecting. The plugin writes it
/// right away; this only frees the task of a client that connects and stalls.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long writing the answer may take before the connection is dropped.
const ANSWER_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after a transient `accept` failure (out of file descriptors), so the loop does
/// not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What the agent does for each CNI command. Implementations are shared between
/// concurrent requests (`&self`), so keep per-request state in the request.
///
/// The runtime never runs two operations for the same container at once, but does run
/// operations for different containers concurrently (SPEC.md §3 "Lifecycle & Ordering").
///
/// Implement the methods with `async fn`; the futures must be `Send`.
pub trait CniHandler: Send + Sync + 'static {
    /// `ADD`: set up the pod's interface and return what was configured.
    fn add(&self, request: AddRequest) -> impl Future<Output = Result<CniResult, CniError>> + Send;

    /// `DEL`: undo `ADD`. Must succeed when the container is unknown, on repeated calls,
    /// and when `request.netns` is `None` or gone.
    fn del(&self, request: DelRequest) -> impl Future<Output = Result<(), CniError>> + Send;

    /// `CHECK`: verify the attachment against `request.prev_result`.
    fn check(&self, request: CheckRequest) -> impl Future<Output = Result<(), CniError>> + Send;

    /// `STATUS`: `Ok` when `ADD` can be serviced, else code 50 (or 51).
    fn status(&self, request: StatusRequest) -> impl Future<Output = Result<(), CniError>> + Send;

    /// `GC`: release everything of attachments not in `request.valid_attachments`.
    fn gc(&self, request: GcRequest) -> impl Future<Output = Result<(), CniError>> + Send;
}

/// Why [`serve`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// `accept` failed in a way that will not clear up (the listener is unusable).
    #[error("accepting CNI plugin connections failed: {source}")]
    Accept {
        /// The accept error.
        source: io::Error,
    },
}

/// Binds the agent socket at `path`, ready for [`serve`]: creates the parent directory
/// (mode 0700) if missing, replaces a stale socket left by a previous agent, and
/// restricts the socket to its owner (mode 0600; the runtime runs the plugin as root).
///
/// Fails with `AddrInUse` if another process is still accepting on `path` (a second
/// agent), and with `AlreadyExists` if `path` is something other than a socket. Must be
/// called within a tokio runtime.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by another running agent", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves plugin connections on `listener` until the future is dropped or the listener
/// fails for good. Never returns `Ok`.
///
/// Transient `accept` failures (descriptor or memory exhaustion, aborted connections) are
/// logged and retried after a short pause. Dropping the returned future stops accepting;
/// requests already being handled run to completion.
pub async fn serve<H: CniHandler>(
    listener: UnixListener,
    handler: Arc<H>,
) -> Result<(), ServeError> {
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                tokio::spawn(handle_connection(stream, Arc::clone(&handler)));
            }
            Err(error) if is_transient_accept_error(&error) => {
                tracing::warn!(%error, "accepting a CNI plugin connection failed; retrying");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
            Err(source) => return Err(ServeError::Accept { source }),
        }
    }
}

fn is_transient_accept_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::OutOfMemory
    ) || matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EPROTO)
    )
}

/// Reads one request, answers it, closes.
async fn handle_connection<H: CniHandler>(stream: UnixStream, handler: Arc<H>) {
    let (read_half, mut write_half) = stream.into_split();
    let frame = match tokio::time::timeout(REQUEST_READ_TIMEOUT, read_frame(read_half)).await {
        Err(_elapsed) => {
            tracing::debug!("CNI plugin connection sent no request in time; closing");
            return;
        }
        Ok(Err(error)) => {
            tracing::debug!(%error, "reading a CNI plugin request failed");
            return;
        }
        Ok(Ok(frame)) => frame,
    };
    let reply = match frame {
        Frame::TooLarge => Reply::Error(CniError::decoding_failure(format!(
            "agent request exceeds {MAX_FRAME_BYTES} bytes"
        ))),
        Frame::Complete(bytes) => match RequestFrame::decode(&bytes) {
            Ok(frame) => dispatch(handler, frame.request).await,
            Err(error) => {
                tracing::warn!(%error, "rejecting a malformed CNI plugin request");
                Reply::Error(error)
            }
        },
    };
    let answer = encode_frame(&ResponseFrame::new(reply));
    let write = async {
        write_half.write_all(&answer).await?;
        write_half.shutdown().await
    };
    match tokio::time::timeout(ANSWER_WRITE_TIMEOUT, write).await {
        Ok(Ok(())) => {}
        // The plugin gave up (timeout, killed); the handler's work stands regardless.
        Ok(Err(error)) => tracing::debug!(%error, "writing a CNI answer failed"),
        Err(_elapsed) => tracing::debug!("writing a CNI answer timed out"),
    }
}

enum Frame {
    Complete(Vec<u8>),
    TooLarge,
}

/// Reads up to the first newline, or to EOF when the client half-closes without one.
async fn read_frame(read_half: tokio::net::unix::OwnedReadHalf) -> io::Result<Frame> {
    let limit = u64::try_from(MAX_FRAME_BYTES).unwrap_or(u64::MAX);
    let mut reader = BufReader::new(read_half.take(limit + 1));
    let mut bytes = Vec::new();
    reader.read_until(b'\n', &mut bytes).await?;
    if bytes.len() > MAX_FRAME_BYTES {
        return Ok(Frame::TooLarge);
    }
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
    }
    Ok(Frame::Complete(bytes))
}

/// Runs the handler for `request` in its own task and turns its outcome into a reply.
async fn dispatch<H: CniHandler>(handler: Arc<H>, request: Request) -> Reply {
    let command = request.command();
    let task = tokio::spawn(async move {
        match request {
            Request::Add(request) => handler.add(request).await.map(Some),
            Request::Del(request) => handler.del(request).await.map(|()| None),
            Request::Check(request) => handler.check(request).await.map(|()| None),
            Request::Status(request) => handler.status(request).await.map(|()| None),
            Request::Gc(request) => handler.gc(request).await.map(|()| None),
        }
    });
    match task.await {
        Ok(Ok(result)) => Reply::Success { result },
        Ok(Err(error)) => Reply::Error(error),
        Err(join_error) => {
            let details = if join_error.is_panic() {
                format!("panic: {}", panic_message(join_error.into_panic()))
            } else {
                join_error.to_string()
            };
            tracing::error!(%command, %details, "CNI handler failed");
            Reply::Error(
                CniError::internal(format!("the weir agent failed while handling {command}"))
                    .with_details(details),
            )
        }
    }
}

fn panic_message(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(message) => *message,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(message) => (*message).to_owned(),
            Err(_) => "non-string panic payload".to_owned(),
        },
    }
}
