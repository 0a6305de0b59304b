//! Job names: `prefix@<A>:<B>:<C>`, the Disco master's form, where A, B and C are the
//! clock's megaseconds, seconds and microseconds in lowercase hex. Names from one
//! generator are unique even within one microsecond: the clock is bumped past the last
//! name given.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Default)]
pub struct NameGen {
    /// Microseconds since the epoch of the last name given.
    last: Mutex<u64>,
}

impl NameGen {
    pub fn next(&self, prefix: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let micros = {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            *last = now.max(*last + 1);
            *last
        };
        let secs = micros / 1_000_000;
        format!(
            "{prefix}@{:x}:{:x}:{:x}",
            secs / 1_000_000,
            secs % 1_000_000,
            micros % 1_000_000
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_and_shaped_like_disco() {
        let gen = NameGen::default();
        let names: std::collections::HashSet<_> = (0..10_000).map(|_| gen.next("wc")).collect();
        assert_eq!(names.len(), 10_000);
        let one = gen.next("wc");
        let (prefix, clock) = one.split_once('@').unwrap();
        assert_eq!(prefix, "wc");
        assert_eq!(clock.split(':').count(), 3);
        assert!(clock.chars().all(|c| c == ':' || c.is_ascii_hexdigit()));
    }
}
