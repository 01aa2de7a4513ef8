//! `GET /repos` and the repo events, through the real binary, against real
//! git repositories built in the temp home before the engine starts, and a
//! fake `gh` that records how often it is asked.

use std::path::Path;
use std::time::Duration;

use crate::common::{eventually, find, script, sh, EngineSpec, SseEvent, TestEngine};
use serde_json::Value;

const TOKEN: &str = "ghs_TOPSECRET0123456789";

/// A `gh` that answers one PR URL and appends each call to `gh-calls.log`.
fn fake_gh(home: &Path) -> String {
    script(
        &home.join("gh"),
        &format!(
            "echo \"$@\" >> {}\necho '{{\"url\":\"https://github.com/acme/api/pull/7\"}}'\n",
            home.join("gh-calls.log").display()
        ),
    )
}

fn gh_calls(home: &Path) -> usize {
    std::fs::read_to_string(home.join("gh-calls.log"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// `api`: a feature branch one commit ahead of `main`, a remote whose URL
/// carries a token, a modified tracked file and an untracked one.
fn api_repo(ws: &Path) {
    let dir = ws.join("api");
    std::fs::create_dir_all(&dir).unwrap();
    sh(
        &dir,
        &format!(
            "git init -q -b main && printf 'one\\ntwo\\nthree\\n' > a.txt && printf 'b1\\nb2\\n' > b.txt \
             && git add . && git commit -qm init \
             && git remote add origin https://x-access-token:{TOKEN}@github.com/acme/api.git \
             && git checkout -qb feat/x && echo four >> a.txt && git commit -qam feat \
             && printf 'b1\\nB2\\n' > b.txt && printf 'new line\\nsecond\\n' > new.txt"
        ),
    );
}

fn repo<'a>(body: &'a Value, name: &str) -> &'a Value {
    find(&body["repos"], "name", name)
}

fn file<'a>(repo: &'a Value, path: &str) -> &'a Value {
    find(&repo["gitDiff"]["files"], "path", path)
}

