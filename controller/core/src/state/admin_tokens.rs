//! Admin tokens in the state: created, revoked (kept as tombstones so a
//! name is never reused), and checked on every admin call.

use std::collections::btree_map::Entry;

use super::State;
use crate::admin::{
    AdminToken, AuthError, BOOTSTRAP_TOKEN, DEFAULT_ADMIN_TOKEN_TTL_SECS, MAX_ADMIN_TOKEN_TTL_SECS,
    Role,
};
use crate::error::Error;
use crate::model::check_name;

impl State {
    /// Creates a named admin token from the hash of its secret; `ttl_secs`
    /// 0 means [`DEFAULT_ADMIN_TOKEN_TTL_SECS`].
    pub fn create_admin_token(
        &mut self,
        name: &str,
        role: Role,
        secret_hash: [u8; 32],
        now: u64,
        ttl_secs: u64,
    ) -> Result<&AdminToken, Error> {
        check_name("admin token", name)?;
        let ttl = if ttl_secs == 0 {
            DEFAULT_ADMIN_TOKEN_TTL_SECS
        } else {
            ttl_secs
        };
        if ttl > MAX_ADMIN_TOKEN_TTL_SECS {
            return Err(Error::InvalidAdminTokenTtl(ttl));
        }
        if self
            .admin_tokens
            .values()
            .any(|t| t.secret_hash == secret_hash)
        {
            // Only a broken random source gets here.
            return Err(Error::AdminTokenExists(name.to_owned()));
        }
        match self.admin_tokens.entry(name.to_owned()) {
            Entry::Occupied(_) => Err(Error::AdminTokenExists(name.to_owned())),
            Entry::Vacant(slot) => {
                self.revision += 1;
                Ok(slot.insert(AdminToken {
                    name: name.to_owned(),
                    role,
                    secret_hash,
                    created_unix: now,
                    expires_unix: now.saturating_add(ttl),
                    revoked_unix: None,
                }))
            }
        }
    }

    /// Revokes an admin token at once; it stays listed as revoked. Refused
    /// if it is the last usable admin token (no one could administer the
    /// network any more). Revoking a revoked token changes nothing.
    pub fn revoke_admin_token(&mut self, name: &str, now: u64) -> Result<(), Error> {
        let token = self
            .admin_tokens
            .get(name)
            .ok_or_else(|| Error::AdminTokenNotFound(name.to_owned()))?;
        if token.revoked_unix.is_some() {
            return Ok(());
        }
        let other_admins = self
            .admin_tokens
            .values()
            .filter(|t| t.name != name && t.role == Role::Admin && t.usable(now))
            .count();
        if token.role == Role::Admin && token.usable(now) && other_admins == 0 {
            return Err(Error::LastAdminToken(name.to_owned()));
        }
        if let Some(t) = self.admin_tokens.get_mut(name) {
            t.revoked_unix = Some(now);
        }
        self.revision += 1;
        Ok(())
    }

    /// Admin tokens by name, revoked ones included.
    pub fn admin_tokens(&self) -> impl Iterator<Item = &AdminToken> {
        self.admin_tokens.values()
    }

    /// The token whose secret hashes to `secret_hash`, if it is usable now.
    pub fn authenticate_admin(
        &self,
        secret_hash: &[u8; 32],
        now: u64,
    ) -> Result<&AdminToken, AuthError> {
        let t = self
            .admin_tokens
            .values()
            .find(|t| &t.secret_hash == secret_hash)
            .ok_or(AuthError::Unknown)?;
        if let Some(at) = t.revoked_unix {
            return Err(AuthError::Revoked {
                name: t.name.clone(),
                at,
            });
        }
        if t.expires_unix != 0 && now >= t.expires_unix {
            return Err(AuthError::Expired {
                name: t.name.clone(),
                at: t.expires_unix,
            });
        }
        Ok(t)
    }

