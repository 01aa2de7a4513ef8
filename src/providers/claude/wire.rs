//! What the engine writes to Claude's stdin (stream-json input): user
//! messages and the interrupt control request, one JSON object per line.

use serde_json::json;

use super::super::Image;

/// The stdin line (with `\n`) that sends a user message.
pub fn user_message_line(prompt: &str, images: &[Image]) -> String {
    let mut content = Vec::with_capacity(1 + images.len());
    for img in images {
        content.push(json!({
            "type": "image",
            "source": {"type": "base64", "media_type": img.media_type, "data": img.data_base64},
        }));
    }
    content.push(json!({"type": "text", "text": prompt}));
    let msg = json!({
        "type": "user",
        "message": {"role": "user", "content": content},
        "parent_tool_use_id": null,
        "session_id": "",
    });
    format!("{msg}\n")
}

/// The stdin line (with `\n`) that interrupts the running turn.
pub fn interrupt_line(request_id: &str) -> String {
    let req = json!({
        "type": "control_request",
        "request_id": request_id,
        "request": {"subtype": "interrupt"},
    });
    format!("{req}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn stdin_lines_are_one_json_object_each() {
        let imgs = [Image {
            media_type: "image/png".into(),
            data_base64: "aGk=".into(),
        }];
        let line = user_message_line("hi\nthere", &imgs);
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["type"], "user");
        assert_eq!(
            v["message"]["content"][0]["source"]["media_type"],
            "image/png"
        );
        assert_eq!(v["message"]["content"][1]["text"], "hi\nthere");
        let v: Value = serde_json::from_str(&interrupt_line("req_1")).unwrap();
        assert_eq!(v["request"]["subtype"], "interrupt");
        assert_eq!(v["request_id"], "req_1");
    }
}
