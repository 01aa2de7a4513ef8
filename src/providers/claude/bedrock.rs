//! Claude on Amazon Bedrock: `~/.claude/.bedrock-credentials.json`, written
//! (and overwritten in place) by the backend, is read afresh at each Claude
//! spawn. When it holds credentials, the process gets
//! `CLAUDE_CODE_USE_BEDROCK=1` and the AWS variables from it, overriding
//! the engine's own environment; nothing else from the file is passed.
//!
//! Accepted shapes: `{"accessKeyId","secretAccessKey","sessionToken"?,"region"}`
//! and `{"AWS_ACCESS_KEY_ID","AWS_SECRET_ACCESS_KEY","AWS_SESSION_TOKEN"?,"AWS_REGION"}`.
//! An unreadable or malformed file gets one `warn` naming the file and the
//! reason (a JSON position or a missing field, never a value) and Claude
//! starts without it. Values never reach a log or an event.

use std::io::Read;
use std::path::Path;

use serde::Deserialize;

/// Larger than any credentials file; a bigger one is malformed.
const MAX_BYTES: u64 = 64 * 1024;

/// The environment Bedrock credentials give a Claude process.
#[derive(Default, PartialEq, Eq)]
pub struct BedrockEnv {
    /// Variables to set.
    pub set: Vec<(&'static str, String)>,
    /// Variables to remove from the inherited environment (a session token
    /// of other credentials must not mix with the file's keys).
    pub remove: Vec<&'static str>,
}

impl std::fmt::Debug for BedrockEnv {
    /// Names only: the values are secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.set.iter().map(|(k, _)| *k).collect();
        f.debug_struct("BedrockEnv")
            .field("set", &names)
            .field("remove", &self.remove)
            .finish()
    }
}

#[derive(Deserialize)]
struct File {
    #[serde(alias = "AWS_ACCESS_KEY_ID")]
    #[serde(rename = "accessKeyId")]
    access_key_id: Option<String>,
    #[serde(alias = "AWS_SECRET_ACCESS_KEY")]
    #[serde(rename = "secretAccessKey")]
    secret_access_key: Option<String>,
    #[serde(alias = "AWS_SESSION_TOKEN")]
    #[serde(rename = "sessionToken")]
    session_token: Option<String>,
    #[serde(alias = "AWS_REGION")]
    #[serde(rename = "region")]
    region: Option<String>,
}

/// Why a credentials file was not used; never contains a value.
#[derive(Debug, PartialEq, Eq)]
pub enum Unusable {
    Unreadable(String),
    TooLarge,
    /// Not JSON of the expected shape, at this line and column.
    Malformed {
        line: usize,
        column: usize,
    },
    Missing(&'static str),
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unusable::Unreadable(e) => write!(f, "cannot be read ({e})"),
            Unusable::TooLarge => write!(f, "is larger than {MAX_BYTES} bytes"),
            Unusable::Malformed { line, column } => {
                write!(
                    f,
                    "is not valid JSON of the expected shape at line {line}, column {column}"
                )
            }
            Unusable::Missing(field) => write!(f, "has no {field}"),
        }
    }
}

/// Parse the file's text. `Ok(None)` is not produced: a present file must
/// be usable or it is reported.
pub fn parse(text: &[u8]) -> Result<BedrockEnv, Unusable> {
    let file: File = serde_json::from_slice(text).map_err(|e| Unusable::Malformed {
        line: e.line(),
        column: e.column(),
    })?;
    let nonempty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
    let key = nonempty(file.access_key_id).ok_or(Unusable::Missing("access key id"))?;
    let secret = nonempty(file.secret_access_key).ok_or(Unusable::Missing("secret access key"))?;
    let region = nonempty(file.region).ok_or(Unusable::Missing("region"))?;
    let mut env = BedrockEnv {
        set: vec![
            ("CLAUDE_CODE_USE_BEDROCK", "1".to_string()),
            ("AWS_ACCESS_KEY_ID", key),
            ("AWS_SECRET_ACCESS_KEY", secret),
            ("AWS_REGION", region),
        ],
        remove: Vec::new(),
    };
    match nonempty(file.session_token) {
        Some(token) => env.set.push(("AWS_SESSION_TOKEN", token)),
        None => env.remove.push("AWS_SESSION_TOKEN"),
    }
    Ok(env)
}

