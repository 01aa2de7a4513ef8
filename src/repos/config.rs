//! The per-repo replicas config: the first of `replicas.json`,
//! `replicas.yaml`, `replicas.yml` at a repo's root, with `systemPrompt`,
//! `startHook` and `warmHook`. Unknown fields are ignored; a parse or type
//! error is a [`RepoConfigError`] for that repo, never a crash. Files are
//! read at call time (they are tiny), so an edit takes effect at once.
//!
//! A repo is content the engine does not control, so the file is read
//! defensively ([`read_config_file`]): only a regular file, not through a
//! symlink that leads out of the repo, at most [`MAX_CONFIG_BYTES`], opened
//! non-blocking (a FIFO cannot hang the reader); async callers read it
//! on the blocking pool (a turn with a timeout). Errors name the
//! file and the line/column, never the content (a config symlinked to a
//! credentials file must not put the token into `/hooks/status`).
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The config file names, in precedence order.
pub const CONFIG_FILES: [&str; 3] = ["replicas.json", "replicas.yaml", "replicas.yml"];

const DEFAULT_TIMEOUT_MS: u64 = 300_000;

/// The largest config file read; a larger one is an error for its repo.
pub const MAX_CONFIG_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicasConfig {
    #[serde(default)]
    pub system_prompt: Option<String>,
    #[serde(default)]
    pub start_hook: Option<Hook>,
    #[serde(default)]
    pub warm_hook: Option<Hook>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Hook {
    pub commands: Vec<String>,
    /// Milliseconds, per command (`separate`) or for the whole script.
    #[serde(default = "default_timeout")]
    pub timeout: u64,
    #[serde(default = "default_separate")]
    pub separate: bool,
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_MS
}
fn default_separate() -> bool {
    true
}

impl Hook {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout)
    }
}

/// A config file that exists but cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}: {message}")]
pub struct RepoConfigError {
    pub file: String,
    pub message: String,
}

/// A repo's config and the file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedConfig {
    pub file: &'static str,
    pub config: ReplicasConfig,
}

/// Read the repo's config: `Ok(None)` when it has no config file. Blocking
/// but bounded (see [`read_config_file`]); async code calls it on the
/// blocking pool (`app.rs` at boot, the chat runner for `systemPrompt`).
pub fn load(repo: &Path) -> Result<Option<LoadedConfig>, RepoConfigError> {
    for file in CONFIG_FILES {
        let text = match read_config_file(repo, file) {
            Ok(Some(t)) => t,
            Ok(None) => continue,
            Err(message) => {
                return Err(RepoConfigError {
                    file: file.to_owned(),
                    message,
                })
            }
        };
        return parse(file, &text).map(|config| Some(LoadedConfig { file, config }));
    }
    Ok(None)
}

/// The text of `repo/file`: `Ok(None)` when there is no such file; `Err`
/// (a message without any of the content) when it is not a regular file,
/// is a symlink leading out of the repo, is larger than
/// [`MAX_CONFIG_BYTES`] or is not UTF-8.
pub fn read_config_file(repo: &Path, file: &str) -> Result<Option<String>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;

    let path = repo.join(file);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read: {}", e.kind())),
    };
    // A symlink is followed only when its target stays inside the repo; the
    // target is then opened by its real path, with O_NOFOLLOW, so a swap
    // between the check and the open cannot lead outside either.
    let target = if meta.file_type().is_symlink() {
        let repo_real =
            std::fs::canonicalize(repo).map_err(|e| format!("cannot read: {}", e.kind()))?;
        match std::fs::canonicalize(&path) {
            Ok(real) if real.starts_with(&repo_real) => real,
            Ok(_) => return Err("is a symlink that leads outside the repository; not read".into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err("is a dangling symlink".into())
            }
            Err(e) => return Err(format!("cannot read: {}", e.kind())),
        }
    } else {
        path
    };
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
    // writer forever. The type is checked on the open descriptor.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(&target)
        .map_err(|e| format!("cannot read: {}", e.kind()))?;
    let meta = f
        .metadata()
        .map_err(|e| format!("cannot read: {}", e.kind()))?;
    if !meta.is_file() {
        return Err("is not a regular file; not read".into());
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(format!(
            "is {} bytes; the limit is {MAX_CONFIG_BYTES} bytes",
            meta.len()
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {}", e.kind()))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(format!(
            "is larger than the limit of {MAX_CONFIG_BYTES} bytes"
        ));
    }
    String::from_utf8(bytes).map(Some).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        format!("is not UTF-8 text (invalid byte at offset {at})")
    })
}

