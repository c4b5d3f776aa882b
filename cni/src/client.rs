//! The blocking, std-only client the plugin binary uses to reach the agent.
//!
//! The plugin is exec'd for every CNI call, so it carries no async runtime: one
//! connection, one request, one answer (framing in [`crate::protocol`]).
//!
//! # Timeouts
//!
//! * connect: 2 s. A local unix socket accepts at once or not at all; a connect that
//!   hangs means the agent's accept loop is wedged (backlog full), so give up early.
//! * write: 5 s. The request is a few KiB; the agent reads it immediately.
//! * read: 60 s for `ADD`, `DEL`, `CHECK` and `GC`, which may take seconds on the agent
//!   (veth creation, netlink, eBPF attach, IPAM fsync); well under kubelet's default
//!   2-minute runtime request timeout, so the runtime sees our error rather than its own.
//!   5 s for `STATUS`, which runtimes poll and which must not stall them.
//!
//! A timed-out `ADD` is reported as "try again later" (11): the runtime then calls `DEL`
//! and retries, which is the recovery the spec intends for a transient failure.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::protocol::{
    MAX_FRAME_BYTES, PROTOCOL_VERSION, Reply, Request, RequestFrame, ResponseFrame, encode_frame,
};
use crate::spec::{CniError, CniResult, Command};

/// Timeouts of one agent call; see the module docs for the chosen defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting to the socket.
    pub connect: Duration,
    /// Writing the request.
    pub write: Duration,
    /// Waiting for the whole answer, from the end of the write.
    pub read: Duration,
}

impl Timeouts {
    /// The defaults for `command`.
    pub fn for_command(command: Command) -> Timeouts {
        let read = match command {
            Command::Status | Command::Version => Duration::from_secs(5),
            Command::Add | Command::Del | Command::Check | Command::Gc => Duration::from_secs(60),
        };
        Timeouts {
            connect: Duration::from_secs(2),
            write: Duration::from_secs(5),
            read,
        }
    }
}

/// Why an agent call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nothing accepts connections on the socket: it does not exist, nobody listens, or
    /// the connection did not complete in time.
    #[error(
        "the weir agent is not running on this node: cannot connect to {}: {source}",
        socket.display()
    )]
    AgentNotRunning {
        /// The socket path.
        socket: PathBuf,
        /// The connect error.
        source: io::Error,
    },
    /// Connecting failed for another reason (permissions, not a socket, path too long).
    #[error("cannot connect to the weir agent at {}: {source}", socket.display())]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The connect error.
        source: io::Error,
    },
    /// The request could not be written.
    #[error("sending the request to the weir agent at {} failed: {source}", socket.display())]
    Send {
        /// The socket path.
        socket: PathBuf,
        /// The write error.
        source: io::Error,
    },
    /// No complete answer arrived within the read timeout.
    #[error(
        "the weir agent at {} did not answer within {}s",
        socket.display(), timeout.as_secs_f32()
    )]
    NoAnswer {
        /// The socket path.
        socket: PathBuf,
        /// The read timeout that expired.
        timeout: Duration,
    },
    /// Reading the answer failed, or the agent closed the connection without one.
    #[error("receiving the answer of the weir agent at {} failed: {source}", socket.display())]
    Receive {
        /// The socket path.
        socket: PathBuf,
        /// The read error (`UnexpectedEof` when the agent closed without answering).
        source: io::Error,
    },
    /// The answer is not a valid response frame.
    #[error("the weir agent at {} sent a malformed answer: {reason}", socket.display())]
    MalformedAnswer {
        /// The socket path.
        socket: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The agent speaks another protocol version (a node mid-upgrade).
    #[error(
        "the weir agent at {} speaks protocol version {agent}, this plugin {PROTOCOL_VERSION}",
        socket.display()
    )]
    ProtocolMismatch {
        /// The socket path.
        socket: PathBuf,
        /// The agent's version.
        agent: u32,
    },
    /// The agent answered `ADD` with success but no result.
    #[error("the weir agent at {} answered ADD without a result", socket.display())]
    MissingResult {
        /// The socket path.
        socket: PathBuf,
    },
    /// The agent handled the request and reported this CNI error.
    #[error("{0}")]
    Agent(CniError),
}

impl CallError {
    /// The CNI error the plugin prints for this failure of `command`.
    ///
    /// Errors from the agent pass through unchanged. For `STATUS`, any failure to get an
    /// answer means the plugin cannot service `ADD`: code 50. Otherwise an unreachable or
    /// unresponsive agent is code 11 (it is restarting, or not up yet on a new node), an
    /// undecodable answer is code 6, and other connect failures are code 5.
    pub fn into_cni_error(self, command: Command) -> CniError {
        let message = self.to_string();
        match self {
            CallError::Agent(error) => error,
            _ if command == Command::Status => CniError::plugin_not_available(message),
            CallError::AgentNotRunning { .. }
            | CallError::Send { .. }
            | CallError::NoAnswer { .. }
            | CallError::Receive { .. }
            | CallError::ProtocolMismatch { .. } => CniError::try_again_later(message),
            CallError::Connect { .. } => CniError::io_failure(message),
            CallError::MalformedAnswer { .. } => CniError::decoding_failure(message),
            CallError::MissingResult { .. } => CniError::internal(message),
        }
    }
}

