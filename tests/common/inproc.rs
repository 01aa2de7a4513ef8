//! The engine in the test process: the same `AppState::build` + `server::run`
//! the binary uses, on a real listener bound to 127.0.0.1:0 before serving.
//! For tests that need to publish on the bus directly.

use std::path::Path;

use replicas_engine::app::AppState;
use replicas_engine::config::Config;
use replicas_engine::server;
use tokio_util::sync::CancellationToken;

use super::{secret_client, SseStream, SECRET};

pub struct InProc {
    pub state: AppState,
    pub base: String,
    pub client: reqwest::Client,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProc {
    pub async fn start(home: &Path, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::for_home(home, SECRET);
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = AppState::build(config, CancellationToken::new())
            .await
            .unwrap();
        let server = tokio::spawn(server::run(state.clone(), listener));
        Self {
            state,
            base,
            client: secret_client(),
            server,
        }
    }

    /// A request to `path` with the secret.
    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(format!("{}{path}", self.base))
    }

    /// The `host:port` it listens on, for raw TCP clients.
    pub fn addr(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    pub async fn events(&self, query: &str) -> SseStream {
        self.events_with(query, None).await
    }

    pub async fn events_with(&self, query: &str, last_event_id: Option<&str>) -> SseStream {
        let mut req = self.get(&format!("/events?{query}"));
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 200);
        SseStream::new(res)
    }

    /// Cancel the shutdown token and wait for the server to return.
    pub async fn stop(self) {
        self.state.shutdown.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(10), self.server)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}