/// Parse one config file's text; the file name picks JSON or YAML. Errors
/// say where (line, column) and what kind of problem, never quote the text.
pub fn parse(file: &'static str, text: &str) -> Result<ReplicasConfig, RepoConfigError> {
    let err = |message: String| RepoConfigError {
        file: file.to_owned(),
        message,
    };
    // An empty file is an empty config, not an error.
    if text.trim().is_empty() {
        return Ok(ReplicasConfig::default());
    }
    let config: ReplicasConfig = if file.ends_with(".json") {
        serde_json::from_str(text).map_err(|e| {
            let what = match e.classify() {
                serde_json::error::Category::Syntax => "invalid JSON".to_owned(),
                serde_json::error::Category::Eof => "unexpected end of JSON".to_owned(),
                serde_json::error::Category::Data => describe_data_error(&e.to_string(), "JSON"),
                serde_json::error::Category::Io => "cannot read".to_owned(),
            };
            err(format!(
                "{what} at line {}, column {}",
                e.line(),
                e.column()
            ))
        })?
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| {
            let what = describe_data_error(&e.to_string(), "YAML");
            match e.location() {
                Some(at) => err(format!(
                    "{what} at line {}, column {}",
                    at.line(),
                    at.column()
                )),
                None => err(what),
            }
        })?
    };
    for (name, hook) in [
        ("startHook", &config.start_hook),
        ("warmHook", &config.warm_hook),
    ] {
        if let Some(h) = hook {
            if h.timeout == 0 {
                return Err(err(format!(
                    "{name}.timeout must be a positive number of milliseconds"
                )));
            }
        }
    }
    Ok(config)
}

/// A serde/YAML error message with every piece of the input left out.
/// serde's messages quote the offending value (`invalid type: string
/// "<secret>", expected a sequence`); what it expected and missing field
/// names come from our own schema and are kept.
fn describe_data_error(message: &str, lang: &str) -> String {
    let message = message.split(" at line ").next().unwrap_or(message);
    // serde_yaml_ng puts the path of the value first (`startHook.commands:
    // invalid type…`); its keys are our field names (unknown keys are
    // ignored before they can fail), so it is kept when it looks like one.
    let (path, message) = match [
        "invalid type: ",
        "invalid value: ",
        "invalid length ",
        "missing field `",
    ]
    .iter()
    .filter_map(|p| message.find(p))
    .min()
    {
        Some(i) if i > 0 => {
            let path = message[..i].trim_end_matches([':', ' ']);
            let ok = path.len() <= 80
                && path
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']'));
            (ok.then(|| format!(" at `{path}`")), &message[i..])
        }
        _ => (None, message),
    };
    let path = path.unwrap_or_default();
    let expected = message
        .split_once(", expected ")
        .map(|(_, exp)| exp.split(" at ").next().unwrap_or(exp));
    let found = |rest: &str| {
        let kind = rest.split([' ', ',']).next().unwrap_or("");
        match kind {
            "string" | "integer" | "map" | "sequence" | "boolean" | "null" | "unit" => {
                format!("a {kind}")
            }
            "floating" => "a number".to_owned(),
            _ => "a value".to_owned(),
        }
    };
    let safe = |exp: &str| !exp.contains(['"', '\'', '`']) && exp.len() <= 80;
    if let Some(rest) = message.strip_prefix("invalid type: ") {
        return match expected.filter(|e| safe(e)) {
            Some(exp) => format!("wrong type{path}: found {}, expected {exp}", found(rest)),
            None => format!("wrong type{path}: found {}", found(rest)),
        };
    }
    if let Some(rest) = message
        .strip_prefix("invalid value: ")
        .or_else(|| message.strip_prefix("invalid length "))
    {
        return match expected.filter(|e| safe(e)) {
            Some(exp) => format!("invalid value{path}: found {}, expected {exp}", found(rest)),
            None => format!("invalid value{path}"),
        };
    }
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|r| r.strip_suffix('`'))
    {
        if field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return format!("missing field `{field}`{path}");
        }
    }
    // Scanner/parser messages ("mapping values are not allowed in this
    // context") describe the syntax; anything quoting input is replaced.
    let first = message.split(": ").next().unwrap_or(message);
    if !first.is_empty()
        && first.len() <= 80
        && first
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == '-')
    {
        format!("invalid {lang}: {first}")
    } else {
        format!("invalid {lang}")
    }
}

