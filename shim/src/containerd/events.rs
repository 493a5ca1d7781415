//! Task events to containerd (TaskCreate, TaskStart, TaskExit...) over containerd's ttrpc
//! address. Events are queued and forwarded in order by one task, which reconnects whenever a
//! forward fails: containerd may restart under a running shim, and its new instance must still
//! hear of the pod's exits (the shim crate's publisher reconnects only on some errors). An event
//! that cannot be delivered after [`ATTEMPTS`] tries is logged and dropped, never fatal: the
//! task's state stays readable through State and Wait.

use std::time::Duration;

use containerd_shim::util::{convert_to_any, timestamp};
use containerd_shim_protos::protobuf::MessageDyn;
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::{Client, EventsClient};
use tokio::sync::mpsc;

/// Events waiting for containerd; publishing waits when the queue is full.
const QUEUE: usize = 1024;
/// Tries per event, with a pause growing from [`FIRST_PAUSE`] to [`LONGEST_PAUSE`] between them
/// (about a minute in all: long enough for containerd to restart).
const ATTEMPTS: u32 = 16;
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const LONGEST_PAUSE: Duration = Duration::from_secs(5);
/// How long one forward may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// See the module documentation.
pub struct EventSink {
    queue: mpsc::Sender<Envelope>,
    address: String,
    namespace: String,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink")
            .field("address", &self.address)
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl EventSink {
    /// Forwards to containerd's ttrpc socket at `address` (a path); must run inside a tokio
    /// runtime.
    pub fn new(address: &str, namespace: &str) -> EventSink {
        let (queue, events) = mpsc::channel(QUEUE);
        tokio::spawn(forward_all(address.to_owned(), events));
        EventSink { queue, address: address.to_owned(), namespace: namespace.to_owned() }
    }

    pub async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let mut envelope = Envelope::new();
        envelope.topic = topic.to_owned();
        envelope.namespace = self.namespace.clone();
        match (timestamp(), convert_to_any(event)) {
            (Ok(at), Ok(event)) => {
                envelope.timestamp = Some(at).into();
                envelope.event = Some(event).into();
            }
            (Err(err), _) | (_, Err(err)) => {
                tracing::warn!(topic, %err, "encoding a task event");
                return;
            }
        }
        if self.queue.send(envelope).await.is_err() {
            tracing::warn!(topic, "the event forwarder has stopped; event dropped");
        }
    }
}

/// Forwards every queued event in order, reconnecting as needed.
async fn forward_all(address: String, mut events: mpsc::Receiver<Envelope>) {
    let mut client: Option<EventsClient> = None;
    while let Some(envelope) = events.recv().await {
        let request = ForwardRequest { envelope: Some(envelope).into(), ..Default::default() };
        let mut pause = FIRST_PAUSE;
        let mut delivered = false;
        for attempt in 1..=ATTEMPTS {
            if client.is_none() {
                client = connect(&address)
                    .await
                    .map_err(|err| tracing::debug!(%err, "connecting to containerd"))
                    .ok();
            }
            if let Some(connected) = &client {
                let context = ttrpc::context::with_timeout(FORWARD_TIMEOUT.as_nanos() as i64);
                match connected.forward(context, &request).await {
                    Ok(_) => {
                        delivered = true;
                        break;
                    }
                    Err(err) => {
                        tracing::debug!(attempt, %err, "forwarding a task event; reconnecting");
                        client = None;
                    }
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(LONGEST_PAUSE);
        }
        if !delivered {
            let topic = request.envelope.as_ref().map(|e| e.topic.clone()).unwrap_or_default();
            tracing::warn!(%topic, address, "containerd did not take a task event after {ATTEMPTS} tries; dropped");
        }
    }
}

async fn connect(address: &str) -> std::io::Result<EventsClient> {
    let stream = tokio::net::UnixStream::connect(address.trim_start_matches("unix://")).await?;
    let socket = ttrpc::r#async::transport::Socket::new(stream);
    Ok(EventsClient::new(Client::new(socket)))
}
