//! Which Raft messages a member takes, and whose answers.
//!
//! Every message carries the peer key (see [`super::peer_key`]), which
//! every member derives from the cluster secret. When the cluster runs
//! TLS, each member also holds a certificate from the cluster CA named
//! after its member id ([`pflex_tls::mdm_member_name`]; `pflex up` and
//! `pflex mdm add --tls-out` issue it, as `pflex sds add` does for an SDS):
//! it presents that certificate with every message, a message is taken
//! only from the member it says sent it, and an answer only from the member
//! it was sent to. An SDS, an SDC or an NBD client (whose certificates come
//! from the same CA), or a member posing as another, is refused before
//! openraft sees the message.
//!
//! A member removed from the cluster is retired for good: its id is never
//! given again, and a message in its name is refused ([`admit_sender`]),
//! whatever certificate and key it presents. Without that, a removed
//! member that comes back (it was unreachable when it was removed, and
//! still has its certificate and the cluster secret) could still ask for
//! votes or send appends at a term of its choosing.
//!
//! Each decision is a pure function of what was presented, tested as
//! tables below.

use super::NodeId;

/// The peer key a message carried, compared with this member's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKey {
    Missing,
    Wrong,
    Matches,
}

/// How the other side of a connection identified itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity<'a> {
    /// Plain HTTP: the cluster runs without TLS, so without identities.
    Plain,
    /// HTTPS, with the name on the certificate the other side presented
    /// (verified against the cluster CA), or None if it presented none.
    Tls(Option<&'a str>),
}

/// Why a Raft message or answer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerRefusal {
    #[error("a Raft message needs the peer key")]
    NoKey,
    #[error("wrong MDM peer key")]
    WrongKey,
    #[error("an MDM member presents its certificate from the cluster CA; none was presented")]
    NoCertificate,
    #[error("the certificate {0:?} names no MDM member")]
    NotAMember(String),
    #[error("the message names no sending member")]
    NoSender,
    #[error("the certificate is member {certificate}'s, but it speaks as member {claimed}")]
    Impersonation { certificate: NodeId, claimed: NodeId },
    #[error(
        "member {0} was removed from the MDM cluster; its id and certificate are no longer taken"
    )]
    Retired(NodeId),
}

/// Where the sender of a message stands in this member's view of the
/// cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// In the membership this member knows (voter or learner).
    Member,
    /// Not in it, and never removed: a member added by entries this member
    /// has not received yet (its leader must be heard to catch up).
    Unknown,
    /// Removed from the cluster (a committed `pflex mdm remove`).
    Retired,
}

/// Whether a message from `sender`, already admitted by
/// [`admit_message`], is taken given the sender's standing.
pub fn admit_sender(sender: NodeId, standing: Standing) -> Result<(), PeerRefusal> {
    match standing {
        Standing::Member | Standing::Unknown => Ok(()),
        Standing::Retired => Err(PeerRefusal::Retired(sender)),
    }
}

/// The member a certificate identifies, or why it identifies none.
fn member_of(identity: Identity<'_>) -> Result<Option<NodeId>, PeerRefusal> {
    match identity {
        Identity::Plain => Ok(None),
        Identity::Tls(None) => Err(PeerRefusal::NoCertificate),
        Identity::Tls(Some(name)) => pflex_tls::mdm_member_of(name)
            .map(Some)
            .ok_or_else(|| PeerRefusal::NotAMember(name.to_string())),
    }
}

/// Whether a message that says it comes from member `sender` is taken.
pub fn admit_message(
    key: PeerKey,
    identity: Identity<'_>,
    sender: Option<NodeId>,
) -> Result<(), PeerRefusal> {
    match key {
        PeerKey::Missing => return Err(PeerRefusal::NoKey),
        PeerKey::Wrong => return Err(PeerRefusal::WrongKey),
        PeerKey::Matches => {}
    }
    let Some(certificate) = member_of(identity)? else { return Ok(()) };
    let claimed = sender.ok_or(PeerRefusal::NoSender)?;
    if certificate != claimed {
        return Err(PeerRefusal::Impersonation { certificate, claimed });
    }
    Ok(())
}

/// Whether an answer to a message sent to member `target` is taken.
pub fn accept_answer(identity: Identity<'_>, target: NodeId) -> Result<(), PeerRefusal> {
    match member_of(identity)? {
        Some(certificate) if certificate != target => {
            Err(PeerRefusal::Impersonation { certificate, claimed: target })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_taken_from_the_member_they_name() {
        use Identity::*;
        use PeerKey::*;
        let bad = |r: Result<(), PeerRefusal>| r.unwrap_err();
        for (key, identity, sender, expected) in [
            (Matches, Plain, Some(1), Ok(())),
            (Matches, Plain, None, Ok(())),
            (Missing, Plain, Some(1), Err(PeerRefusal::NoKey)),
            (Wrong, Plain, Some(1), Err(PeerRefusal::WrongKey)),
            (Matches, Tls(Some("pflex-mdm-1")), Some(1), Ok(())),
            (Wrong, Tls(Some("pflex-mdm-1")), Some(1), Err(PeerRefusal::WrongKey)),
            (Matches, Tls(None), Some(1), Err(PeerRefusal::NoCertificate)),
            (Matches, Tls(Some("sds1")), Some(1), Err(PeerRefusal::NotAMember("sds1".into()))),
            (
                Matches,
                Tls(Some("pflex-mdm-2")),
                Some(1),
                Err(PeerRefusal::Impersonation { certificate: 2, claimed: 1 }),
            ),
            (Matches, Tls(Some("pflex-mdm-2")), None, Err(PeerRefusal::NoSender)),
        ] {
            assert_eq!(
                admit_message(key, identity, sender),
                expected,
                "{key:?} {identity:?} {sender:?}"
            );
        }
        // Every refusal says why in words an operator can act on.
        assert!(bad(admit_message(Matches, Tls(None), Some(1))).to_string().contains("cluster CA"));
    }

    #[test]
    fn a_removed_member_is_never_heard_again() {
        for (standing, expected) in [
            (Standing::Member, Ok(())),
            (Standing::Unknown, Ok(())),
            (Standing::Retired, Err(PeerRefusal::Retired(4))),
        ] {
            assert_eq!(admit_sender(4, standing), expected, "{standing:?}");
        }
        let refusal = admit_sender(4, Standing::Retired).unwrap_err().to_string();
        assert!(refusal.contains("member 4 was removed"), "{refusal}");
    }

    #[test]
    fn answers_are_taken_from_the_member_asked() {
        use Identity::*;
        for (identity, target, expected) in [
            (Plain, 3, Ok(())),
            (Tls(Some("pflex-mdm-3")), 3, Ok(())),
            (
                Tls(Some("pflex-mdm-2")),
                3,
                Err(PeerRefusal::Impersonation { certificate: 2, claimed: 3 }),
            ),
            (Tls(Some("mgmt")), 3, Err(PeerRefusal::NotAMember("mgmt".into()))),
            (Tls(None), 3, Err(PeerRefusal::NoCertificate)),
        ] {
            assert_eq!(accept_answer(identity, target), expected, "{identity:?} {target}");
        }
    }
}
