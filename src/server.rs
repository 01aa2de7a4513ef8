//! The engine as a server: [`run`] wires the application ([`crate::app`])
//! to the HTTP surface ([`crate::http`]) on a bound listener; [`serve`] is
//! the bounded accept loop. `main`, the tests and the bench all call `run`.
//! The dependency points one way: `server` uses `app` and `http`, `http`
//! uses `app`, and `app` knows neither.

use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::AppState;

/// Serve until `state.shutdown` is cancelled: stop accepting, end SSE
/// streams (they watch the same token), let in-flight requests finish.
///
/// Bounded: at most `config.max_connections` connections are open at once
/// (one more is accepted and closed at once, so the listen backlog does not
/// hold it either), and a connection that takes longer than
/// `config.header_read_timeout` to send a request head is closed, which
/// covers half-sent headers and idle keep-alive connections alike (hyper
/// arms the timer whenever it waits for a request head). An SSE stream is a
/// response in progress, never idle.
pub async fn run(state: AppState, listener: TcpListener) -> anyhow::Result<()> {
    let shutdown = state.shutdown.clone();
    // Running turns start stopping at once, while HTTP drains.
    let chats = {
        let (chats, shutdown) = (state.chats.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            chats.shutdown().await;
        })
    };
    let app = crate::http::router(state.clone());
    let served = serve(
        listener,
        app,
        Limits {
            max_connections: state.config.max_connections,
            header_read_timeout: state.config.header_read_timeout,
        },
        shutdown.clone(),
    )
    .await;
    tracing::info!("HTTP server stopped");
    state.shutdown.cancel();
    let _ = chats.await;
    // The last events of the turns just stopped are in; make them durable.
    state.bus.sync();
    served
}

/// Connection bounds of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: std::time::Duration,
}

/// The accept loop: HTTP/1.1 through hyper with a header-read timeout, a
/// cap on open connections, graceful shutdown when `shutdown` fires (stop
/// accepting; each connection finishes its in-flight response, then closes).
pub async fn serve(
    listener: TcpListener,
    app: crate::http::App,
    limits: Limits,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt as _;

    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let connections = tokio_util::task::TaskTracker::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let builder = Arc::new(builder);
    let mut refused_logged = None::<Instant>;
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Over the cap: close at once (dropping the stream). Logged at
            // most once a second, a flood must not flood the log.
            if refused_logged.is_none_or(|t| t.elapsed().as_secs() >= 1) {
                refused_logged = Some(Instant::now());
                tracing::warn!(%peer, max_connections = limits.max_connections, "connection limit reached; closing new connections");
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    app.clone().oneshot(req.map(axum::body::Body::new))
                });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                // Header timeouts, resets, malformed requests: routine.
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}
