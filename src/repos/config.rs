//! The per-repo replicas config: the first of `replicas.json`,
//! `replicas.yaml`, `replicas.yml` at a repo's root, with `systemPrompt`,
//! `startHook` and `warmHook`. Unknown fields are ignored; a parse or type
//! error is a [`RepoConfigError`] for that repo, never a crash. Files are
//! read at call time (they are tiny), so an edit takes effect at once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The config file names, in precedence order.
pub const CONFIG_FILES: [&str; 3] = ["replicas.json", "replicas.yaml", "replicas.yml"];

const DEFAULT_TIMEOUT_MS: u64 = 300_000;

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

/// Read the repo's config: `Ok(None)` when it has no config file.
pub fn load(repo: &Path) -> Result<Option<LoadedConfig>, RepoConfigError> {
    for file in CONFIG_FILES {
        let path = repo.join(file);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(RepoConfigError {
                    file: file.to_owned(),
                    message: format!("cannot read: {e}"),
                })
            }
        };
        return parse(file, &text).map(|config| Some(LoadedConfig { file, config }));
    }
    Ok(None)
}

/// Parse one config file's text; the file name picks JSON or YAML.
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
        serde_json::from_str(text).map_err(|e| err(e.to_string()))?
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| err(e.to_string()))?
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