    /// Makes the token of `admin.conf` the admin token [`BOOTSTRAP_TOKEN`]
    /// (no expiry): added if absent, its hash updated if `admin.conf` was
    /// regenerated; a revoked bootstrap token stays revoked. Returns
    /// whether anything changed.
    pub fn ensure_bootstrap_token(&mut self, secret_hash: [u8; 32], now: u64) -> bool {
        match self.admin_tokens.get_mut(BOOTSTRAP_TOKEN) {
            Some(t) if t.revoked_unix.is_some() || t.secret_hash == secret_hash => false,
            Some(t) => {
                t.secret_hash = secret_hash;
                self.revision += 1;
                true
            }
            None => {
                self.admin_tokens.insert(
                    BOOTSTRAP_TOKEN.to_owned(),
                    AdminToken {
                        name: BOOTSTRAP_TOKEN.to_owned(),
                        role: Role::Admin,
                        secret_hash,
                        created_unix: now,
                        expires_unix: 0,
                        revoked_unix: None,
                    },
                );
                self.revision += 1;
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::NetworkSettings;
    use crate::admin::{AuthError, Role};
    use crate::error::Error;
    use crate::state::State;

    const NOW: u64 = 1_800_000_000;

    fn state() -> State {
        let settings =
            NetworkSettings::with_ipv6_prefix("fd7e:4a1:1234::/48".parse().expect("valid prefix"));
        let mut s = State::new(settings).expect("valid settings");
        assert!(s.ensure_bootstrap_token([1; 32], NOW));
        s
    }

    #[test]
    fn bootstrap_is_an_admin_token_that_never_expires() {
        let mut s = state();
        let t = s.authenticate_admin(&[1; 32], u64::MAX).expect("accepted");
        assert_eq!((t.name.as_str(), t.role), ("bootstrap", Role::Admin));
        let rev = s.revision();
        assert!(
            !s.ensure_bootstrap_token([1; 32], NOW),
            "same hash: no change"
        );
        assert!(
            s.ensure_bootstrap_token([2; 32], NOW),
            "admin.conf regenerated"
        );
        assert_eq!(s.revision(), rev + 1);
        assert_eq!(s.authenticate_admin(&[1; 32], NOW), Err(AuthError::Unknown));
        assert!(s.authenticate_admin(&[2; 32], NOW).is_ok());
    }

    #[test]
    fn tokens_expire_and_revocation_is_final() {
        let mut s = state();
        s.create_admin_token("ci", Role::Viewer, [3; 32], NOW, 60)
            .expect("created");
        assert_eq!(
            s.authenticate_admin(&[3; 32], NOW + 59).map(|t| t.role),
            Ok(Role::Viewer)
        );
        assert!(matches!(
            s.authenticate_admin(&[3; 32], NOW + 60),
            Err(AuthError::Expired { .. })
        ));
        s.create_admin_token("ops", Role::Admin, [4; 32], NOW, 0)
            .expect("created with the default lifetime");
        s.revoke_admin_token("ops", NOW + 1).expect("revoked");
        let err = s
            .authenticate_admin(&[4; 32], NOW + 2)
            .expect_err("revoked");
        assert!(err.to_string().contains("\"ops\" was revoked"), "{err}");
        let rev = s.revision();
        s.revoke_admin_token("ops", NOW + 3).expect("again: no-op");
        assert_eq!(s.revision(), rev);
        assert_eq!(
            s.create_admin_token("ops", Role::Admin, [5; 32], NOW, 0)
                .map(|t| t.name.clone()),
            Err(Error::AdminTokenExists("ops".into())),
            "a revoked name is not reused"
        );
        // A revoked bootstrap token is not brought back at restart.
        s.create_admin_token("root2", Role::Admin, [6; 32], NOW, 0)
            .expect("created");
        s.revoke_admin_token("bootstrap", NOW).expect("revoked");
        assert!(!s.ensure_bootstrap_token([9; 32], NOW));
        assert!(s.authenticate_admin(&[9; 32], NOW).is_err());
    }

    #[test]
    fn the_last_usable_admin_token_cannot_be_revoked() {
        let mut s = state();
        s.create_admin_token("view", Role::Viewer, [3; 32], NOW, 60)
            .expect("created");
        assert_eq!(
            s.revoke_admin_token("bootstrap", NOW),
            Err(Error::LastAdminToken("bootstrap".into()))
        );
        s.create_admin_token("old", Role::Admin, [4; 32], NOW, 10)
            .expect("created");
        assert_eq!(
            s.revoke_admin_token("bootstrap", NOW + 10),
            Err(Error::LastAdminToken("bootstrap".into())),
            "an expired admin token does not count"
        );
        s.revoke_admin_token("view", NOW).expect("viewers may go");
        assert_eq!(
            s.revoke_admin_token("nope", NOW),
            Err(Error::AdminTokenNotFound("nope".into()))
        );
    }

    #[test]
    fn bad_names_and_lifetimes_are_refused_and_change_nothing() {
        let mut s = state();
        let before = s.clone();
        assert!(matches!(
            s.create_admin_token("Bad Name", Role::Admin, [3; 32], NOW, 60),
            Err(Error::InvalidName { .. })
        ));
        assert!(matches!(
            s.create_admin_token("ok", Role::Admin, [3; 32], NOW, 367 * 86_400),
            Err(Error::InvalidAdminTokenTtl(_))
        ));
        assert!(matches!(
            s.create_admin_token("dup", Role::Admin, [1; 32], NOW, 60),
            Err(Error::AdminTokenExists(_))
        ));
        assert_eq!(s, before);
    }
}
