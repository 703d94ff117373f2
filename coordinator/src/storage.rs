//! raft-rs storage on raft-engine. (being written)
