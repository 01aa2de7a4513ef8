//! Prometheus metrics (`GET /metrics`), through `prometheus-client`.
//!
//! Two kinds of series:
//! - **recorded** where things happen, through the small functions below
//!   (`HttpSeries`, `event_published`, `turn_finished`, …): counters and
//!   histograms in one process-wide registry. Each call is a label lookup
//!   and an atomic add, cheap enough for `/health`;
//! - **sampled** at scrape time from the services ([`Sample`], filled by the
//!   HTTP handler from `AppState`): gauges such as SSE subscribers, outbox
//!   size, running turns, and the `process_*` series read from `/proc`.
//!   Nothing keeps them up to date between scrapes, so they cost nothing on
//!   the paths that change them.
//!
//! Names carry the `replicas_` prefix and base units; label values are
//! bounded (a route template, a method from a fixed set, an event type, a
//! provider, a manager name — never a path or an id).
//!
//! The registry is process-wide: one engine runs per process (tests that
//! build several in one process share the counters, which they never
//! assert exact values of).

use std::borrow::Cow;
use std::sync::atomic::AtomicU64;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of the exposition (OpenMetrics text, which
/// Prometheus scrapes natively).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Request latency buckets, seconds: 0.5 ms … 10 s.
const HTTP_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Turn duration buckets, seconds: 1 s … 1 h.
const TURN_BUCKETS: [f64; 11] = [
    1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: &'static str,
    route: Cow<'static, str>,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: &'static str,
    route: Cow<'static, str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabels {
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TurnLabels {
    provider: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ManagerLabels {
    manager: Cow<'static, str>,
}

#[derive(Clone)]
struct Buckets(&'static [f64]);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

type FloatGauge = Gauge<f64, AtomicU64>;

struct Metrics {
    registry: Registry,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: Family<RouteLabels, Histogram, Buckets>,
    events_published: Family<TypeLabels, Counter>,
    webhook_delivered: Counter,
    webhook_failures: Counter,
    turns: Family<TurnLabels, Counter>,
    turn_duration: Family<ProviderLabels, Histogram, Buckets>,
    token_refresh_failures: Family<ManagerLabels, Counter>,
    /// Sampled at scrape time; the mutex keeps two scrapes from
    /// interleaving their samples.
    sampled: Mutex<Sampled>,
}

struct Sampled {
    sse_subscribers: Gauge,
    events_last_id: Gauge,
    events_journal_bytes: Gauge,
    webhook_outbox_events: Gauge,
    webhook_oldest_pending: FloatGauge,
    turns_running: Gauge,
    chat_queue_messages: Gauge,
    hooks_status: Gauge,
    resident_memory: Gauge,
    cpu_seconds: Counter<f64, AtomicU64>,
    open_fds: Gauge,
    start_time: FloatGauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Self {
        let mut r = Registry::default();
        // prometheus-client appends `_total` to counters.
        let http_requests = Family::default();
        r.register(
            "replicas_http_requests",
            "HTTP requests answered, by method, matched route template and status",
            http_requests.clone(),
        );
        let http_duration = Family::new_with_constructor(Buckets(&HTTP_BUCKETS));
        r.register(
            "replicas_http_request_duration_seconds",
            "Time to the response head, by method and matched route template",
            http_duration.clone(),
        );
        let events_published = Family::default();
        r.register(
            "replicas_events_published",
            "Events published on the bus, by type",
            events_published.clone(),
        );
        let webhook_delivered = Counter::default();
        r.register(
            "replicas_webhook_delivered",
            "Webhook POSTs the backend accepted (a coalesced run counts once)",
            webhook_delivered.clone(),
        );
        let webhook_failures = Counter::default();
        r.register(
            "replicas_webhook_failures",
            "Webhook POSTs that failed (retried or rejected)",
            webhook_failures.clone(),
        );
        let turns = Family::default();
        r.register(
            "replicas_turns",
            "Finished turns, by provider and outcome (completed, failed, interrupted)",
            turns.clone(),
        );
        let turn_duration = Family::new_with_constructor(Buckets(&TURN_BUCKETS));
        r.register(
            "replicas_turn_duration_seconds",
            "Turn duration, by provider",
            turn_duration.clone(),
        );
        let token_refresh_failures = Family::default();
        r.register(
            "replicas_token_refresh_failures",
            "Failed credential refresh attempts, by manager",
            token_refresh_failures.clone(),
        );
        let sampled = Sampled {
            sse_subscribers: Gauge::default(),
            events_last_id: Gauge::default(),
            events_journal_bytes: Gauge::default(),
            webhook_outbox_events: Gauge::default(),
            webhook_oldest_pending: FloatGauge::default(),
            turns_running: Gauge::default(),
            chat_queue_messages: Gauge::default(),
            hooks_status: Gauge::default(),
            resident_memory: Gauge::default(),
            cpu_seconds: Counter::default(),
            open_fds: Gauge::default(),
            start_time: FloatGauge::default(),
        };
        let s = &sampled;
        r.register(
            "replicas_sse_subscribers",
            "Open /events streams",
            s.sse_subscribers.clone(),
        );
        r.register(
            "replicas_events_last_id",
            "Id of the newest event",
            s.events_last_id.clone(),
        );
        r.register(
            "replicas_events_journal_bytes",
            "Bytes in events.jsonl and its rotated segment",
            s.events_journal_bytes.clone(),
        );
        r.register(
            "replicas_webhook_outbox_events",
            "Undelivered webhook events",
            s.webhook_outbox_events.clone(),
        );
        r.register(
            "replicas_webhook_oldest_pending_seconds",
            "Age of the oldest undelivered webhook event (0 when none)",
            s.webhook_oldest_pending.clone(),
        );
        r.register(
            "replicas_turns_running",
            "Turns running now",
            s.turns_running.clone(),
        );
        r.register(
            "replicas_chat_queue_messages",
            "Messages queued behind running turns, all chats",
            s.chat_queue_messages.clone(),
        );
        r.register(
            "replicas_hooks_status",
            "Start hooks: 0 pending, 1 running, 2 done (or none to run), 3 failed",
            s.hooks_status.clone(),
        );
        r.register(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            s.resident_memory.clone(),
        );
        r.register(
            "process_cpu_seconds",
            "User and system CPU time spent in seconds",
            s.cpu_seconds.clone(),
        );
        r.register(
            "process_open_fds",
            "Number of open file descriptors",
            s.open_fds.clone(),
        );
        r.register(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds",
            s.start_time.clone(),
        );
        Self {
            registry: r,
            http_requests,
            http_duration,
            events_published,
            webhook_delivered,
            webhook_failures,
            turns,
            turn_duration,
            token_refresh_failures,
            sampled: Mutex::new(sampled),
        }
    }
}

/// The method as a bounded label value.
fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

/// The `route` value of requests that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// The two `replicas_http_*` series of one method, route and status,
/// resolved once: recording through it is two atomic updates, with no
/// label hashing or copy of the route (the request layer keeps the ones
/// its route has used).
#[derive(Clone)]
pub struct HttpSeries {
    requests: Counter,
    duration: Histogram,
}

impl HttpSeries {
    pub fn new(method: &str, route: Option<&str>, status: u16) -> Self {
        let m = &*METRICS;
        let method = method_label(method);
        let route: Cow<'static, str> = match route {
            Some(r) => Cow::Owned(r.to_owned()),
            None => Cow::Borrowed(UNMATCHED_ROUTE),
        };
        let duration = m
            .http_duration
            .get_or_create(&RouteLabels {
                method,
                route: route.clone(),
            })
            .clone();
        let requests = m
            .http_requests
            .get_or_create(&HttpLabels {
                method,
                route,
                status,
            })
            .clone();
        Self { requests, duration }
    }

    pub fn record(&self, elapsed: Duration) {
        self.duration.observe(elapsed.as_secs_f64());
        self.requests.inc();
    }
}

/// An event was published.
pub fn event_published(kind: &'static str) {
    METRICS
        .events_published
        .get_or_create(&TypeLabels { r#type: kind })
        .inc();
}

/// A webhook POST was accepted.
pub fn webhook_delivered() {
    METRICS.webhook_delivered.inc();
}

/// A webhook POST failed (to be retried, or rejected for good).
pub fn webhook_failed() {
    METRICS.webhook_failures.inc();
}

/// A turn ended.
pub fn turn_finished(provider: &'static str, outcome: &'static str, duration: Duration) {
    let m = &*METRICS;
    m.turns
        .get_or_create(&TurnLabels { provider, outcome })
        .inc();
    m.turn_duration
        .get_or_create(&ProviderLabels { provider })
        .observe(duration.as_secs_f64());
}

/// A credential refresh attempt failed.
pub fn token_refresh_failed(manager: &str) {
    METRICS
        .token_refresh_failures
        .get_or_create(&ManagerLabels {
            manager: Cow::Owned(manager.to_owned()),
        })
        .inc();
}

/// The gauges read from the services at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Sample {
    pub sse_subscribers: usize,
    pub events_last_id: u64,
    pub events_journal_bytes: u64,
    pub webhook_outbox_events: usize,
    pub webhook_oldest_pending: Duration,
    pub turns_running: usize,
    pub chat_queue_messages: usize,
    /// The `/hooks/status` status string.
    pub hooks_status: String,
}

/// `replicas_hooks_status` from the hooks status string.
fn hooks_status_value(status: &str) -> i64 {
    match status {
        "running" => 1,
        // Nothing to run is as done as having run it.
        "completed" | "no_hooks" => 2,
        "failed" => 3,
        _ => 0, // pending
    }
}

/// The exposition: every series, with the sampled gauges set from `sample`
/// and the `process_*` ones from `/proc`.
pub fn render(sample: &Sample) -> String {
    let m = &*METRICS;
    let s = m.sampled.lock().unwrap_or_else(|e| e.into_inner());
    let gauge = |g: &Gauge, v: u64| g.set(i64::try_from(v).unwrap_or(i64::MAX));
    gauge(&s.sse_subscribers, sample.sse_subscribers as u64);
    gauge(&s.events_last_id, sample.events_last_id);
    gauge(&s.events_journal_bytes, sample.events_journal_bytes);
    gauge(
        &s.webhook_outbox_events,
        sample.webhook_outbox_events as u64,
    );
    s.webhook_oldest_pending
        .set(sample.webhook_oldest_pending.as_secs_f64());
    gauge(&s.turns_running, sample.turns_running as u64);
    gauge(&s.chat_queue_messages, sample.chat_queue_messages as u64);
    s.hooks_status.set(hooks_status_value(&sample.hooks_status));
    let p = proc_self::read();
    gauge(&s.resident_memory, p.resident_bytes);
    gauge(&s.open_fds, p.open_fds);
    s.start_time.set(p.start_time_seconds);
    // A counter only goes up: add what was spent since the last scrape.
    let seen = s.cpu_seconds.get();
    if p.cpu_seconds > seen {
        s.cpu_seconds.inc_by(p.cpu_seconds - seen);
    }
    let mut out = String::with_capacity(16 * 1024);
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &m.registry);
    out
}

/// The process figures, from `/proc/self` (zeros where unreadable).
mod proc_self {
    /// Linux reports `/proc` times in USER_HZ, which is 100 on every
    /// architecture the engine runs on.
    const TICKS_PER_SECOND: f64 = 100.0;

    #[derive(Debug, Default)]
    pub struct Figures {
        pub resident_bytes: u64,
        pub cpu_seconds: f64,
        pub open_fds: u64,
        pub start_time_seconds: f64,
    }

    pub fn read() -> Figures {
        let mut f = Figures::default();
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            f.resident_bytes = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |kb| kb * 1024);
        }
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name (which may contain spaces) start
            // with the state, field 3; utime is 14, stime 15, starttime 22.
            if let Some((_, rest)) = stat.rsplit_once(')') {
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let num = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok());
                f.cpu_seconds =
                    (num(14).unwrap_or(0.0) + num(15).unwrap_or(0.0)) / TICKS_PER_SECOND;
                if let (Some(start), Some(boot)) = (num(22), boot_time()) {
                    f.start_time_seconds = boot + start / TICKS_PER_SECOND;
                }
            }
        }
        f.open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
        f
    }

    /// Boot time, seconds since the epoch (`btime` in `/proc/stat`).
    fn boot_time() -> Option<f64> {
        std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_documented_series() {
        HttpSeries::new("GET", Some("/chats/{chat_id}"), 404).record(Duration::from_millis(3));
        HttpSeries::new("BREW", None, 404).record(Duration::from_millis(1));
        event_published("chat.created");
        turn_finished("codex", "completed", Duration::from_secs(4));
        token_refresh_failed("claude");
        webhook_delivered();
        webhook_failed();
        let text = render(&Sample {
            sse_subscribers: 3,
            events_last_id: 42,
            hooks_status: "failed".into(),
            webhook_oldest_pending: Duration::from_millis(1500),
            ..Sample::default()
        });
        for line in [
            r#"replicas_http_requests_total{method="GET",route="/chats/{chat_id}",status="404"} "#,
            r#"replicas_http_requests_total{method="other",route="unmatched",status="404"} "#,
            r#"replicas_http_request_duration_seconds_bucket{le="0.005",method="GET",route="/chats/{chat_id}"} "#,
            r#"replicas_events_published_total{type="chat.created"} "#,
            r#"replicas_turns_total{provider="codex",outcome="completed"} "#,
            r#"replicas_turn_duration_seconds_count{provider="codex"} "#,
            r#"replicas_token_refresh_failures_total{manager="claude"} "#,
            "replicas_webhook_delivered_total ",
            "replicas_webhook_failures_total ",
            "replicas_sse_subscribers 3\n",
            "replicas_events_last_id 42\n",
            "replicas_events_journal_bytes 0\n",
            "replicas_webhook_outbox_events 0\n",
            "replicas_webhook_oldest_pending_seconds 1.5\n",
            "replicas_turns_running 0\n",
            "replicas_chat_queue_messages 0\n",
            "replicas_hooks_status 3\n",
            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        let p = proc_self::read();
        assert!(p.resident_bytes > 0 && p.open_fds > 0, "{p:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            p.start_time_seconds > now - 86_400.0 && p.start_time_seconds <= now + 1.0,
            "{p:?}"
        );
    }
}