/// Read `path` now. No file: `None`, silently. A file that cannot be used:
/// `None` and one `warn` naming the file.
pub fn read(path: &Path) -> Option<BedrockEnv> {
    let result = match std::fs::File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => Err(Unusable::Unreadable(e.kind().to_string())),
        Ok(f) => {
            let mut buf = Vec::new();
            match f.take(MAX_BYTES + 1).read_to_end(&mut buf) {
                Err(e) => Err(Unusable::Unreadable(e.kind().to_string())),
                Ok(n) if n as u64 > MAX_BYTES => Err(Unusable::TooLarge),
                Ok(_) => parse(&buf),
            }
        }
    };
    match result {
        Ok(env) => Some(env),
        Err(why) => {
            tracing::warn!(file = %path.display(), reason = %why, "Bedrock credentials file not used; starting claude without it");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(env: &BedrockEnv) -> Vec<(&str, &str)> {
        env.set.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }

    #[test]
    fn both_shapes_give_the_same_variables() {
        let camel = parse(br#"{"accessKeyId":"AK","secretAccessKey":"SK","sessionToken":"ST","region":"us-east-1","other":1}"#).unwrap();
        let env = parse(br#"{"AWS_ACCESS_KEY_ID":"AK","AWS_SECRET_ACCESS_KEY":"SK","AWS_SESSION_TOKEN":"ST","AWS_REGION":"us-east-1"}"#).unwrap();
        assert_eq!(camel, env);
        assert_eq!(
            vars(&camel),
            [
                ("CLAUDE_CODE_USE_BEDROCK", "1"),
                ("AWS_ACCESS_KEY_ID", "AK"),
                ("AWS_SECRET_ACCESS_KEY", "SK"),
                ("AWS_REGION", "us-east-1"),
                ("AWS_SESSION_TOKEN", "ST"),
            ]
        );
        assert!(camel.remove.is_empty());
    }

    #[test]
    fn without_a_session_token_an_inherited_one_is_removed() {
        let env =
            parse(br#"{"accessKeyId":"AK","secretAccessKey":"SK","region":"eu-west-1"}"#).unwrap();
        assert_eq!(env.remove, ["AWS_SESSION_TOKEN"]);
        assert!(!env.set.iter().any(|(k, _)| *k == "AWS_SESSION_TOKEN"));
    }

    #[test]
    fn malformed_files_say_where_never_what() {
        let err = parse(br#"{"accessKeyId":"AKIA-SECRET","#).unwrap_err();
        assert!(matches!(err, Unusable::Malformed { line: 1, .. }));
        assert!(!err.to_string().contains("AKIA"));
        let err =
            parse(br#"{"accessKeyId":12345678,"secretAccessKey":"s","region":"r"}"#).unwrap_err();
        assert!(!err.to_string().contains("12345678"), "{err}");
        assert_eq!(
            parse(br#"{"accessKeyId":"AK","region":"r"}"#).unwrap_err(),
            Unusable::Missing("secret access key")
        );
        assert_eq!(
            parse(br#"{"accessKeyId":"AK","secretAccessKey":" ","region":"r"}"#).unwrap_err(),
            Unusable::Missing("secret access key")
        );
        assert!(parse(b"[]").is_err());
    }

    #[test]
    fn debug_shows_names_not_values() {
        let env =
            parse(br#"{"accessKeyId":"AK","secretAccessKey":"TOPSECRET","region":"r"}"#).unwrap();
        let dbg = format!("{env:?}");
        assert!(dbg.contains("AWS_SECRET_ACCESS_KEY") && !dbg.contains("TOPSECRET"));
    }

    #[test]
    fn read_is_silent_without_a_file_and_rejects_a_huge_one() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(&dir.path().join("absent.json")).is_none());
        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b' '; (MAX_BYTES + 10) as usize]).unwrap();
        assert!(read(&big).is_none());
        let ok = dir.path().join("ok.json");
        std::fs::write(
            &ok,
            br#"{"accessKeyId":"AK","secretAccessKey":"SK","region":"r"}"#,
        )
        .unwrap();
        assert_eq!(read(&ok).unwrap().set.len(), 4);
    }
}