/// Every repository directly under the workspace root, in name order.
pub fn repo_dirs(workspaces_dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(workspaces_dir) else {
        return Vec::new();
    };
    let mut repos: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| super::git::looks_like_repo(&e.path()))
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect();
    repos.sort();
    repos
}

/// The system prompt for an agent working in `cwd`: the repo's
/// `systemPrompt` when `cwd` is inside a repo; at the workspace root, the
/// prompts of all repos, each labelled with its repo name; `None` when
/// there is none. An unreadable config contributes nothing (logged).
pub fn system_prompt_for(workspaces_dir: &Path, cwd: &Path) -> Option<String> {
    let root =
        std::fs::canonicalize(workspaces_dir).unwrap_or_else(|_| workspaces_dir.to_path_buf());
    let cwd = std::fs::canonicalize(cwd).unwrap_or_else(|_| cwd.to_path_buf());
    let prompt_of = |name: &str, dir: &Path| -> Option<String> {
        match load(dir) {
            Ok(Some(c)) => c.config.system_prompt.filter(|p| !p.trim().is_empty()),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(repo = name, error = %e, "ignoring systemPrompt of an invalid replicas config");
                None
            }
        }
    };
    if cwd == root {
        let parts: Vec<String> = repo_dirs(&root)
            .into_iter()
            .filter_map(|(name, dir)| {
                prompt_of(&name, &dir).map(|p| format!("## Repository `{name}`\n\n{}", p.trim()))
            })
            .collect();
        return (!parts.is_empty()).then(|| parts.join("\n\n"));
    }
    let rel = cwd.strip_prefix(&root).ok()?;
    let name = rel.components().next()?.as_os_str().to_str()?.to_owned();
    let dir = root.join(&name);
    if !super::git::looks_like_repo(&dir) {
        return None;
    }
    prompt_of(&name, &dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_json_and_yaml_with_defaults_and_unknown_fields() {
        let c = parse(
            "replicas.json",
            r#"{"startHook":{"commands":["a"]},"extra":1}"#,
        )
        .unwrap();
        let h = c.start_hook.unwrap();
        assert_eq!((h.timeout, h.separate), (300_000, true));
        let c = parse(
            "replicas.yaml",
            "systemPrompt: hi\nwarmHook:\n  commands: [b]\n  timeout: 5\n  separate: false\n",
        )
        .unwrap();
        assert_eq!(c.system_prompt.as_deref(), Some("hi"));
        assert!(!c.warm_hook.unwrap().separate);
        assert_eq!(
            parse("replicas.yml", "  \n").unwrap(),
            ReplicasConfig::default()
        );
    }

    #[test]
    fn type_and_syntax_errors_name_the_file() {
        let e = parse("replicas.json", r#"{"startHook":{"commands":"npm ci"}}"#).unwrap_err();
        assert!(e.to_string().starts_with("replicas.json:"), "{e}");
        assert!(parse("replicas.yaml", "startHook: [unclosed").is_err());
        assert!(parse(
            "replicas.json",
            r#"{"startHook":{"commands":[],"timeout":0}}"#
        )
        .is_err());
    }

    const SECRET: &str = "ghp_SECRETTOKEN0123456789";

    /// A repo dir and, next to it, a secret outside the repo.
    fn repo_and_secret() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        let secret = dir.path().join("credentials");
        std::fs::write(&secret, format!("token: {SECRET}\n")).unwrap();
        (dir, repo, secret)
    }

    #[test]
    fn a_symlink_leading_outside_the_repo_is_not_read() {
        let (_dir, repo, secret) = repo_and_secret();
        std::os::unix::fs::symlink(&secret, repo.join("replicas.yaml")).unwrap();
        let e = load(&repo).unwrap_err();
        assert_eq!(e.file, "replicas.yaml");
        assert!(e.message.contains("outside the repository"), "{e}");
        assert!(!e.to_string().contains(SECRET));
        // Relative, through `..`, and dangling: the same.
        std::fs::remove_file(repo.join("replicas.yaml")).unwrap();
        std::os::unix::fs::symlink("../credentials", repo.join("replicas.yml")).unwrap();
        assert!(load(&repo).unwrap_err().message.contains("outside"));
        std::fs::remove_file(repo.join("replicas.yml")).unwrap();
        std::os::unix::fs::symlink("missing", repo.join("replicas.json")).unwrap();
        assert!(load(&repo).unwrap_err().message.contains("dangling"));
    }

    #[test]
    fn a_symlink_inside_the_repo_is_followed() {
        let (_dir, repo, _) = repo_and_secret();
        std::fs::create_dir_all(repo.join("conf")).unwrap();
        std::fs::write(repo.join("conf/r.yaml"), "systemPrompt: hi\n").unwrap();
        std::os::unix::fs::symlink("conf/r.yaml", repo.join("replicas.yaml")).unwrap();
        let c = load(&repo).unwrap().unwrap();
        assert_eq!(c.config.system_prompt.as_deref(), Some("hi"));
    }

    /// A FIFO would block an open for reading until a writer came; it is
    /// refused at once instead.
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let (_dir, repo, _) = repo_and_secret();
        let fifo = repo.join("replicas.json");
        let ok = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(ok.success());
        let (tx, rx) = std::sync::mpsc::channel();
        let r = repo.clone();
        std::thread::spawn(move || tx.send(load(&r)).unwrap());
        let res = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("reading a FIFO config must not block");
        let e = res.unwrap_err();
        assert_eq!(e.file, "replicas.json");
        assert!(e.message.contains("not a regular file"), "{e}");
        // A directory is no config file either.
        std::fs::remove_file(&fifo).unwrap();
        std::fs::create_dir(repo.join("replicas.json")).unwrap();
        assert!(load(&repo)
            .unwrap_err()
            .message
            .contains("not a regular file"));
    }

    #[test]
    fn files_are_read_up_to_64_kib() {
        let (_dir, repo, _) = repo_and_secret();
        let at_limit = format!(
            "systemPrompt: {}\n",
            "a".repeat(MAX_CONFIG_BYTES as usize - "systemPrompt: \n".len())
        );
        assert_eq!(at_limit.len() as u64, MAX_CONFIG_BYTES);
        std::fs::write(repo.join("replicas.yaml"), &at_limit).unwrap();
        assert!(load(&repo).unwrap().is_some());
        std::fs::write(repo.join("replicas.yaml"), format!("{at_limit} ")).unwrap();
        let e = load(&repo).unwrap_err();
        assert!(e.message.contains("65537 bytes"), "{e}");
        assert!(e.message.contains("65536"), "{e}");
        std::fs::write(repo.join("replicas.yaml"), b"systemPrompt: \xff\n").unwrap();
        assert!(load(&repo).unwrap_err().message.contains("not UTF-8"));
    }

    /// serde's own messages quote the offending value; ours say where and
    /// what kind of problem, never the text.
    #[test]
    fn parse_errors_name_the_position_never_the_content() {
        let cases = [
            (
                "replicas.json",
                format!(r#"{{"startHook":{{"commands":"{SECRET}"}}}}"#),
            ),
            ("replicas.json", format!(r#"{{"systemPrompt": {SECRET}}}"#)),
            (
                "replicas.json",
                format!(r#"{{"startHook":{{"commands":["a"],"timeout":"{SECRET}"}}}}"#),
            ),
            (
                "replicas.yaml",
                format!("startHook:\n  commands: {SECRET}\n"),
            ),
            ("replicas.yaml", format!("token: {SECRET}\n  bad: [\n")),
            ("replicas.yaml", format!("{SECRET}\n")),
            (
                "replicas.yaml",
                format!("startHook:\n  timeout: {SECRET}\n  commands: []\n"),
            ),
            ("replicas.yml", format!("systemPrompt: [{SECRET}]\n")),
            ("replicas.yml", format!("- {SECRET}\n")),
        ];
        for (file, text) in cases {
            let e = parse(file, &text).unwrap_err();
            let shown = e.to_string();
            assert!(!shown.contains("SECRET"), "{file} {text:?} leaked: {shown}");
            assert!(shown.starts_with(&format!("{file}: ")), "{shown}");
            assert!(shown.contains("line "), "{text:?}: {shown}");
        }
        let e = parse("replicas.json", r#"{"startHook":{"commands":"npm ci"}}"#).unwrap_err();
        assert_eq!(
            e.message,
            "wrong type: found a string, expected a sequence at line 1, column 33"
        );
        let e = parse("replicas.yml", "startHook:\n  commands: npm ci\n").unwrap_err();
        assert_eq!(
            e.message,
            "wrong type at `startHook.commands`: found a string, expected a sequence at line 2, column 13"
        );
        let e = parse("replicas.json", r#"{"startHook":{}}"#).unwrap_err();
        assert!(e.message.starts_with("missing field `commands`"), "{e}");
    }

    #[test]
    fn prompt_for_repo_and_root() {
        let root = tempfile::tempdir().unwrap();
        for (name, prompt) in [
            ("web", Some("Use pnpm.")),
            ("api", Some("Run cargo test.")),
            ("docs", None),
        ] {
            let d = root.path().join(name);
            std::fs::create_dir_all(d.join(".git")).unwrap();
            std::fs::create_dir_all(d.join("src")).unwrap();
            if let Some(p) = prompt {
                std::fs::write(d.join("replicas.yaml"), format!("systemPrompt: {p}\n")).unwrap();
            }
        }
        std::fs::create_dir_all(root.path().join("notes")).unwrap();
        let r = root.path();
        assert_eq!(
            system_prompt_for(r, &r.join("api/src")).as_deref(),
            Some("Run cargo test.")
        );
        assert_eq!(system_prompt_for(r, &r.join("docs")), None);
        assert_eq!(system_prompt_for(r, &r.join("notes")), None);
        assert_eq!(system_prompt_for(r, Path::new("/")), None);
        let all = system_prompt_for(r, r).unwrap();
        assert_eq!(
            all,
            "## Repository `api`\n\nRun cargo test.\n\n## Repository `web`\n\nUse pnpm."
        );
    }
}

/// Property tests: any bytes or any JSON/YAML document as a config file
/// gives a config or a [`RepoConfigError`] naming the file, never a panic,
/// and the error never quotes the document.
#[cfg(test)]
mod proptests {
    use super::*;
    use crate::testing::arb_json;
    use proptest::prelude::*;

    const MARK: &str = "Zq9SECRETq9Z";

    fn check(file: &'static str, text: &str) -> Result<(), TestCaseError> {
        if let Err(e) = parse(file, text) {
            prop_assert_eq!(e.file.as_str(), file);
            prop_assert!(!e.message.is_empty());
            prop_assert!(!e.message.contains(MARK), "{} leaked: {}", file, e.message);
        }
        Ok(())
    }

    /// JSON where every string carries the marker, so a quoted value shows.
    fn marked(v: Value) -> Value {
        match v {
            Value::String(s) => Value::String(format!("{MARK}{s}")),
            Value::Array(a) => Value::Array(a.into_iter().map(marked).collect()),
            Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, marked(v))).collect()),
            other => other,
        }
    }

    use serde_json::Value;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let text = String::from_utf8_lossy(&bytes);
            for file in CONFIG_FILES {
                check(file, &text)?;
            }
        }

        #[test]
        fn arbitrary_documents_never_panic_nor_leak(v in arb_json()) {
            let v = marked(v);
            check("replicas.json", &v.to_string())?;
            let yaml = serde_yaml_ng::to_string(&v).unwrap();
            check("replicas.yaml", &yaml)?;
        }

        /// Config-shaped documents with wrong types in the known fields.
        #[test]
        fn config_shaped_documents_never_panic_nor_leak(
            prompt in arb_json(), commands in arb_json(), timeout in arb_json(), separate in arb_json()
        ) {
            let v = marked(serde_json::json!({
                "systemPrompt": prompt,
                "startHook": {"commands": commands, "timeout": timeout, "separate": separate},
                "warmHook": {"commands": commands},
            }));
            check("replicas.json", &v.to_string())?;
            check("replicas.yml", &serde_yaml_ng::to_string(&v).unwrap())?;
        }

        /// Raw text with the marker in odd places (unclosed quotes, bad
        /// indentation): syntax errors do not quote it either.
        #[test]
        fn broken_syntax_does_not_leak(prefix in "[ -~\n]{0,40}", suffix in "[ -~\n]{0,40}") {
            let text = format!("{prefix}{MARK}{suffix}");
            for file in CONFIG_FILES {
                check(file, &text)?;
            }
        }
    }
}
