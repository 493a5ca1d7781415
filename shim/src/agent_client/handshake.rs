//! Opening a stream to the agent: the socket is dialled on the caller's thread (the reply thread
//! may open none), the hybrid vsock handshake (`CONNECT <port>` / `OK <n>`) is completed on the
//! reply thread, which reads the VMM's answer: what the guest makes of a connection shows in it.

use std::io::ErrorKind;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::reply_thread::ReplyThread;
use super::{AgentAddress, AgentError};

/// Longest hybrid vsock reply line accepted (`OK 4294967295\n` is 14 bytes).
pub(super) const MAX_HANDSHAKE_REPLY: usize = 32;
/// How often a hybrid vsock `CONNECT` the VMM closed unanswered is tried: a guest starved of CPU
/// (many VMs on few cores) may miss the VMM's connect deadline while its agent listens.
const HANDSHAKE_ATTEMPTS: u32 = 5;
const HANDSHAKE_RETRY_PAUSE: Duration = Duration::from_millis(100);

fn connect_error(address: &AgentAddress) -> impl Fn(std::io::Error) -> AgentError + '_ {
    move |source| AgentError::Connect { address: address.clone(), source }
}

/// Connects to the socket of `address` (the agent's own, or the VM's vsock socket), on the
/// caller's thread; returns it non-blocking and registered with no runtime, to be handed to the
/// reply thread.
pub(super) async fn dial(address: &AgentAddress) -> Result<StdUnixStream, AgentError> {
    let path = match address {
        AgentAddress::Unix(path) => path,
        AgentAddress::HybridVsock { socket, .. } => socket,
    };
    let stream = UnixStream::connect(path).await.map_err(connect_error(address))?;
    stream.into_std().map_err(connect_error(address))
}

/// On the reply thread: takes over a [`dial`]led stream and, for a VM, asks its VMM for the
/// guest port and checks the answer.
pub(super) async fn complete(
    stream: StdUnixStream,
    address: &AgentAddress,
) -> Result<UnixStream, AgentError> {
    let mut stream = UnixStream::from_std(stream).map_err(connect_error(address))?;
    if let AgentAddress::HybridVsock { port, .. } = address {
        let request = format!("CONNECT {port}\n");
        stream.write_all(request.as_bytes()).await.map_err(connect_error(address))?;
        let reply = read_reply_line(&mut stream).await.map_err(connect_error(address))?;
        if !is_ok_reply(&reply) {
            return Err(AgentError::HandshakeRefused { address: address.clone(), port: *port, reply });
        }
    }
    Ok(stream)
}

/// A stream to `address` for the caller's runtime (stdio streams: their bytes are copied, never
/// decoded), handshaken on the reply thread and tried again while the VMM closes the `CONNECT`
/// unanswered (it does when the guest reset the connection or did not answer it in time), at most
/// [`HANDSHAKE_ATTEMPTS`] times. (The agent's own connection needs no such retry: it is opened
/// by `AgentClient::connect_when_ready`, which retries any failure.)
pub(super) async fn open_patiently(
    replies: &ReplyThread,
    address: &AgentAddress,
) -> Result<UnixStream, AgentError> {
    let mut attempt = 1;
    loop {
        let stream = dial(address).await?;
        let for_thread = address.clone();
        let opened = replies
            .run(async move {
                let stream = complete(stream, &for_thread).await?;
                stream.into_std().map_err(connect_error(&for_thread))
            })
            .await
            .map_err(super::reply_thread_error(address))?;
        match opened {
            Err(AgentError::Connect { source, .. })
                if source.kind() == ErrorKind::UnexpectedEof && attempt < HANDSHAKE_ATTEMPTS =>
            {
                attempt += 1;
                tokio::time::sleep(HANDSHAKE_RETRY_PAUSE).await;
            }
            opened => return UnixStream::from_std(opened?).map_err(connect_error(address)),
        }
    }
}

/// Reads one line (without its newline), at most [`MAX_HANDSHAKE_REPLY`] bytes, not a byte more.
async fn read_reply_line(stream: &mut UnixStream) -> std::io::Result<String> {
    let mut line = Vec::with_capacity(MAX_HANDSHAKE_REPLY);
    loop {
        let byte = stream.read_u8().await?;
        if byte == b'\n' {
            break;
        }
        line.push(byte);
        if line.len() >= MAX_HANDSHAKE_REPLY {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// `OK <host port>`, as the VMM answers an accepted `CONNECT`.
fn is_ok_reply(line: &str) -> bool {
    line.strip_prefix("OK ").is_some_and(|port| port.parse::<u32>().is_ok())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn only_a_well_formed_ok_line_accepts_the_handshake() {
        assert!(is_ok_reply("OK 1073741824"));
        for bad in ["", "OK", "OK ", "OK x", "ERR 1", "ok 1", "OK 1 2"] {
            assert!(!is_ok_reply(bad), "{bad:?}");
        }
    }

    /// A fake VMM that closes the first `unanswered` connections after their `CONNECT` line (as
    /// for a guest that missed the connect deadline) and accepts the rest; returns its count of
    /// connections.
    fn vmm_closing_first(socket: &Path, unanswered: u32) -> tokio::task::JoinHandle<u32> {
        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        tokio::spawn(async move {
            let mut seen = 0;
            while let Ok(Ok((mut peer, _))) =
                tokio::time::timeout(Duration::from_secs(2), listener.accept()).await
            {
                seen += 1;
                let mut request = [0u8; 13];
                peer.read_exact(&mut request).await.unwrap();
                if seen > unanswered {
                    peer.write_all(b"OK 1073741824\n").await.unwrap();
                    return seen;
                }
            }
            seen
        })
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connect_the_vmm_closed_unanswered_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vsock.sock");
        let vmm = vmm_closing_first(&socket, 2);
        open_patiently(&ReplyThread::start().await.unwrap(), &AgentAddress::vm(&socket)).await.unwrap();
        assert_eq!(vmm.await.unwrap(), 3);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_port_that_is_always_closed_fails_after_the_attempts_naming_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vsock.sock");
        let vmm = vmm_closing_first(&socket, u32::MAX);
        let err = open_patiently(&ReplyThread::start().await.unwrap(), &AgentAddress::vm(&socket))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, AgentError::Connect { .. }) && text.contains("vsock port 1024"), "{text}");
        assert_eq!(vmm.await.unwrap(), HANDSHAKE_ATTEMPTS);
    }
}
