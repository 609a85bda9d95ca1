//! Dashboard accounts: password hashing, roles and the login rate limit.
//!
//! - Passwords are hashed with Argon2id (the `argon2` crate's defaults:
//!   19 MiB, 2 passes, one lane), stored as PHC strings. Hashing takes tens
//!   of milliseconds of CPU on purpose, so it never runs on an async thread
//!   or under the database lock: the web side runs it on the blocking pool,
//!   at most [`HASHING_AT_ONCE`] at a time. Hashes made by older versions
//!   (salted, iterated SHA-256) still verify, compared in constant time, and
//!   are replaced by Argon2id at the next successful login.
//! - Roles: `admin` (everything, including managing users) and `monitor`
//!   (read only).
//! - Failed logins are counted per client address: after
//!   [`LoginLimiter::MAX_FAILURES`] in [`LoginLimiter::WINDOW`] that address
//!   is refused (HTTP 429) until the window ends, whatever it sends. Per
//!   address rather than per user, so a stranger cannot lock the admin out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Password hashes computed at once (each takes ~19 MiB and a core for tens
/// of ms); more logins wait their turn.
pub const HASHING_AT_ONCE: usize = 2;
/// Shortest password a user may set.
pub const MIN_PASSWORD_LEN: usize = 12;

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Monitor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Monitor => "monitor",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "monitor" => Some(Role::Monitor),
            _ => None,
        }
    }
}

/// An Argon2id PHC string for `password` (slow: call off the async threads).
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::encode_b64(&pflex_proto::random_bytes::<16>())
        .expect("16 bytes are a valid salt");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("Argon2 with default parameters hashes any password")
        .to_string()
}

/// Whether `password` matches `stored` (slow: call off the async threads).
/// `legacy_salt` is the salt column of hashes made before Argon2id.
pub fn verify_password(stored: &str, legacy_salt: &str, password: &str) -> bool {
    if stored.starts_with("$argon2") {
        return PasswordHash::new(stored).is_ok_and(|parsed| {
            Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok()
        });
    }
    let computed = legacy_sha256(legacy_salt, password);
    computed.as_bytes().ct_eq(stored.as_bytes()).into()
}

/// Whether `stored` should be replaced by an Argon2id hash.
pub fn is_legacy(stored: &str) -> bool {
    !stored.starts_with("$argon2")
}

/// The hash older versions stored: salted, iterated SHA-256.
fn legacy_sha256(salt: &str, password: &str) -> String {
    let mut h: [u8; 32] = Sha256::digest(format!("{salt}:{password}")).into();
    for _ in 0..100_000 {
        h = Sha256::digest(h).into();
    }
    hex::encode(h)
}

/// A hash nobody's password matches, verified for unknown users so that a
/// login for a name that does not exist takes as long as one that does.
pub fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| hash_password(&hex::encode(pflex_proto::random_bytes::<16>())))
}

/// Failed logins per client address.
#[derive(Default)]
pub struct LoginLimiter {
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

/// Failures of one address within the current window.
#[derive(Debug, Clone, Copy)]
pub struct Failures {
    pub count: u32,
    pub since: Instant,
}

/// Whether an address with `failures` may try to log in at `now`.
pub fn login_allowed(failures: Option<Failures>, now: Instant) -> bool {
    match failures {
        None => true,
        Some(f) if now.duration_since(f.since) >= LoginLimiter::WINDOW => true,
        Some(f) => f.count < LoginLimiter::MAX_FAILURES,
    }
}

impl LoginLimiter {
    pub const MAX_FAILURES: u32 = 5;
    pub const WINDOW: Duration = Duration::from_secs(60);
    /// Addresses remembered at most (older windows are dropped first).
    const MAX_TRACKED: usize = 10_000;

    pub fn allowed(&self, ip: IpAddr) -> bool {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        login_allowed(failures.get(&ip).copied(), Instant::now())
    }

    pub fn failed(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() >= Self::MAX_TRACKED {
            failures.retain(|_, f| now.duration_since(f.since) < Self::WINDOW);
        }
        let entry = failures.entry(ip).or_insert(Failures { count: 0, since: now });
        if now.duration_since(entry.since) >= Self::WINDOW {
            *entry = Failures { count: 0, since: now };
        }
        entry.count += 1;
    }

    pub fn succeeded(&self, ip: IpAddr) {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2id_and_legacy_hashes_verify() {
        let stored = hash_password("correct horse battery");
        assert!(stored.starts_with("$argon2id$"), "{stored}");
        assert!(verify_password(&stored, "", "correct horse battery"));
        assert!(!verify_password(&stored, "", "correct horse batterz"));
        assert!(!is_legacy(&stored));
        let legacy = legacy_sha256("salt", "old password");
        assert!(is_legacy(&legacy));
        assert!(verify_password(&legacy, "salt", "old password"));
        assert!(!verify_password(&legacy, "salt", "old passwore"));
        assert!(!verify_password(&legacy, "pepper", "old password"));
    }

    /// (failures so far, seconds since the first) -> may try again.
    #[test]
    fn login_limit_table() {
        let now = Instant::now() + Duration::from_secs(3600);
        let f = |count, ago: u64| Some(Failures { count, since: now - Duration::from_secs(ago) });
        assert!(login_allowed(None, now));
        assert!(login_allowed(f(1, 1), now));
        assert!(login_allowed(f(4, 59), now));
        assert!(!login_allowed(f(5, 1), now));
        assert!(!login_allowed(f(50, 59), now));
        assert!(login_allowed(f(50, 60), now), "the window ended");
    }
}
