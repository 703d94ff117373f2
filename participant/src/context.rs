//! Reading an interactive txn's context (docs/PROTOCOL.md §12.2) in the
//! service's own gRPC handlers: the `twopc-txn` metadata entry
//! (`<txn id>;deadline=<Unix ms>`).
//!
//! Install [`read_txn_context`] as a tonic interceptor on the service's own
//! gRPC service; it parses the entry once per call, refuses a malformed one
//! with `INVALID_ARGUMENT` before the handler runs, and leaves the
//! [`TxnContext`] in the request's extensions. A handler then gets it with
//! [`txn_context`] (or [`require_txn_context`] for a call that only makes
//! sense inside a txn), or straight from `request.extensions().get::<TxnContext>()`.
//!
//! ```no_run
//! use twopc_participant::context::{read_txn_context, require_txn_context};
//! # use twopc_proto::pb::bank_server::{Bank, BankServer};
//! # fn wire<S: Bank>(service: S) {
//! // The server side: every call is checked before it reaches a handler.
//! let server = BankServer::with_interceptor(service, read_txn_context);
//! # let _ = server;
//! # }
//! // In a handler: `let ctx = require_txn_context(&request, "Debit")?;`
//! ```
//!
//! Handlers of a service without the interceptor may call
//! [`TxnContext::from_metadata`] themselves; [`txn_context`] does that too
//! when the interceptor did not run.

use tonic::{Request, Status};
pub use twopc_proto::context::{TXN_CONTEXT_METADATA_KEY, TxnContext};

use crate::error::Error;

/// Left in a request's extensions by [`read_txn_context`]: the entry was
/// read (so an absent [`TxnContext`] means the call carries none).
#[derive(Debug, Clone, Copy)]
struct ContextRead;

/// A tonic interceptor: parses the `twopc-txn` entry of every call and puts
/// the [`TxnContext`] into the request's extensions.
///
/// Install it with `MyServer::with_interceptor(service, read_txn_context)`.
///
/// # Errors
/// `INVALID_ARGUMENT` saying what is wrong when the entry is present but
/// malformed (not `<txn id>;deadline=<Unix ms>`, repeated, not ASCII).
pub fn read_txn_context(mut request: Request<()>) -> Result<Request<()>, Status> {
    let found = TxnContext::from_metadata(request.metadata())?;
    let extensions = request.extensions_mut();
    extensions.insert(ContextRead);
    if let Some(ctx) = found {
        extensions.insert(ctx);
    }
    Ok(request)
}

/// The txn context a call carries, if any: the one [`read_txn_context`]
/// left in the extensions, or, without the interceptor, the metadata's.
///
/// # Errors
/// `INVALID_ARGUMENT` for a malformed entry (only when the interceptor did
/// not already refuse it).
pub fn txn_context<T>(request: &Request<T>) -> Result<Option<TxnContext>, Status> {
    let extensions = request.extensions();
    if let Some(ctx) = extensions.get::<TxnContext>() {
        return Ok(Some(*ctx));
    }
    if extensions.get::<ContextRead>().is_some() {
        return Ok(None);
    }
    TxnContext::from_metadata(request.metadata())
}

/// [`txn_context`] for a call that needs a txn (`call` names it for the
/// message, such as `"Debit"`).
///
/// # Errors
/// `FAILED_PRECONDITION` telling the caller to begin a txn first when the
/// call carries no context; `INVALID_ARGUMENT` for a malformed one.
pub fn require_txn_context<T>(request: &Request<T>, call: &str) -> Result<TxnContext, Status> {
    txn_context(request)?.ok_or_else(|| Error::NoTxnContext { call: call.to_owned() }.into())
}

#[cfg(test)]
mod tests {
    use tonic::Code;
    use twopc_proto::TxnId;

    use super::*;

    fn request_with(value: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(value) = value {
            request.metadata_mut().insert(TXN_CONTEXT_METADATA_KEY, value.parse().expect("ascii"));
        }
        request
    }

    // §12.2: the interceptor leaves a well-formed context for the handler and
    // refuses a malformed one; with no entry the handler sees none.
    #[test]
    fn the_interceptor_parses_once_and_the_handler_reads_the_extension() {
        let ctx = TxnContext { txn_id: TxnId::new(), deadline_unix_ms: 1_764_786_000_000 };
        let passed = read_txn_context(request_with(Some(&ctx.header_value()))).expect("well-formed");
        assert_eq!(passed.extensions().get::<TxnContext>(), Some(&ctx));
        assert_eq!(txn_context(&passed).expect("read"), Some(ctx));

        let none = read_txn_context(request_with(None)).expect("absent is fine");
        assert_eq!(txn_context(&none).expect("read"), None);
        let status = require_txn_context(&none, "Debit").expect_err("needs a txn");
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("Debit needs a txn context"), "{}", status.message());

        let bad = read_txn_context(request_with(Some("soon"))).expect_err("malformed");
        assert_eq!(bad.code(), Code::InvalidArgument);
    }

    // Without the interceptor the helpers read the metadata themselves.
    #[test]
    fn without_the_interceptor_the_metadata_is_read() {
        let ctx = TxnContext { txn_id: TxnId::new(), deadline_unix_ms: 5 };
        assert_eq!(txn_context(&request_with(Some(&ctx.header_value()))).expect("read"), Some(ctx));
        assert_eq!(txn_context(&request_with(Some("x;deadline=1"))).expect_err("bad").code(), Code::InvalidArgument);
        assert_eq!(txn_context(&request_with(None)).expect("read"), None);
    }
}
