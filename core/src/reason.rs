//! Failure reasons a client sees (`Failed.reason`, `JobInfo.error`): one clear line. Error
//! texts can carry more — candle appends a captured backtrace to its errors' Display when
//! `RUST_BACKTRACE` is set — and that belongs in the log of the process that made them.

/// Longest reason kept, in characters.
pub const MAX_REASON_CHARS: usize = 500;

/// The first non-empty line of `text`, trimmed, control characters replaced and cut to
/// [`MAX_REASON_CHARS`] (with `…`).
pub fn one_line(text: &str) -> String {
    let line = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
    let clean: String = line.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if clean.chars().count() <= MAX_REASON_CHARS {
        return clean;
    }
    let mut cut: String = clean.chars().take(MAX_REASON_CHARS - 1).collect();
    cut.push('…');
    cut
}

/// [`one_line`] of `text`, logging the whole text when something was dropped.
pub fn client_reason(text: &str) -> String {
    let reason = one_line(text);
    if reason != text {
        tracing::error!("{reason} (full error follows)\n{text}");
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_line_only() {
        let with_backtrace = "cfm hop 1: stage failed: shape mismatch in conv2d\n   0: candle_core::error::Error::bt\n             at /home/x/.cargo/registry/src/candle-core/src/error.rs:262:25\n";
        assert_eq!(one_line(with_backtrace), "cfm hop 1: stage failed: shape mismatch in conv2d");
        assert_eq!(one_line("\n  plain reason\t \n"), "plain reason");
        assert_eq!(one_line("tab\tinside"), "tab inside");
        assert_eq!(one_line(""), "");
    }

    #[test]
    fn caps_the_length() {
        let long = "é".repeat(2 * MAX_REASON_CHARS);
        let cut = one_line(&long);
        assert_eq!(cut.chars().count(), MAX_REASON_CHARS);
        assert!(cut.ends_with('…'));
    }
}