/// A client of the agent socket.
#[derive(Debug, Clone)]
pub struct AgentClient {
    socket: PathBuf,
    timeouts: Option<Timeouts>,
}

impl AgentClient {
    /// A client of the agent listening on `socket`, with the default timeouts per command.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        AgentClient {
            socket: socket.into(),
            timeouts: None,
        }
    }

    /// Uses `timeouts` for every command instead of the defaults.
    #[must_use]
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = Some(timeouts);
        self
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `request` and waits for the answer. `Ok(Some(_))` for `ADD`, `Ok(None)` for
    /// the other commands.
    pub fn call(&self, request: &Request) -> Result<Option<CniResult>, CallError> {
        let command = request.command();
        let timeouts = self
            .timeouts
            .unwrap_or_else(|| Timeouts::for_command(command));
        let mut stream = self.connect(timeouts.connect)?;
        let send_error = |source| CallError::Send {
            socket: self.socket.clone(),
            source,
        };
        stream
            .set_write_timeout(Some(timeouts.write))
            .map_err(send_error)?;
        stream
            .write_all(&encode_frame(&RequestFrame::new(request.clone())))
            .map_err(send_error)?;
        // Half-close: one request per connection; lets the agent see the end at once.
        stream
            .shutdown(std::net::Shutdown::Write)
            .map_err(send_error)?;

        let answer = self.read_frame(&mut stream, timeouts.read)?;
        let frame: ResponseFrame =
            serde_json::from_slice(&answer).map_err(|error| self.malformed(error.to_string()))?;
        if frame.protocol_version != PROTOCOL_VERSION {
            return Err(CallError::ProtocolMismatch {
                socket: self.socket.clone(),
                agent: frame.protocol_version,
            });
        }
        match frame.reply {
            Reply::Error(error) => Err(CallError::Agent(error)),
            Reply::Success { result: None } if command == Command::Add => {
                Err(CallError::MissingResult {
                    socket: self.socket.clone(),
                })
            }
            Reply::Success { result } if command == Command::Add => Ok(result),
            Reply::Success { .. } => Ok(None),
        }
    }

    fn connect(&self, timeout: Duration) -> Result<UnixStream, CallError> {
        let classify = |source: io::Error| {
            let not_running = matches!(
                source.kind(),
                io::ErrorKind::NotFound
                    | io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::WouldBlock
            );
            if not_running {
                CallError::AgentNotRunning {
                    socket: self.socket.clone(),
                    source,
                }
            } else {
                CallError::Connect {
                    socket: self.socket.clone(),
                    source,
                }
            }
        };
        let address = SockAddr::unix(&self.socket).map_err(classify)?;
        let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(classify)?;
        // A blocking AF_UNIX connect waits for room in the listener's backlog for at most
        // SO_SNDTIMEO and then fails with EAGAIN (unix_stream_connect in
        // net/unix/af_unix.c); a non-blocking connect plus poll does not work for unix
        // sockets, which never report EINPROGRESS.
        socket.set_write_timeout(Some(timeout)).map_err(classify)?;
        socket.connect(&address).map_err(classify)?;
        Ok(UnixStream::from(socket))
    }

    /// Reads up to the first newline (or EOF), within `timeout` in total.
    fn read_frame(&self, stream: &mut UnixStream, timeout: Duration) -> Result<Vec<u8>, CallError> {
        let deadline = Instant::now() + timeout;
        let no_answer = || CallError::NoAnswer {
            socket: self.socket.clone(),
            timeout,
        };
        let receive_error = |source| CallError::Receive {
            socket: self.socket.clone(),
            source,
        };
        let mut frame = Vec::new();
        let mut chunk = [0_u8; 8192];
        loop {
            let remaining = deadline
                .checked_duration_since(Instant::now())
                .filter(|left| !left.is_zero())
                .ok_or_else(no_answer)?;
            stream
                .set_read_timeout(Some(remaining))
                .map_err(receive_error)?;
            let read = match stream.read(&mut chunk) {
                Ok(read) => read,
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(no_answer());
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(receive_error(error)),
            };
            if read == 0 {
                if frame.is_empty() {
                    return Err(receive_error(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the agent closed the connection without answering",
                    )));
                }
                return Ok(frame);
            }
            let chunk = &chunk[..read];
            if let Some(end) = chunk.iter().position(|b| *b == b'\n') {
                frame.extend_from_slice(&chunk[..end]);
                return Ok(frame);
            }
            frame.extend_from_slice(chunk);
            if frame.len() > MAX_FRAME_BYTES {
                return Err(self.malformed(format!("answer exceeds {MAX_FRAME_BYTES} bytes")));
            }
        }
    }

    fn malformed(&self, reason: String) -> CallError {
        CallError::MalformedAnswer {
            socket: self.socket.clone(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::thread;

    use super::*;
    use crate::protocol::StatusRequest;
    use crate::spec::{CniVersion, NetworkConfig, code};

    fn status_request(socket: &Path) -> Request {
        Request::Status(StatusRequest {
            config: NetworkConfig {
                cni_version: CniVersion::V1_1_0,
                name: "weir".into(),
                plugin_type: "weir-cni".into(),
                agent_socket: socket.into(),
                log_level: None,
                runtime_config: serde_json::Map::new(),
                args: None,
                extra: serde_json::Map::new(),
            },
        })
    }

    fn short_timeouts() -> Timeouts {
        Timeouts {
            connect: Duration::from_millis(500),
            write: Duration::from_millis(500),
            read: Duration::from_millis(300),
        }
    }

    /// A one-shot agent that reads the request and answers with `answer`.
    fn one_shot_agent(socket: &Path, answer: Vec<u8>) -> thread::JoinHandle<Vec<u8>> {
        let listener = UnixListener::bind(socket).unwrap();
        thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            stream.read_to_end(&mut request).unwrap();
            stream.write_all(&answer).unwrap();
            request
        })
    }

    #[test]
    fn missing_socket_means_agent_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("absent.sock");
        let error = AgentClient::new(&socket)
            .call(&status_request(&socket))
            .unwrap_err();
        assert!(
            matches!(error, CallError::AgentNotRunning { .. }),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.contains("not running on this node"), "{message}");
        assert!(message.contains(&socket.display().to_string()), "{message}");
    }

    #[test]
    fn stale_socket_file_means_agent_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("stale.sock");
        drop(UnixListener::bind(&socket).unwrap());
        let error = AgentClient::new(&socket)
            .call(&status_request(&socket))
            .unwrap_err();
        assert!(
            matches!(error, CallError::AgentNotRunning { .. }),
            "{error:?}"
        );
        assert_eq!(
            error.into_cni_error(Command::Add).code,
            code::TRY_AGAIN_LATER
        );
    }

    #[test]
    fn request_is_one_line_and_answer_is_decoded() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let answer = encode_frame(&ResponseFrame::new(Reply::Success { result: None }));
        let agent = one_shot_agent(&socket, answer);
        let outcome = AgentClient::new(&socket).call(&status_request(&socket));
        assert!(matches!(outcome, Ok(None)), "{outcome:?}");
        let request = agent.join().unwrap();
        assert_eq!(request.last(), Some(&b'\n'));
        let frame = RequestFrame::decode(&request).unwrap();
        assert_eq!(frame.request.command(), Command::Status);
    }

    #[test]
    fn silent_agent_times_out_as_no_answer() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("silent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let holder = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            thread::sleep(Duration::from_secs(2));
            drop(stream);
        });
        let started = Instant::now();
        let error = AgentClient::new(&socket)
            .with_timeouts(short_timeouts())
            .call(&status_request(&socket))
            .unwrap_err();
        assert!(matches!(error, CallError::NoAnswer { .. }), "{error:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(
            error.into_cni_error(Command::Status).code,
            code::PLUGIN_NOT_AVAILABLE
        );
        holder.join().unwrap();
    }

    #[test]
    fn agent_closing_without_answer_is_a_receive_error() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("rude.sock");
        let agent = one_shot_agent(&socket, Vec::new());
        let error = AgentClient::new(&socket)
            .with_timeouts(short_timeouts())
            .call(&status_request(&socket))
            .unwrap_err();
        agent.join().unwrap();
        assert!(matches!(error, CallError::Receive { .. }), "{error:?}");
    }

    #[test]
    fn garbage_answer_is_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("garbage.sock");
        let agent = one_shot_agent(&socket, b"certainly not json\n".to_vec());
        let error = AgentClient::new(&socket)
            .call(&status_request(&socket))
            .unwrap_err();
        agent.join().unwrap();
        assert!(
            matches!(error, CallError::MalformedAnswer { .. }),
            "{error:?}"
        );
        assert_eq!(
            error.into_cni_error(Command::Del).code,
            code::DECODING_FAILURE
        );
    }

    #[test]
    fn answer_of_another_protocol_version_is_a_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("future.sock");
        let answer = br#"{"protocolVersion":2,"reply":{"success":{}}}"#.to_vec();
        let agent = one_shot_agent(&socket, answer);
        let error = AgentClient::new(&socket)
            .call(&status_request(&socket))
            .unwrap_err();
        agent.join().unwrap();
        assert!(
            matches!(error, CallError::ProtocolMismatch { agent: 2, .. }),
            "{error:?}"
        );
    }

    #[test]
    fn agent_errors_pass_through_unchanged() {
        let error = CallError::Agent(CniError::limited_connectivity("maps unpinned"));
        assert_eq!(
            error.into_cni_error(Command::Status),
            CniError::limited_connectivity("maps unpinned")
        );
    }
}
