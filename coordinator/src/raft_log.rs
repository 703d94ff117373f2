//! Routes raft-rs's slog output into `tracing` (target `raft`), so one
//! subscriber, set up by the binary, sees everything.

use std::fmt::Write as _;

use slog::{Drain, KV as _, Level, OwnedKVList, Record, Serializer};

/// An slog logger whose records become tracing events tagged with `node_id`.
pub fn raft_logger(node_id: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain { node_id }.fuse(), slog::o!())
}

struct TracingDrain {
    node_id: u64,
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
        let mut fields = KvText(String::new());
        // Serializing into a String cannot fail; a failure would only lose context.
        let _ = record.kv().serialize(record, &mut fields);
        let _ = values.serialize(record, &mut fields);
        let message = record.msg();
        let node_id = self.node_id;
        let fields = fields.0;
        match record.level() {
            Level::Critical | Level::Error => {
                tracing::error!(target: "raft", node_id, "{message}{fields}")
            }
            Level::Warning => tracing::warn!(target: "raft", node_id, "{message}{fields}"),
            // raft-rs logs role changes at info; they matter to operators.
            Level::Info => tracing::info!(target: "raft", node_id, "{message}{fields}"),
            Level::Debug => tracing::debug!(target: "raft", node_id, "{message}{fields}"),
            Level::Trace => tracing::trace!(target: "raft", node_id, "{message}{fields}"),
        }
        Ok(())
    }
}

struct KvText(String);

impl Serializer for KvText {
    fn emit_arguments(&mut self, key: slog::Key, value: &std::fmt::Arguments<'_>) -> slog::Result {
        let _ = write!(self.0, " {key}={value}");
        Ok(())
    }
}
