//! Output: aligned tables for people, JSON for scripts.

/// Prints rows under headers with columns padded to their widest cell.
/// Columns whose header starts with a space are right-aligned (numbers).
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.trim().len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .zip(headers)
            .map(
                |((cell, width), header)| {
                    if header.starts_with(' ') { format!("{cell:>width$}") } else { format!("{cell:<width$}") }
                },
            )
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.trim()).collect());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Prints a JSON value, pretty.
pub fn json(value: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string()));
}

/// Unix milliseconds as seconds-ago text, or "-" for 0.
pub fn ago(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "-".into();
    }
    let now = twopc_proto::txn_id::unix_now_ms();
    format!("{} ago", seconds(now.saturating_sub(unix_ms)))
}

/// A deadline in Unix milliseconds as "in 4.2s" (still ahead) or "passed 3.0s ago", or "-" for 0.
pub fn deadline(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "-".into();
    }
    let now = twopc_proto::txn_id::unix_now_ms();
    if unix_ms > now { format!("in {}", seconds(unix_ms - now)) } else { format!("passed {}", ago(unix_ms)) }
}

fn seconds(ms: u64) -> String {
    if ms < 10_000 { format!("{:.1}s", ms as f64 / 1000.0) } else { format!("{}s", ms / 1000) }
}
