//! Where the shim's events go: [`EventSink`] is the boundary (tests capture events through
//! it), [`RemoteEvents`] forwards them to containerd in order.

use containerd_shim::{
    event::Event,
    protos::protobuf::{well_known_types::timestamp::Timestamp, MessageDyn},
};
use log::warn;

/// Where events go. Order of calls is the order containerd sees.
pub trait EventSink: Send + Sync {
    fn publish(&self, topic: String, event: Box<dyn MessageDyn>);
}

/// An [`EventSink`] that forwards to containerd through the shim's publisher, in order.
pub struct RemoteEvents {
    tx: tokio::sync::mpsc::UnboundedSender<(String, Box<dyn MessageDyn>)>,
}

impl RemoteEvents {
    /// Start the forwarding task.
    pub fn new(publisher: containerd_shim::publisher::RemotePublisher, namespace: String) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Box<dyn MessageDyn>)>();
        tokio::spawn(async move {
            while let Some((topic, ev)) = rx.recv().await {
                let ctx = containerd_shim::Context::default();
                if let Err(e) = publisher.publish(ctx, &topic, &namespace, ev).await {
                    warn!("publish {topic}: {e}");
                }
            }
        });
        RemoteEvents { tx }
    }
}

impl EventSink for RemoteEvents {
    fn publish(&self, topic: String, event: Box<dyn MessageDyn>) {
        let _ = self.tx.send((topic, event));
    }
}

pub(crate) fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

pub(crate) fn send<E: Event + MessageDyn>(sink: &dyn EventSink, e: E) {
    sink.publish(e.topic(), Box::new(e));
}
