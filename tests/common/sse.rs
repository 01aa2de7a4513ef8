//! A minimal SSE reader for tests: frames → [`SseEvent`], plus helpers that
//! wait for a predicate with a deadline.

use std::time::Duration;

use futures_util::StreamExt;

#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
    pub retry: Option<u64>,
    /// Comment lines (`: keepalive`) seen in this frame.
    pub comments: Vec<String>,
}

impl SseEvent {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap_or(serde_json::Value::Null)
    }
    pub fn id_num(&self) -> Option<u64> {
        self.id.as_ref().and_then(|i| i.parse().ok())
    }
}

pub struct SseStream {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: String,
    pub ended: bool,
}

impl SseStream {
    pub fn new(res: reqwest::Response) -> Self {
        Self {
            body: Box::pin(res.bytes_stream()),
            buf: String::new(),
            ended: false,
        }
    }

    /// The next frame (including comment-only and retry-only frames), or
    /// `None` when the stream ended or `timeout` passed.
    pub async fn next_frame(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..i + 2).collect();
                return Some(parse_frame(&frame));
            }
            if self.ended {
                return None;
            }
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(Some(Err(_))) | Ok(None) => self.ended = true,
                Err(_) => return None,
            }
        }
    }

    /// The next frame that carries an event (skips comments and `retry`).
    pub async fn next_event(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let f = self.next_frame(left).await?;
            if f.event.is_some() || !f.data.is_empty() {
                return Some(f);
            }
        }
    }

    /// Read events until one satisfies `pred`; returns it and everything
    /// read before it. Panics after `timeout` with what was seen.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&SseEvent) -> bool,
    ) -> (SseEvent, Vec<SseEvent>) {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Some(ev) if pred(&ev) => return (ev, seen),
                Some(ev) => seen.push(ev),
                None => panic!(
                    "no matching event within {timeout:?}; saw: {:#?}",
                    seen.iter().map(|e| (&e.id, &e.event)).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Wait for the next event of type `kind`.
    pub async fn wait_type(&mut self, kind: &str) -> SseEvent {
        self.wait_for(Duration::from_secs(30), |e| {
            e.event.as_deref() == Some(kind)
        })
        .await
        .0
    }
}

fn parse_frame(frame: &str) -> SseEvent {
    let mut ev = SseEvent::default();
    let mut data: Vec<&str> = Vec::new();
    for line in frame.lines() {
        if let Some(c) = line.strip_prefix(':') {
            ev.comments.push(c.trim().to_owned());
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => ev.id = Some(value.to_owned()),
            "event" => ev.event = Some(value.to_owned()),
            "data" => data.push(value),
            "retry" => ev.retry = value.parse().ok(),
            _ => {}
        }
    }
    ev.data = data.join("\n");
    ev
}
