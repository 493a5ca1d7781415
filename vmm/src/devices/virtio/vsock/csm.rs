//! The connection state machine of one vsock stream between a guest port and a host unix stream,
//! with virtio-vsock credit-based flow control (virtio 1.2, 5.10.6.3).
//!
//! Memory stays bounded whatever the guest does: the guest may have at most [`TX_BUF_SIZE`] bytes
//! in flight towards the host (our `buf_alloc`); bytes the host stream does not take at once wait
//! in a buffer of that size, and a guest that sends beyond its credit is reset. Towards the guest we
//! send only as much as its own advertised credit allows, so a slow reader applies back-pressure.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::time::{Duration, Instant};

use super::packet::{Op, PacketHeader, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// Bytes the guest may have in flight towards the host on one connection.
pub const TX_BUF_SIZE: u32 = 256 * 1024;
/// Send a credit update once this much was forwarded since the last one the guest saw.
const CREDIT_UPDATE_THRESHOLD: u32 = TX_BUF_SIZE / 4;
/// How long a host-initiated connection waits for the guest's RESPONSE before it is reset (the
/// guest has no listener there, or is too busy to answer; the host client sees the socket close).
/// Generous: a guest with a listener that is starved of CPU (many VMs on few cores: 20 pods
/// starting at once in the test host missed 2 s) must not look like one without.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection whose host stream hung up waits for the guest to finish with it (take
/// the last bytes, close its end), counted from the guest's last packet on it, before it is reset:
/// a guest that never answers a close must not hold a host fd and a connection slot for good.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The host connected; our REQUEST is queued or sent, waiting for the guest's RESPONSE.
    LocalInit,
    /// The guest connected; our RESPONSE is queued.
    PeerInit,
    /// Connected; data flows in the directions neither side has shut down (see [`Shutdowns`]).
    Established,
    /// Done: RST queued or received. The muxer drops the connection once nothing is pending.
    Killed,
}

/// Which directions of an established connection are finished (half-close, virtio 5.10.6.5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shutdowns {
    /// The host stream reached EOF; the guest was sent SHUTDOWN(SEND).
    pub host_eof: bool,
    /// The guest will send no more (SHUTDOWN with SEND).
    pub guest_no_more_tx: bool,
    /// The guest will receive no more (SHUTDOWN with RCV).
    pub guest_no_more_rx: bool,
    /// The host stream's write side was shut down after the guest's last byte reached it.
    pub host_write_shut: bool,
}

/// A host stream that can be half-closed (unix streams; test doubles).
pub trait HalfClose {
    /// Shuts down the writing side: the host reader sees EOF.
    fn shutdown_write(&self) -> std::io::Result<()>;
}

impl HalfClose for std::os::unix::net::UnixStream {
    fn shutdown_write(&self) -> std::io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

/// A control packet waiting to go to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Request,
    Response,
    CreditUpdate,
    /// SHUTDOWN with both flags: the host stream is gone for good.
    ShutdownBoth,
    Rst,
}

/// One connection: guest `peer_port` <-> host stream `S` (seen by the guest as host port
/// `local_port`).
#[derive(Debug)]
pub struct Connection<S> {
    stream: S,
    state: State,
    shutdowns: Shutdowns,
    guest_cid: u64,
    local_port: u32,
    peer_port: u32,
    /// Guest bytes accepted but not yet taken by the stream.
    tx_buf: VecDeque<u8>,
    /// Guest bytes handed to the stream (the `fwd_cnt` we advertise).
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// The guest's receive buffer and how much of what we sent it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes we sent to the guest.
    rx_cnt: Wrapping<u32>,
    pending: VecDeque<Control>,
    /// While in `LocalInit`: when the guest's RESPONSE is due.
    connect_deadline: Option<Instant>,
    /// The host stream hung up (closed both ways): what it sent before is still delivered, but
    /// it takes nothing more and is no longer polled.
    host_gone: bool,
    /// Once the host hung up: when the connection is reset unless the guest has finished.
    close_deadline: Option<Instant>,
}

