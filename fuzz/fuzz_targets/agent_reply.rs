//! Fuzz target: the shim's agent client against a hostile guest. A fake VM answers the hybrid
//! vsock handshake and the client's ttrpc request with whatever the input says: any handshake
//! line, any frames (stream id, type, flags, length field, a response with any status and
//! payload bytes), then hangs up. Every call must return (a value or an error) without a panic, within its
//! deadline; replies the shim turns into containerd messages (stats) are converted too.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use husk_protocols::agent::{Interface, Stdio};
use husk_shim::agent_client::{AgentAddress, AgentClient};
use husk_shim::containerd::metrics;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use protobuf::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// A call's deadline: long enough for the fake's replies, short enough to keep fuzzing fast
/// when an input makes the client wait for a reply that never comes.
const CALL_TIMEOUT: Duration = Duration::from_millis(200);
const MAX_FRAMES: usize = 8;
const TTRPC_HEADER: usize = 10;
/// The stream id of a ttrpc client's first request.
const FIRST_STREAM: u32 = 1;

#[derive(Debug, Arbitrary)]
enum Handshake {
    /// `OK <port>`, as the VMM's muxer answers.
    Accepted,
    Line(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
enum Body {
    /// A ttrpc `Response`: status code, message and payload (the method's reply message bytes).
    Response { code: i32, message: String, payload: Vec<u8> },
    Raw(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
struct Frame {
    /// None: the stream id of the client's (first) request.
    stream: Option<u32>,
    /// None: a response.
    kind: Option<u8>,
    flags: u8,
    /// None: the body's true length.
    length: Option<u32>,
    body: Body,
}

#[derive(Debug, Arbitrary)]
struct Input {
    call: u8,
    handshake: Handshake,
    frames: Vec<Frame>,
}

struct World {
    runtime: tokio::runtime::Runtime,
    listener: UnixListener,
    socket: PathBuf,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        // As the shim's main does: the client's reply thread runs under a seccomp filter.
        husk_vmm::seccomp::prepare_allocator();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        // An abstract socket: nothing to clean up when the fuzzer exits.
        let socket = PathBuf::from(format!("\0husk-fuzz-agent-{}", std::process::id()));
        let listener = runtime.block_on(async { UnixListener::bind(&socket) }).unwrap();
        World { runtime, listener, socket }
    })
}

fn encode(frame: &Frame, stream: u32) -> Vec<u8> {
    let body = match &frame.body {
        Body::Raw(bytes) => bytes.clone(),
        Body::Response { code, message, payload } => {
            let mut status = ttrpc::Status::new();
            status.code = protobuf::EnumOrUnknown::from_i32(*code);
            status.message = message.clone();
            let response = ttrpc::Response {
                status: Some(status).into(),
                payload: payload.clone(),
                ..Default::default()
            };
            response.write_to_bytes().unwrap_or_default()
        }
    };
    let length = frame.length.unwrap_or(u32::try_from(body.len()).unwrap_or(u32::MAX));
    let mut bytes = Vec::with_capacity(TTRPC_HEADER + body.len());
    bytes.extend_from_slice(&length.to_be_bytes());
    bytes.extend_from_slice(&frame.stream.unwrap_or(stream).to_be_bytes());
    bytes.push(frame.kind.unwrap_or(ttrpc::proto::MESSAGE_TYPE_RESPONSE));
    bytes.push(frame.flags);
    bytes.extend_from_slice(&body);
    bytes
}

/// The fake VM's side of one connection: everything the input says, at once, then it stops
/// writing and reads what the client sends until the client hangs up. Nothing it writes waits
/// for the client, so no input can stall the two against each other.
async fn fake_vm(mut conn: UnixStream, input: &Input) -> std::io::Result<()> {
    let mut reply = match &input.handshake {
        Handshake::Accepted => b"OK 1073741824\n".to_vec(),
        Handshake::Line(bytes) => bytes.clone(),
    };
    for frame in input.frames.iter().take(MAX_FRAMES) {
        reply.extend(encode(frame, FIRST_STREAM));
    }
    conn.write_all(&reply).await?;
    conn.shutdown().await?;
    let mut sink = Vec::new();
    conn.read_to_end(&mut sink).await.map(drop)
}

/// One agent call, chosen by the input, with its reply used as the shim uses it.
async fn call(client: &AgentClient, which: u8) {
    match which % 12 {
        0 => drop(client.check().await),
        1 => drop(client.guest_details().await),
        2 => {
            if let Ok(stats) = client.stats_container("c1").await {
                let _ = metrics::to_metrics(&stats);
                let _ = metrics::to_any(&stats);
            }
        }
        3 => drop(client.wait_process("c1", "").await),
        4 => drop(client.list_processes("c1").await),
        5 => drop(client.create_container("c1", b"{}".to_vec(), Stdio::new()).await),
        6 => drop(client.exec_process("c1", "e1", b"{}".to_vec(), Stdio::new()).await),
        7 => drop(client.signal_process("c1", "", 9, false).await),
        8 => drop(client.next_oom_event().await),
        9 => drop(client.update_interface(&Interface::new()).await),
        10 => drop(client.update_routes(Vec::new()).await),
        _ => drop(client.remove_container("c1", true).await),
    }
}

fuzz_target!(|input: Input| {
    let world = world();
    world.runtime.block_on(async {
        let address = AgentAddress::vm(&world.socket);
        let client = async {
            let Ok(client) = AgentClient::connect(address, CALL_TIMEOUT).await else { return };
            call(&client, input.call).await;
        };
        let server = async {
            if let Ok((conn, _)) = world.listener.accept().await {
                let _ = fake_vm(conn, &input).await;
            }
        };
        // Calls without a deadline of their own (wait, OOM events) end when the fake hangs up;
        // the outer bound turns a client that would wait on a closed connection into a crash.
        let both = async { tokio::join!(client, server) };
        if tokio::time::timeout(Duration::from_secs(5), both).await.is_err() {
            panic!("the agent client hung on a reply the fake VM sent and then hung up on");
        }
    });
});
