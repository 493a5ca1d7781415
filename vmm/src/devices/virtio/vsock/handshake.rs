//! The hybrid-vsock handshake on the host's unix socket (as Firecracker defines it): a host client
//! connects, writes `CONNECT <port>\n`, and gets `OK <local port>\n` once the guest accepted, then
//! the socket carries the stream. The client's bytes are untrusted: the line is bounded, and
//! anything but a decimal port is refused.

/// Longest accepted handshake line, newline included.
pub const MAX_LINE: usize = 32;

/// Why a handshake is refused (the host connection is then closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("handshake line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("expected `CONNECT <port>`, got {0:?}")]
    Malformed(String),
}

/// Accumulates a new host connection's first bytes until the `CONNECT` line is complete.
#[derive(Debug, Default)]
pub struct ConnectLine {
    buf: Vec<u8>,
}

/// A complete handshake: the guest port to connect to, and bytes the client sent after the line
/// (already stream data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub port: u32,
    pub rest: Vec<u8>,
}

impl ConnectLine {
    /// Adds bytes read from the client; `Ok(None)` while the line is incomplete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Option<Connect>, HandshakeError> {
        self.buf.extend_from_slice(bytes);
        let Some(newline) = self.buf.iter().position(|b| *b == b'\n') else {
            return if self.buf.len() >= MAX_LINE { Err(HandshakeError::TooLong) } else { Ok(None) };
        };
        if newline + 1 > MAX_LINE {
            return Err(HandshakeError::TooLong);
        }
        let line = String::from_utf8_lossy(&self.buf[..newline]).into_owned();
        let port = line
            .strip_prefix("CONNECT ")
            .map(|p| p.trim_end_matches('\r'))
            .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<u32>().ok())
            .ok_or(HandshakeError::Malformed(line))?;
        Ok(Some(Connect { port, rest: self.buf[newline + 1..].to_vec() }))
    }
}

/// The reply once the guest accepted: `OK <local_port>\n`, where `local_port` is the host-side
/// port the guest sees for this connection.
pub fn ok_reply(local_port: u32) -> String {
    format!("OK {local_port}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_line_may_arrive_in_pieces_and_be_followed_by_data() {
        let mut line = ConnectLine::default();
        assert_eq!(line.push(b"CONN").unwrap(), None);
        assert_eq!(line.push(b"ECT 1024").unwrap(), None);
        assert_eq!(line.push(b"\nhello").unwrap(), Some(Connect { port: 1024, rest: b"hello".to_vec() }));
        assert_eq!(ok_reply(1_073_741_824), "OK 1073741824\n");
    }

    #[test]
    fn malformed_and_oversized_lines_are_refused() {
        for bad in
            [&b"CONNECT\n"[..], b"CONNECT -1\n", b"CONNECT 99999999999\n", b"connect 5\n", b"CONNECT 5 6\n"]
        {
            assert!(matches!(ConnectLine::default().push(bad), Err(HandshakeError::Malformed(_))), "{bad:?}");
        }
        assert_eq!(ConnectLine::default().push(&[b'9'; MAX_LINE]), Err(HandshakeError::TooLong));
        let long = format!("CONNECT {}\n", "0".repeat(MAX_LINE));
        assert_eq!(ConnectLine::default().push(long.as_bytes()), Err(HandshakeError::TooLong));
        assert_eq!(
            ConnectLine::default().push(b"CONNECT 52\r\n").unwrap(),
            Some(Connect { port: 52, rest: vec![] }),
            "a CRLF from a terminal client is tolerated"
        );
    }
}