/// The guest broke the protocol on this connection; it is reset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnError {
    #[error("the guest sent {len} bytes beyond its credit")]
    CreditExceeded { len: usize },
    #[error("{op:?} is not valid in state {state:?}")]
    Unexpected { op: Op, state: State },
}

impl<S: Read + Write + HalfClose> Connection<S> {
    /// A connection the guest asked for (its REQUEST arrived): a RESPONSE is queued.
    pub fn peer_init(
        stream: S,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        request: &PacketHeader,
    ) -> Self {
        let mut conn = Self::new(stream, guest_cid, local_port, peer_port, State::PeerInit);
        conn.update_peer_credit(request);
        conn.pending.push_back(Control::Response);
        conn
    }

    /// A connection the host asked for: a REQUEST to the guest's `peer_port` is queued.
    pub fn local_init(stream: S, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        let mut conn = Self::new(stream, guest_cid, local_port, peer_port, State::LocalInit);
        conn.pending.push_back(Control::Request);
        conn.connect_deadline = Some(Instant::now() + CONNECT_TIMEOUT);
        conn
    }

    fn new(stream: S, guest_cid: u64, local_port: u32, peer_port: u32, state: State) -> Self {
        Connection {
            stream,
            state,
            shutdowns: Shutdowns::default(),
            guest_cid,
            local_port,
            peer_port,
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            pending: VecDeque::new(),
            connect_deadline: None,
            host_gone: false,
            close_deadline: None,
        }
    }

    /// When the guest's answer to our REQUEST is due (`None` unless in `LocalInit`).
    pub fn connect_deadline(&self) -> Option<Instant> {
        self.connect_deadline.filter(|_| self.state == State::LocalInit)
    }

    /// Resets the connection if the guest did not answer our REQUEST by `now`; true if it did so.
    pub fn expire_connect(&mut self, now: Instant) -> bool {
        if self.connect_deadline().is_some_and(|deadline| now >= deadline) {
            crate::guest_log!(
                warn,
                peer_port = self.peer_port,
                timeout = ?CONNECT_TIMEOUT,
                "vsock: the guest did not answer the connection request; reset"
            );
            self.kill();
            return true;
        }
        false
    }

    /// The host stream hung up at `now` (epoll reported HUP or an error on it): a connection not
    /// yet established is reset; an established one delivers what the host sent before, then
    /// tells the guest both directions are shut, and is reset if the guest has not finished
    /// [`CLOSE_TIMEOUT`] after its last packet.
    pub fn host_hung_up(&mut self, now: Instant) {
        match self.state {
            State::LocalInit | State::PeerInit => self.kill(),
            State::Established if !self.host_gone => {
                self.host_gone = true;
                self.tx_buf.clear();
                self.close_deadline = Some(now + CLOSE_TIMEOUT);
                if !self.can_read_stream() {
                    // Nothing more will be read from it (EOF seen, or the guest takes no more).
                    self.shutdowns.host_eof = true;
                    self.queue_control(Control::ShutdownBoth);
                    self.finish_if_done();
                }
            }
            State::Established | State::Killed => {}
        }
    }

    /// True once the host stream hung up (it is no longer polled).
    pub fn is_host_gone(&self) -> bool {
        self.host_gone
    }

    /// When the connection is reset unless the guest finishes with it first.
    pub fn close_deadline(&self) -> Option<Instant> {
        self.close_deadline.filter(|_| self.state != State::Killed)
    }

    /// Resets the connection if the guest has not finished with its hung-up host stream by
    /// `now`; true if it did so.
    pub fn expire_close(&mut self, now: Instant) -> bool {
        if self.close_deadline().is_some_and(|deadline| now >= deadline) {
            crate::guest_log!(
                debug,
                peer_port = self.peer_port,
                timeout = ?CLOSE_TIMEOUT,
                "vsock: the guest did not finish a connection the host closed; reset"
            );
            self.kill();
            return true;
        }
        false
    }

    /// The connection's state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Which directions are finished.
    pub fn shutdowns(&self) -> Shutdowns {
        self.shutdowns
    }

    /// True while bytes from the host stream may go to the guest.
    pub fn can_read_stream(&self) -> bool {
        self.state == State::Established && !self.shutdowns.host_eof && !self.shutdowns.guest_no_more_rx
    }