#[tokio::test]
async fn repos_report_branch_remote_diff_stats_and_pr_url() {
    let (spec, guard) = EngineSpec::new();
    let ws = spec.workspaces();
    api_repo(&ws);
    // `web`: cloned from a bare origin whose HEAD is `trunk`, one local
    // commit ahead of its upstream.
    let origin = spec.home.join("web-origin.git");
    sh(
        &spec.home,
        &format!(
            "git init -q --bare -b trunk {o} && git clone -q {o} seed 2>/dev/null && cd seed \
             && git checkout -qb trunk && echo w > w.txt && git add . && git commit -qm w && git push -q origin trunk \
             && cd .. && git clone -q {o} {ws}/web && cd {ws}/web && echo x >> w.txt && git commit -qam local",
            o = origin.display(),
            ws = ws.display()
        ),
    );
    let gh = fake_gh(&spec.home);
    let e = TestEngine::start_spec(spec.with("GH_BIN", gh), guard).await;

    let res = e.get("/repos").send().await.unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    assert!(
        !text.contains(TOKEN),
        "the token must never be returned: {text}"
    );
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["repos"].as_array().unwrap().len(), 2);

    let api = repo(&body, "api");
    let head = sh(&ws.join("api"), "git rev-parse HEAD").trim().to_owned();
    assert_eq!(api["branch"], "feat/x");
    assert_eq!(api["defaultBranch"], "main", "no remote HEAD, no env: main");
    assert_eq!(api["headSha"], head.as_str());
    assert_eq!(api["remoteUrl"], "https://github.com/acme/api.git");
    assert_eq!(api["isDirty"], true);
    assert_eq!(
        (api["ahead"].as_u64(), api["behind"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(api["prUrl"], "https://github.com/acme/api/pull/7");
    assert_eq!(
        api["startHooksCompleted"], true,
        "no start hook: nothing to wait for"
    );
    assert!(api.get("error").is_none());
    // Against the merge-base with main: the committed line, the working
    // change and the untracked file.
    let diff = &api["gitDiff"];
    assert_eq!(
        (
            diff["filesChanged"].as_u64(),
            diff["added"].as_u64(),
            diff["removed"].as_u64()
        ),
        (Some(3), Some(4), Some(1))
    );
    assert_eq!(
        (
            file(api, "a.txt")["status"].as_str(),
            file(api, "a.txt")["additions"].as_u64()
        ),
        (Some("modified"), Some(1))
    );
    assert_eq!(file(api, "b.txt")["deletions"], 1);
    assert_eq!(
        (
            file(api, "new.txt")["status"].as_str(),
            file(api, "new.txt")["additions"].as_u64()
        ),
        (Some("untracked"), Some(2))
    );
    assert!(diff.get("fullDiff").is_none() && diff.get("truncated").is_none());

    let web = repo(&body, "web");
    assert_eq!(web["branch"], "trunk");
    assert_eq!(web["defaultBranch"], "trunk", "the remote's HEAD");
    assert_eq!(web["remoteUrl"], origin.display().to_string());
    assert_eq!(web["isDirty"], false);
    assert_eq!(
        (web["ahead"].as_u64(), web["behind"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(web["gitDiff"]["filesChanged"], 1);

    // gh is asked once per (branch, HEAD): again only after a new commit.
    let calls = gh_calls(e.home());
    assert_eq!(calls, 2, "one call per repo");
    e.get_json("/repos", 200).await;
    assert_eq!(gh_calls(e.home()), calls, "cached");
    sh(&ws.join("api"), "git commit -qam more");
    let body = e.get_json("/repos", 200).await;
    assert_eq!(gh_calls(e.home()), calls + 1, "HEAD moved: asked again");
    assert_eq!(
        repo(&body, "api")["prUrl"],
        "https://github.com/acme/api/pull/7"
    );
    assert_eq!(
        repo(&body, "api")["ahead"],
        2,
        "ahead/behind follow the new HEAD"
    );

    let status = e.get_json("/status", 200).await;
    assert_eq!(status["repos"]["count"], 2);
    assert!(!e.logs().contains(TOKEN), "the token must never be logged");
    e.shutdown().await;
}

#[tokio::test]
async fn include_diffs_adds_the_full_diff_capped() {
    let (spec, guard) = EngineSpec::new();
    api_repo(&spec.workspaces());
    let keep = guard.clone();
    let e = TestEngine::start_spec(spec.with("GH_BIN", "/nonexistent/gh"), guard).await;

    let body = e.get_json("/repos?includeDiffs=true", 200).await;
    let diff = &repo(&body, "api")["gitDiff"];
    let full = diff["fullDiff"].as_str().unwrap();
    assert_eq!(diff["truncated"], false);
    assert!(
        full.contains("diff --git a/a.txt b/a.txt") && full.contains("+four\n"),
        "{full}"
    );
    assert!(full.contains("-b2\n+B2\n"), "{full}");
    assert!(
        full.contains("--- /dev/null\n+++ b/new.txt\n@@ -0,0 +1,2 @@\n+new line\n+second\n"),
        "{full}"
    );
    assert_eq!(
        repo(&body, "api")["prUrl"],
        Value::Null,
        "gh missing: null, not an error"
    );

    // Bad query values are 400 in the error shape.
    let res = e.get("/repos?includeDiffs=perhaps").send().await.unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(
        res.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_request"
    );

    // A small cap truncates, and says so.
    let spec = e.shutdown().await;
    let e = TestEngine::start_spec(spec.with("REPLICAS_MAX_DIFF_BYTES", "120"), keep).await;
    let body = e.get_json("/repos?includeDiffs=true", 200).await;
    let diff = &repo(&body, "api")["gitDiff"];
    assert_eq!(diff["truncated"], true);
    assert!(diff["fullDiff"].as_str().unwrap().len() <= 120);
    assert_eq!(diff["filesChanged"], 3, "stats stay complete");
    e.shutdown().await;
}

#[tokio::test]
async fn odd_repos_get_sensible_values_and_a_broken_one_an_error() {
    let (spec, guard) = EngineSpec::new();
    let ws = spec.workspaces();
    for d in ["empty", "detached", "notes", "broken", "local"] {
        std::fs::create_dir_all(ws.join(d)).unwrap();
    }
    sh(
        &ws.join("empty"),
        "git init -q -b main && echo hi > untracked.txt",
    );
    sh(&ws.join("detached"), "git init -q -b main && echo 1 > f && git add f && git commit -qm 1 && echo 2 > f && git commit -qam 2 && git checkout -q HEAD~1");
    std::fs::write(ws.join("notes/readme.md"), "not a repo").unwrap();
    std::fs::create_dir_all(ws.join("broken/.git")).unwrap();
    std::fs::write(ws.join("broken/.git/HEAD"), "garbage").unwrap();
    sh(
        &ws.join("local"),
        "git init -q -b main && echo 1 > f && git add f && git commit -qm 1",
    );
    let gh = fake_gh(&spec.home);
    let e = TestEngine::start_spec(spec.with("GH_BIN", gh), guard).await;

    let body = e.get_json("/repos", 200).await;
    let names: Vec<&str> = body["repos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["broken", "detached", "empty", "local"],
        "name order; the plain folder is ignored"
    );

    let empty = repo(&body, "empty");
    assert_eq!(
        (empty["branch"].as_str(), empty["headSha"].clone()),
        (Some("main"), Value::Null)
    );
    assert_eq!(
        (
            empty["isDirty"].as_bool(),
            empty["gitDiff"]["added"].as_u64()
        ),
        (Some(true), Some(1))
    );
    assert!(empty.get("error").is_none(), "{empty}");

    let detached = repo(&body, "detached");
    assert_eq!(detached["branch"], Value::Null);
    assert_eq!(
        detached["headSha"],
        sh(&ws.join("detached"), "git rev-parse HEAD").trim()
    );
    assert_eq!(detached["prUrl"], Value::Null);
    assert!(detached.get("error").is_none(), "{detached}");

    let local = repo(&body, "local");
    assert_eq!(
        (local["remoteUrl"].clone(), local["prUrl"].clone()),
        (Value::Null, Value::Null)
    );
    assert_eq!(
        (
            local["isDirty"].as_bool(),
            local["gitDiff"]["filesChanged"].as_u64()
        ),
        (Some(false), Some(0))
    );
    assert_eq!(
        gh_calls(e.home()),
        0,
        "no remote, no branch: gh is not asked"
    );

    let broken = repo(&body, "broken");
    assert!(
        broken["error"].as_str().is_some_and(|s| !s.is_empty()),
        "{broken}"
    );
    e.shutdown().await;
}

#[tokio::test]
async fn repo_events_discovered_at_start_and_changed_after_hooks() {
    let (spec, guard) = EngineSpec::new();
    let dir = spec.workspaces().join("api");
    std::fs::create_dir_all(&dir).unwrap();
    // The start hook waits for a go file so the test decides when the
    // working tree changes; it then edits a tracked file.
    let go = spec.home.join("go");
    std::fs::write(
        dir.join("replicas.json"),
        serde_json::json!({"startHook": {"commands": [
            format!("while [ ! -f {} ]; do sleep 0.05; done; echo hooked >> a.txt", go.display())
        ], "timeout": 30000}})
        .to_string(),
    )
    .unwrap();
    sh(
        &dir,
        "git init -q -b main && echo a > a.txt && git add . && git commit -qm init",
    );
    let e = TestEngine::start_spec(spec.with("GH_BIN", "/nonexistent/gh"), guard).await;
    let mut events = e
        .events("since=0&types=repo.*,hooks.completed,hooks.failed")
        .await;

    let discovered = events.wait_type("repo.discovered").await.json();
    let r = &discovered["payload"]["repo"];
    assert_eq!(
        (r["name"].as_str(), r["isDirty"].as_bool()),
        (Some("api"), Some(false))
    );
    assert_eq!(
        r["startHooksCompleted"], false,
        "its start hook is still running"
    );
    assert!(r["gitDiff"].get("fullDiff").is_none());

    std::fs::write(&go, "").unwrap();
    let (changed, before) = events
        .wait_for(Duration::from_secs(30), |e: &SseEvent| {
            e.event.as_deref() == Some("repo.status.changed")
        })
        .await;
    assert!(before
        .iter()
        .any(|e| e.event.as_deref() == Some("hooks.completed")));
    let r = &changed.json()["payload"]["repo"];
    assert_eq!(
        (r["isDirty"].as_bool(), r["gitDiff"]["added"].as_u64()),
        (Some(true), Some(1))
    );
    assert_eq!(r["startHooksCompleted"], true);
    e.shutdown().await;
}

/// A branch named like an option (`--repo=evil/x`, which git accepts through
/// `update-ref`) reaches `gh` after `--`, as a branch: `gh` is never told to
/// look at another repository. git reads the same repo without choking.
#[tokio::test]
async fn a_branch_named_like_an_option_reaches_gh_after_double_dash() {
    let (spec, guard) = EngineSpec::new();
    let dir = spec.workspaces().join("api");
    std::fs::create_dir_all(&dir).unwrap();
    sh(
        &dir,
        "git init -q -b main && echo a > a.txt && git add . && git commit -qm init \
         && git remote add origin https://github.com/acme/api.git \
         && git update-ref refs/remotes/origin/main HEAD \
         && git update-ref 'refs/heads/--repo=evil/x' HEAD \
         && git symbolic-ref HEAD 'refs/heads/--repo=evil/x' && echo b >> a.txt",
    );
    // Records its argv, one argument a line, a blank line after each call.
    let argv_log = spec.home.join("gh-argv.log");
    let gh = script(
        &spec.home.join("gh"),
        &format!(
            "for a in \"$@\"; do printf '%s\\n' \"$a\"; done >> {log}\necho >> {log}\n\
             echo '{{\"url\":\"https://github.com/acme/api/pull/7\"}}'\n",
            log = argv_log.display()
        ),
    );
    let e = TestEngine::start_spec(spec.with("GH_BIN", gh), guard).await;

    let body = e.get_json("/repos?includeDiffs=true", 200).await;
    let r = repo(&body, "api");
    assert_eq!(r["error"], Value::Null, "{r}");
    assert_eq!(r["branch"], "--repo=evil/x");
    assert_eq!(r["prUrl"], "https://github.com/acme/api/pull/7");
    assert_eq!(r["gitDiff"]["filesChanged"], 1, "{r}");
    let log = std::fs::read_to_string(&argv_log).unwrap();
    let first: Vec<&str> = log.split("\n\n").next().unwrap().lines().collect();
    assert_eq!(
        first,
        ["pr", "view", "--json", "url", "--", "--repo=evil/x"]
    );
    e.shutdown().await;
}

/// A repo cloned while the engine runs is discovered without any request
/// or turn; `/status` counts it; an in-place edit of a tracked file (which
/// moves no directory mtime) shows in the next `GET /repos` even though the
/// answer before it was reused.
#[tokio::test]
async fn a_repo_cloned_while_running_is_discovered_and_edits_show_at_once() {
    let (spec, guard) = EngineSpec::new();
    let ws = spec.workspaces();
    api_repo(&ws);
    let e = TestEngine::start_spec(spec, guard).await;
    let mut events = e.events("types=repo.discovered").await;
    let first = e.get_json("/repos", 200).await;
    assert_eq!(first["repos"].as_array().unwrap().len(), 1);
    sh(&ws, "git clone -q api web");
    // (`api`'s discovery at start may come first.)
    events
        .wait_for(Duration::from_secs(30), |ev: &SseEvent| {
            ev.event.as_deref() == Some("repo.discovered")
                && ev.json()["payload"]["repo"]["name"] == "web"
        })
        .await;
    assert_eq!(e.get_json("/status", 200).await["repos"]["count"], 2);

    // Cached twice over, then an in-place append to a tracked file.
    let clean = e.get_json("/repos", 200).await;
    assert_eq!(repo(&clean, "web")["isDirty"], false);
    assert_eq!(e.get_json("/repos", 200).await, clean);
    sh(&ws.join("web"), "echo more >> a.txt");
    eventually("the edit to show", Duration::from_secs(20), async || {
        let now = e.get_json("/repos", 200).await;
        match repo(&now, "web")["isDirty"] == true {
            true => Ok(()),
            false => Err(now.to_string()),
        }
    })
    .await;
    e.shutdown().await;
}
