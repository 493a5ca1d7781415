//! Task events to containerd (TaskCreate, TaskStart, TaskExit...), through the publisher the
//! shim crate connects to containerd's ttrpc address. A lost event is logged, never fatal: the
//! task's state stays readable through State and Wait.

use containerd_shim::publisher::RemotePublisher;
use containerd_shim::Context;
use containerd_shim_protos::protobuf::MessageDyn;

/// See the module documentation.
pub struct EventSink {
    publisher: RemotePublisher,
    namespace: String,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink")
            .field("address", &self.publisher.address)
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl EventSink {
    pub fn new(publisher: RemotePublisher, namespace: &str) -> EventSink {
        EventSink { publisher, namespace: namespace.to_owned() }
    }

    pub async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(err) = self.publisher.publish(Context::default(), topic, &self.namespace, event).await {
            tracing::warn!(topic, %err, "publishing a task event to containerd");
        }
    }
}
