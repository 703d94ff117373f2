//! Peer transport. (being written)