    /// The host stream (for polling).
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// True once the connection is over and has nothing left to tell the guest.
    pub fn is_finished(&self) -> bool {
        self.state == State::Killed && self.pending.is_empty()
    }

    /// True when a packet for the guest is ready without reading the stream.
    pub fn has_pending_control(&self) -> bool {
        !self.pending.is_empty()
    }

    /// How many more bytes the guest can receive now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Bytes waiting for the host stream.
    pub fn tx_buffered(&self) -> usize {
        self.tx_buf.len()
    }

    fn update_peer_credit(&mut self, header: &PacketHeader) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = Wrapping(header.fwd_cnt);
    }

    fn kill(&mut self) {
        crate::guest_log!(
            debug,
            local_port = self.local_port,
            peer_port = self.peer_port,
            state = ?self.state,
            shutdowns = ?self.shutdowns,
            tx_buffered = self.tx_buf.len(),
            "vsock: connection reset"
        );
        self.state = State::Killed;
        self.pending.clear();
        self.pending.push_back(Control::Rst);
        self.tx_buf.clear();
    }

    /// Handles a packet from the guest (already validated by `PacketHeader::parse_tx`).
    pub fn send_pkt(&mut self, header: &PacketHeader, op: Op, payload: &[u8]) -> Result<(), ConnError> {
        self.update_peer_credit(header);
        if let Some(deadline) = self.close_deadline.as_mut() {
            // The guest is still working through the close.
            *deadline = Instant::now() + CLOSE_TIMEOUT;
        }
        let result = match (op, self.state) {
            (Op::Rst, _) => {
                self.state = State::Killed;
                self.pending.clear();
                Ok(())
            }
            (_, State::Killed) => Ok(()), // late packets after a reset are dropped
            (Op::Response, State::LocalInit) => {
                self.state = State::Established;
                Ok(())
            }
            (Op::Rw, State::Established) if !self.shutdowns.guest_no_more_tx => self.accept_data(payload),
            (Op::CreditUpdate, _) => Ok(()),
            (Op::CreditRequest, _) => {
                self.queue_control(Control::CreditUpdate);
                Ok(())
            }
            (Op::Shutdown, State::Established) => {
                self.shutdowns.guest_no_more_rx |= header.flags & SHUTDOWN_RCV != 0;
                self.shutdowns.guest_no_more_tx |= header.flags & SHUTDOWN_SEND != 0;
                self.flush_tx();
                Ok(())
            }
            (op, state) => Err(ConnError::Unexpected { op, state }),
        };
        if let Err(err) = &result {
            crate::guest_log!(debug, %err, local_port = self.local_port, peer_port = self.peer_port, "vsock: guest protocol error");
            self.kill();
        }
        self.finish_if_done();
        result
    }

    fn accept_data(&mut self, payload: &[u8]) -> Result<(), ConnError> {
        let in_flight = self.tx_buf.len() + payload.len();
        if in_flight > TX_BUF_SIZE as usize {
            return Err(ConnError::CreditExceeded { len: in_flight - TX_BUF_SIZE as usize });
        }
        self.tx_buf.extend(payload);
        self.flush_tx();
        Ok(())
    }

    /// Once neither direction can carry more data (and the guest's last bytes reached the host),
    /// the connection ends with an RST, as the spec asks of the side that sees both shut down.
    fn finish_if_done(&mut self) {
        let sh = self.shutdowns;
        let guest_done = sh.guest_no_more_tx && self.tx_buf.is_empty();
        let host_done = sh.host_eof || sh.guest_no_more_rx;
        if self.state == State::Established && guest_done && host_done {
            self.kill();
        }
    }

    fn queue_control(&mut self, control: Control) {
        if !self.pending.contains(&control) {
            self.pending.push_back(control);
        }
    }

    /// Moves buffered guest bytes into the host stream as far as it accepts them without blocking.
    /// A stream error resets the connection.
    pub fn flush_tx(&mut self) {
        if self.host_gone {
            // Nobody reads them: the guest's bytes are dropped (within its credit, as before).
            self.fwd_cnt += Wrapping(self.tx_buf.len() as u32);
            self.tx_buf.clear();
        }
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => break,
                Ok(written) => {
                    self.tx_buf.drain(..written);
                    self.fwd_cnt += Wrapping(written as u32);
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => {
                    tracing::debug!(%err, local_port = self.local_port, "vsock: host stream write failed");
                    self.kill();
                    return;
                }
            }
        }
        if self.tx_buf.is_empty()
            && self.shutdowns.guest_no_more_tx
            && !self.shutdowns.host_write_shut
            && !self.host_gone
        {
            // The guest's last byte is through: the host reader sees EOF.
            let _ = self.stream.shutdown_write();
            self.shutdowns.host_write_shut = true;
        }
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.queue_control(Control::CreditUpdate);
        }
    }

    /// Produces the next packet for the guest into `payload` (header returned, payload length in
    /// `header.len`): control packets first, then stream data within the guest's credit. `None`
    /// when there is nothing to send now.
    pub fn recv_pkt(&mut self, payload: &mut [u8]) -> Option<PacketHeader> {
        if let Some(control) = self.pending.pop_front() {
            let (op, flags) = match control {
                Control::Request => (Op::Request, 0),
                Control::Response => {
                    self.state = State::Established;
                    (Op::Response, 0)
                }
                Control::CreditUpdate => (Op::CreditUpdate, 0),
                Control::ShutdownBoth => (Op::Shutdown, SHUTDOWN_RCV | SHUTDOWN_SEND),
                Control::Rst => (Op::Rst, 0),
            };
            return Some(self.header(op, flags, 0));
        }
        let room = payload.len().min(self.peer_credit() as usize);
        if !self.can_read_stream() || room == 0 {
            return None;
        }
        match self.stream.read(&mut payload[..room]) {
            Ok(0) => {
                // The host will send no more (it may still read, unless it hung up): tell the
                // guest.
                self.shutdowns.host_eof = true;
                let flags = if self.host_gone { SHUTDOWN_SEND | SHUTDOWN_RCV } else { SHUTDOWN_SEND };
                let shutdown = self.header(Op::Shutdown, flags, 0);
                self.finish_if_done();
                Some(shutdown)
            }
            Ok(len) => {
                self.rx_cnt += Wrapping(len as u32);
                Some(self.header(Op::Rw, 0, len as u32))
            }
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => None,
            Err(err) => {
                tracing::debug!(%err, local_port = self.local_port, "vsock: host stream read failed");
                self.kill();
                self.pending.clear(); // the RST goes out right here
                Some(self.header(Op::Rst, 0, 0))
            }
        }
    }

    fn header(&mut self, op: Op, flags: u32, len: u32) -> PacketHeader {
        // Every packet carries our credit, so it also counts as a credit update.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        PacketHeader {
            src_cid: super::packet::HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: super::packet::TYPE_STREAM,
            op: op as u16,
            flags,
            // The guest keeps (its sent bytes - fwd_cnt) <= buf_alloc: exactly what tx_buf can hold.
            buf_alloc: TX_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::packet::{HOST_CID, TYPE_STREAM};
    use super::*;
    use std::io;

    const GUEST: u64 = 3;

    /// A host stream: `input` is what the host sends, `output` what it received; `accept` bounds
    /// how many bytes it takes before blocking.
    #[derive(Debug, Default)]
    struct MockStream {
        input: VecDeque<u8>,
        eof: bool,
        output: Vec<u8>,
        accept: Option<usize>,
    }

    impl Read for MockStream {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.input.is_empty() {
                return if self.eof { Ok(0) } else { Err(ErrorKind::WouldBlock.into()) };
            }
            let n = buf.len().min(self.input.len());
            for (b, v) in buf.iter_mut().zip(self.input.drain(..n)) {
                *b = v;
            }
            Ok(n)
        }
    }

    impl HalfClose for MockStream {
        fn shutdown_write(&self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Write for MockStream {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = self.accept.map_or(buf.len(), |room| room.min(buf.len()));
            if n == 0 {
                return Err(ErrorKind::WouldBlock.into());
            }
            if let Some(room) = self.accept.as_mut() {
                *room -= n;
            }
            self.output.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn from_guest(op: Op, len: usize, buf_alloc: u32, fwd_cnt: u32, flags: u32) -> PacketHeader {
        PacketHeader {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: 5000,
            dst_port: 1024,
            len: len as u32,
            type_: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn established(stream: MockStream) -> Connection<MockStream> {
        let request = from_guest(Op::Request, 0, 64 * 1024, 0, 0);
        let mut conn = Connection::peer_init(stream, GUEST, 1024, 5000, &request);
        let response = conn.recv_pkt(&mut [0; 16]).unwrap();
        assert_eq!(response.op, Op::Response as u16);
        assert_eq!((response.src_port, response.dst_port, response.dst_cid), (1024, 5000, GUEST));
        assert_eq!(conn.state(), State::Established);
        conn
    }

    fn rw(conn: &mut Connection<MockStream>, data: &[u8]) -> Result<(), ConnError> {
        conn.send_pkt(&from_guest(Op::Rw, data.len(), 64 * 1024, 0, 0), Op::Rw, data)
    }

    #[test]
    fn a_guest_connection_is_answered_and_its_data_reaches_the_host() {
        let mut conn = established(MockStream::default());
        rw(&mut conn, b"hello").unwrap();
        assert_eq!(conn.stream().output, b"hello");
        assert_eq!(conn.recv_pkt(&mut [0; 16]), None, "nothing to say yet");
    }

    #[test]
    fn a_host_connection_waits_for_the_guests_response() {
        let mut conn = Connection::local_init(MockStream::default(), GUEST, 1024, 80);
        assert_eq!(conn.recv_pkt(&mut [0; 16]).unwrap().op, Op::Request as u16);
        assert_eq!(conn.state(), State::LocalInit);
        let err = rw(&mut conn, b"too early").unwrap_err();
        assert!(matches!(err, ConnError::Unexpected { op: Op::Rw, .. }));
        assert_eq!(conn.recv_pkt(&mut [0; 16]).unwrap().op, Op::Rst as u16);
        assert!(conn.is_finished());

        let mut conn = Connection::local_init(MockStream::default(), GUEST, 1024, 80);
        conn.recv_pkt(&mut [0; 16]);
        conn.send_pkt(&from_guest(Op::Response, 0, 4096, 0, 0), Op::Response, &[]).unwrap();
        assert_eq!(conn.state(), State::Established);
        assert_eq!(conn.connect_deadline(), None, "an answered request has no deadline");
    }

    #[test]
    fn an_unanswered_host_connection_is_reset_after_the_connect_timeout() {
        let mut conn = Connection::local_init(MockStream::default(), GUEST, 1024, 80);
        conn.recv_pkt(&mut [0; 16]);
        let deadline = conn.connect_deadline().unwrap();
        assert!(!conn.expire_connect(deadline - CONNECT_TIMEOUT / 2));
        assert_eq!(conn.state(), State::LocalInit);
        assert!(conn.expire_connect(deadline));
        assert_eq!(conn.recv_pkt(&mut [0; 16]).unwrap().op, Op::Rst as u16, "the guest is told");
        assert!(conn.is_finished());
    }

    #[test]
    fn host_data_never_exceeds_the_guests_credit() {
        let stream = MockStream { input: (0..100u8).collect(), ..Default::default() };
        let request = from_guest(Op::Request, 0, 10, 0, 0); // the guest can hold 10 bytes
        let mut conn = Connection::peer_init(stream, GUEST, 1024, 5000, &request);
        conn.recv_pkt(&mut [0; 64]);
        let mut buf = [0u8; 64];
        let first = conn.recv_pkt(&mut buf).unwrap();
        assert_eq!((first.op, first.len), (Op::Rw as u16, 10));
        assert_eq!(conn.recv_pkt(&mut buf), None, "no credit left");
        // The guest consumed 10 bytes: 10 more may go.
        conn.send_pkt(&from_guest(Op::CreditUpdate, 0, 10, 10, 0), Op::CreditUpdate, &[]).unwrap();
        assert_eq!(conn.recv_pkt(&mut buf).unwrap().len, 10);
        assert_eq!(&buf[..10], &(10..20u8).collect::<Vec<_>>()[..]);
    }

    #[test]
    fn a_slow_host_buffers_up_to_the_credit_and_a_guest_beyond_it_is_reset() {
        let mut conn = established(MockStream { accept: Some(0), ..Default::default() });
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..4 {
            rw(&mut conn, &chunk).unwrap();
        }
        assert_eq!(conn.tx_buffered(), TX_BUF_SIZE as usize, "bounded by what we advertised");
        assert!(matches!(rw(&mut conn, b"x"), Err(ConnError::CreditExceeded { len: 1 })));
        assert_eq!(conn.recv_pkt(&mut [0; 16]).unwrap().op, Op::Rst as u16);
        assert_eq!(conn.tx_buffered(), 0, "a reset frees the buffer");
    }

    #[test]
    fn forwarded_bytes_are_credited_back_to_the_guest() {
        let mut conn = established(MockStream { accept: Some(0), ..Default::default() });
        rw(&mut conn, &vec![1u8; CREDIT_UPDATE_THRESHOLD as usize]).unwrap();
        assert!(!conn.has_pending_control(), "nothing forwarded yet");
        conn.stream.accept = None; // the host reads again
        conn.flush_tx();
        let update = conn.recv_pkt(&mut [0; 16]).unwrap();
        assert_eq!((update.op, update.fwd_cnt), (Op::CreditUpdate as u16, CREDIT_UPDATE_THRESHOLD));
        assert_eq!(update.buf_alloc, TX_BUF_SIZE);
        // A credit request is answered even below the threshold.
        conn.send_pkt(&from_guest(Op::CreditRequest, 0, 4096, 0, 0), Op::CreditRequest, &[]).unwrap();
        assert_eq!(conn.recv_pkt(&mut [0; 16]).unwrap().op, Op::CreditUpdate as u16);
    }

    #[test]
    fn host_eof_is_a_send_shutdown_and_the_guest_may_still_send() {
        let mut conn = established(MockStream { eof: true, ..Default::default() });
        let shutdown = conn.recv_pkt(&mut [0; 16]).unwrap();
        assert_eq!((shutdown.op, shutdown.flags), (Op::Shutdown as u16, SHUTDOWN_SEND));
        assert!(conn.shutdowns().host_eof && !conn.can_read_stream());
        rw(&mut conn, b"the echo").unwrap();
        assert_eq!(conn.stream().output, b"the echo", "the host can still read");
        // The guest finishes too: both directions are done, the connection ends with an RST.
        conn.send_pkt(&from_guest(Op::Shutdown, 0, 4096, 0, SHUTDOWN_SEND), Op::Shutdown, &[]).unwrap();
        assert!(conn.shutdowns().host_write_shut, "the host reader sees EOF");
        assert_eq!(conn.recv_pkt(&mut [0; 16]).unwrap().op, Op::Rst as u16);
        assert!(conn.is_finished());
    }

    #[test]
    fn guest_shutdown_of_one_direction_then_both() {
        let mut conn =
            established(MockStream { input: b"data".iter().copied().collect(), ..Default::default() });
        conn.send_pkt(&from_guest(Op::Shutdown, 0, 4096, 0, SHUTDOWN_RCV), Op::Shutdown, &[]).unwrap();
        assert!(conn.shutdowns().guest_no_more_rx);
        assert_eq!(conn.recv_pkt(&mut [0; 16]), None, "the guest receives no more");
        rw(&mut conn, b"still sending").unwrap();
        conn.send_pkt(&from_guest(Op::Shutdown, 0, 4096, 0, SHUTDOWN_SEND), Op::Shutdown, &[]).unwrap();
        assert_eq!(conn.recv_pkt(&mut [0; 16]).unwrap().op, Op::Rst as u16);
        assert!(conn.is_finished());
    }

    #[test]
    fn a_guest_rst_ends_the_connection_at_once() {
        let mut conn = established(MockStream::default());
        conn.send_pkt(&from_guest(Op::Rst, 0, 0, 0, 0), Op::Rst, &[]).unwrap();
        assert!(conn.is_finished());
    }
}
