//! A line reader with a hard cap: an agent CLI may print a 10 MB line (a
//! tool dumping a file); we must neither buffer it nor die on it. Lines up to
//! `max` bytes are returned borrowed from one reused buffer (no allocation
//! per line); a longer line is skipped to its newline and reported by size.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// One line read by [`CappedLines`].
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// A complete line without its trailing `\n` (and `\r`).
    Text(&'a str),
    /// A line longer than the cap, skipped; `len` bytes were discarded.
    /// `head` is its first bytes (up to [`HEAD_BYTES`]), enough to tell
    /// what kind of event it was.
    TooLong { len: usize, head: &'a [u8] },
    /// A line that is not UTF-8, skipped.
    NotUtf8 { len: usize },
}

/// Reads lines of at most `max` bytes from a buffered reader.
///
/// Cancel-safe: all progress lives in `self`, so a `select!` that drops a
/// pending [`CappedLines::next_line`] loses nothing.
pub struct CappedLines<R> {
    reader: R,
    buf: Vec<u8>,
    max: usize,
    /// Bytes of the current line dropped because it went over the cap.
    discarded: usize,
    /// Some bytes of the current line were seen.
    in_line: bool,
    /// The previous call returned a line: clear before reading the next.
    returned: bool,
    /// The first bytes of an over-long line.
    head: Vec<u8>,
}

/// How much of an over-long line is kept to identify it.
pub const HEAD_BYTES: usize = 256;

/// The default cap: generous for any real JSON event, small enough to bound
/// memory per chat.
pub const DEFAULT_MAX_LINE: usize = 4 * 1024 * 1024;

impl<R: AsyncBufRead + Unpin> CappedLines<R> {
    pub fn new(reader: R, max: usize) -> Self {
        Self {
            reader,
            buf: Vec::with_capacity(8 * 1024),
            max,
            discarded: 0,
            in_line: false,
            returned: false,
            head: Vec::with_capacity(HEAD_BYTES),
        }
    }

    /// The next line, or `None` at end of input. A final line without a
    /// newline is still returned.
    pub async fn next_line(&mut self) -> std::io::Result<Option<Line<'_>>> {
        if self.returned {
            self.buf.clear();
            self.discarded = 0;
            self.in_line = false;
            self.returned = false;
            self.head.clear();
        }
        loop {
            // `fill_buf` is cancel-safe; everything after it runs without an
            // await until `consume`, so no byte is ever lost.
            let chunk = self.reader.fill_buf().await?;
            if chunk.is_empty() {
                if !self.in_line {
                    return Ok(None);
                }
                break;
            }
            self.in_line = true;
            let (take, done) = match memchr::memchr(b'\n', chunk) {
                Some(i) => (i, i + 1),
                None => (chunk.len(), chunk.len()),
            };
            let found_newline = take < done;
            if self.discarded == 0 && self.buf.len() + take <= self.max {
                self.buf.extend_from_slice(&chunk[..take]);
            } else {
                // Over the cap: keep the head, drop the rest and count it.
                if self.discarded == 0 {
                    self.buf.extend_from_slice(&chunk[..take.min(HEAD_BYTES)]);
                    let n = self.buf.len().min(HEAD_BYTES);
                    self.head.extend_from_slice(&self.buf[..n]);
                    self.discarded = self.buf.len().saturating_sub(take.min(HEAD_BYTES));
                    self.discarded += take;
                } else {
                    self.discarded += take;
                }
                self.buf.clear();
            }
            self.reader.consume(done);
            if found_newline {
                break;
            }
        }
        self.returned = true;
        if self.discarded > 0 {
            return Ok(Some(Line::TooLong {
                len: self.discarded,
                head: &self.head,
            }));
        }
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        match std::str::from_utf8(&self.buf) {
            Ok(s) => Ok(Some(Line::Text(s))),
            Err(_) => Ok(Some(Line::NotUtf8 {
                len: self.buf.len(),
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    async fn collect(input: &[u8], max: usize, cap: usize) -> Vec<String> {
        let mut r = CappedLines::new(BufReader::with_capacity(cap, input), max);
        let mut out = Vec::new();
        while let Some(line) = r.next_line().await.unwrap() {
            out.push(match line {
                Line::Text(s) => s.to_string(),
                Line::TooLong { len, head } => format!(
                    "<too long {len} {}>",
                    String::from_utf8_lossy(&head[..head.len().min(3)])
                ),
                Line::NotUtf8 { len } => format!("<not utf8 {len}>"),
            });
        }
        out
    }

    #[tokio::test]
    async fn splits_lines_across_small_buffers() {
        let got = collect(b"ab\r\ncdef\n\nlast", 100, 3).await;
        assert_eq!(got, vec!["ab", "cdef", "", "last"]);
    }

    #[tokio::test]
    async fn skips_over_long_lines_and_keeps_going() {
        let mut input = b"ok\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 10_000));
        input.extend(b"\nafter\n");
        let got = collect(&input, 1000, 64).await;
        assert_eq!(got, vec!["ok", "<too long 10000 xxx>", "after"]);
    }

    #[tokio::test]
    async fn a_line_exactly_at_the_cap_is_kept() {
        let got = collect(b"12345\n123456\n", 5, 2).await;
        assert_eq!(got, vec!["12345", "<too long 6 123>"]);
    }

    #[tokio::test]
    async fn reports_non_utf8() {
        let got = collect(b"\xff\xfe\nok\n", 100, 8).await;
        assert_eq!(got, vec!["<not utf8 2>", "ok"]);
    }
}
