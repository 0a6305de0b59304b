//! How job output is read: split into lines, and `jojo_return_value key=value` lines
//! turned into return values.
//!
//! Lines break on `\n`, `\r` or `\r\n`; the terminators are dropped, a final one adds no
//! empty line, inner empty lines stay. A return-value line starts with
//! `jojo_return_value` at column 0; as in Pyjojo, every occurrence of that marker is
//! removed from the line (`k=jojo_return_value` gives `k: ""`), and the rest is split on
//! the first `=` with both sides trimmed (Pyjojo answered 500 for `a=b=c` and lost values
//! in combined mode: here `a=b=c` gives `a: "b=c"`, and a line without `=` is just
//! output).

use std::collections::BTreeMap;

pub const RETURN_VALUE_PREFIX: &str = "jojo_return_value";

/// The output limit of a job (`max_output_bytes`): what fits of each piece, and the
/// note that says where the rest was dropped. One rule for runs on the server and for
/// tasks on nodes.
#[derive(Debug, Clone)]
pub struct OutputCap {
    max: u64,
    used: u64,
    cut: bool,
}

impl OutputCap {
    pub fn new(max: u64) -> Self {
        Self::starting_at(max, 0)
    }

    /// A cap of which `used` bytes are gone already (a file being appended to, whose
    /// note, when it was cut, is part of `used`).
    pub fn starting_at(max: u64, used: u64) -> Self {
        OutputCap {
            max,
            used,
            cut: used > max,
        }
    }

    /// Of a piece of `len` bytes: how many are kept, and the note that goes right
    /// after them when this piece is where the limit is reached.
    pub fn take(&mut self, len: usize) -> (usize, Option<String>) {
        let room = self.max.saturating_sub(self.used);
        let kept = (len as u64).min(room) as usize;
        self.used += kept as u64;
        if kept < len && !self.cut {
            self.cut = true;
            let note = format!("\n[opsbox: output truncated after {} bytes]\n", self.max);
            self.used += note.len() as u64;
            return (kept, Some(note));
        }
        (kept, None)
    }
}

/// Splits text into lines the way Jojo clients expect.
pub fn split_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' => lines.push(std::mem::take(&mut current)),
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                lines.push(std::mem::take(&mut current));
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        lines.push(current);
    }
    lines
}

/// The key and value of one return-value line, if it is one.
pub fn return_value(line: &str) -> Option<(String, String)> {
    let rest = line
        .strip_prefix(RETURN_VALUE_PREFIX)?
        .replace(RETURN_VALUE_PREFIX, "");
    let (key, value) = rest.split_once('=')?;
    let key = key.trim();
    if key.is_empty() {
        return None;
    }
    Some((key.to_owned(), value.trim().to_owned()))
}

/// Finds return values in output as it streams by, keeping only the line in progress
/// when it may be one (so memory stays small whatever the output size).
#[derive(Debug, Default)]
pub struct ReturnValueScanner {
    line: Vec<u8>,
    /// The current line cannot be a return value: skip to its end.
    skipping: bool,
    /// The last byte was `\r` (a following `\n` belongs to the same break).
    after_cr: bool,
    values: BTreeMap<String, String>,
}

/// Longest return-value line kept; longer ones are ignored rather than buffered.
const MAX_LINE: usize = 64 * 1024;

impl ReturnValueScanner {
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' | b'\r' => {
                    self.end_line();
                    self.after_cr = b == b'\r';
                }
                _ => {
                    self.after_cr = false;
                    if self.skipping {
                        continue;
                    }
                    self.line.push(b);
                    let prefix = RETURN_VALUE_PREFIX.as_bytes();
                    let n = self.line.len().min(prefix.len());
                    if self.line[..n] != prefix[..n] || self.line.len() > MAX_LINE {
                        self.skipping = true;
                        self.line.clear();
                    }
                }
            }
        }
    }

    fn end_line(&mut self) {
        if !self.skipping {
            if let Some((k, v)) = return_value(&String::from_utf8_lossy(&self.line)) {
                self.values.insert(k, v);
            }
        }
        self.line.clear();
        self.skipping = false;
    }

    /// The values found, including one on an unterminated last line.
    pub fn finish(mut self) -> BTreeMap<String, String> {
        self.end_line();
        self.values
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        assert_eq!(split_lines(""), Vec::<String>::new());
        assert_eq!(split_lines("a\n"), vec!["a"]);
        assert_eq!(split_lines("a\r\nb\rc\n\nd"), vec!["a", "b", "c", "", "d"]);
        assert_eq!(split_lines("a\x0bb"), vec!["a\x0bb"]);
    }

    #[test]
    fn return_values_in_chunks() {
        let mut scan = ReturnValueScanner::default();
        scan.feed(b"hello\njojo_return_va");
        scan.feed(b"lue archived = 3\r\n  jojo_return_value x=1\njojo_return_valuek1=v1\n");
        scan.feed(b"jojo_return_value a=b=c\njojo_return_value noequals\njojo_return_value k=jojo_return_value");
        let values = scan.finish();
        assert_eq!(values.get("archived").map(String::as_str), Some("3"));
        assert_eq!(values.get("k1").map(String::as_str), Some("v1"));
        assert_eq!(values.get("a").map(String::as_str), Some("b=c"));
        assert_eq!(values.get("k").map(String::as_str), Some(""));
        assert!(!values.contains_key("x"));
        assert_eq!(values.len(), 4);
    }
}
