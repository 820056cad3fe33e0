//! Reading a request's events from the batching engine (shared by the engine tests through `#[path]`).

use facellm::engine::batch::{Event, Failure, Summary};
use tokio::sync::mpsc::UnboundedReceiver;

/// Every event received so far: the text, and how it ended (if it did).
pub fn drain(rx: &mut UnboundedReceiver<Event>) -> (String, Option<Result<Summary, Failure>>) {
    let mut text = String::new();
    let mut end = None;
    while let Ok(ev) = rx.try_recv() {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Done(s) => end = Some(Ok(s)),
            Event::Failed(e) => end = Some(Err(e)),
        }
    }
    (text, end)
}
