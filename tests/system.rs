//! System routes, auth, error shapes and boot validation, through the real
//! binary on an ephemeral port.

mod common;

use common::{EngineSpec, TestEngine, SECRET};
use serde_json::Value;

#[tokio::test]
async fn health_is_public_and_follows_the_readiness_file() {
    let e = TestEngine::start().await;
    let plain = reqwest::Client::new();
    let res = plain.get(e.url("/health")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("x-request-id"));
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));

    std::fs::remove_file(e.home().join("ready")).unwrap();
    let res = plain.get(e.url("/health")).send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.json::<Value>().await.unwrap()["status"], "initializing");

    std::fs::write(e.home().join("ready"), "done").unwrap();
    assert_eq!(
        plain.get(e.url("/health")).send().await.unwrap().status(),
        200
    );
    e.shutdown().await;
}
