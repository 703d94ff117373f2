//! Who may call what: each server's table of gRPC methods and the roles
//! allowed to call them, checked on every call from the identity in the
//! peer's certificate (docs/SECURITY.md has the same table).
//!
//! Default deny: a method no row names is refused to everyone. Only a
//! plaintext connection skips the check; a server listens in plaintext only
//! on loopback or when told `--insecure`.

use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use tonic::Status;

use crate::net::PeerInfo;
use crate::tls::{Identity, Role};

/// A server's table: gRPC path prefixes (`/twopc.v1.Admin/` or a whole
/// method path) and the roles allowed; the first matching row decides.
#[derive(Debug, Clone, Copy)]
pub struct Policy(pub &'static [(&'static str, &'static [Role])]);

/// The coordinator's server: the peer, client and admin services.
pub const COORDINATOR: Policy = Policy(&[
    ("/twopc.v1.RaftPeer/", &[Role::Node]),
    // A participant registers only itself (checked in the handler): the join of a new participant.
    ("/twopc.v1.Admin/RegisterParticipant", &[Role::Admin, Role::Participant]),
    ("/twopc.v1.Admin/", &[Role::Admin]),
    // Each participant only for its own branches (checked in the handler).
    ("/twopc.v1.Coordinator/Resolve", &[Role::Participant]),
    ("/twopc.v1.Coordinator/Join", &[Role::Participant]),
    ("/twopc.v1.Coordinator/", &[Role::Client, Role::Admin]),
]);

/// A participant's server: Prepare/Decide come only from coordinator nodes;
/// the bank's own account API, served on the same port, from clients and admins.
pub const PARTICIPANT: Policy =
    Policy(&[("/twopc.v1.Participant/", &[Role::Node]), ("/twopc.v1.Bank/", &[Role::Client, Role::Admin])]);

impl Policy {
    /// The roles that may call `path`; empty when none may.
    pub fn roles(&self, path: &str) -> &'static [Role] {
        self.0.iter().find(|(prefix, _)| path.starts_with(prefix)).map_or(&[], |(_, roles)| roles)
    }

    /// Whether the caller on `peer` may call `path`.
    ///
    /// # Errors
    /// `PERMISSION_DENIED` naming the role the method needs and the caller's identity.
    pub fn check(&self, path: &str, peer: Option<&PeerInfo>) -> Result<(), Status> {
        let Some(peer) = peer.filter(|p| p.tls) else {
            return Ok(());
        };
        let roles = self.roles(path);
        let caller = peer.identity.as_ref();
        if caller.is_some_and(|id| roles.contains(&id.role)) {
            return Ok(());
        }
        let who = caller.map_or_else(|| "a certificate naming no twopc identity".to_owned(), Identity::to_string);
        let needed = match roles {
            [] => "no role may call it".to_owned(),
            roles => format!("it needs role {}", roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(" or ")),
        };
        Err(Status::permission_denied(format!("{path} refused for {who}: {needed} (docs/SECURITY.md)")))
    }
}

/// Checks that a participant calling with `request` acts only for itself:
/// on a TLS connection whose certificate names `participant:<x>`, `name`
/// must be `x`. Other roles pass (the [`Policy`] already admitted them).
///
/// # Errors
/// `PERMISSION_DENIED` when a participant asks for another one.
pub fn participant_acts_as_itself<T>(request: &tonic::Request<T>, name: &str) -> Result<(), Status> {
    let Some(peer) = PeerInfo::of(request).filter(|p| p.tls) else {
        return Ok(());
    };
    match &peer.identity {
        Some(id) if id.role == Role::Participant && id.name != name => Err(Status::permission_denied(format!(
            "{id} may not act for participant {name:?}: it needs role participant with name {name:?}"
        ))),
        _ => Ok(()),
    }
}

/// The tower layer that applies a [`Policy`] to every call of a tonic server.
#[derive(Debug, Clone, Copy)]
pub struct AuthorizeLayer(pub Policy);

impl<S> tower::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorize { inner, policy: self.0 }
    }
}

/// A service that refuses the calls its [`Policy`] does not allow.
#[derive(Debug, Clone)]
pub struct Authorize<S> {
    inner: S,
    policy: Policy,
}

impl<S, B> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match self.policy.check(request.uri().path(), request.extensions().get::<PeerInfo>()) {
            Ok(()) => Either::Left(self.inner.call(request)),
            Err(status) => Either::Right(ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(role: Role) -> PeerInfo {
        PeerInfo { remote_addr: None, tls: true, identity: Some(Identity { role, name: "x".into() }) }
    }

    #[test]
    fn the_first_matching_row_decides_and_unknown_methods_are_denied_to_all() {
        assert_eq!(COORDINATOR.roles("/twopc.v1.Coordinator/Resolve"), &[Role::Participant]);
        assert_eq!(COORDINATOR.roles("/twopc.v1.Coordinator/Submit"), &[Role::Client, Role::Admin]);
        assert!(COORDINATOR.check("/twopc.v1.Admin/Decide", Some(&peer(Role::Admin))).is_ok());
        let denied = COORDINATOR.check("/twopc.v1.Admin/Decide", Some(&peer(Role::Client))).expect_err("client");
        assert!(denied.message().contains("needs role admin"), "{denied:?}");
        for role in Role::ALL {
            let status = COORDINATOR.check("/grpc.reflection.v1.ServerReflection/Info", Some(&peer(role)));
            assert_eq!(status.expect_err("default deny").code(), tonic::Code::PermissionDenied);
        }
        let no_identity = PeerInfo { identity: None, ..peer(Role::Node) };
        assert!(PARTICIPANT.check("/twopc.v1.Participant/Prepare", Some(&no_identity)).is_err());
        // Plaintext (loopback or --insecure) checks nothing.
        assert!(PARTICIPANT.check("/twopc.v1.Participant/Prepare", Some(&PeerInfo::default())).is_ok());
    }
}
