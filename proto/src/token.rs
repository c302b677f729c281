//! Join tokens: `weft1.<id>.<secret>.<ca-sha256>`.
//!
//! The id names the token on the controller, the secret proves possession
//! (the controller stores only its SHA-256), and the CA hash pins the
//! controller's certificate authority, as kubeadm's discovery hash does: an
//! agent enrolling with the token trusts only a controller whose certificate
//! chains to that CA.

use std::fmt;
use std::str::FromStr;

/// Token format version prefix.
pub const TOKEN_PREFIX: &str = "weft1";

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Public identifier, 6 characters `[a-z0-9]`.
    pub id: String,
    /// Secret, 16 characters `[a-z0-9]`.
    pub secret: String,
    /// SHA-256 of the controller CA certificate (DER).
    pub ca_hash: [u8; 32],
}

/// Why a join token string is not a join token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "join token is malformed: {0} (expected weft1.<id>.<secret>.<ca-sha256>, as printed by `weftctl token create`)"
)]
pub struct MalformedToken(&'static str);

impl JoinToken {
    /// The part sent to the controller: `<id>.<secret>`.
    pub fn credential(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }

    /// Splits the `<id>.<secret>` credential the controller receives.
    pub fn parse_credential(s: &str) -> Result<(String, String), MalformedToken> {
        let (id, secret) = s
            .split_once('.')
            .ok_or(MalformedToken("missing '.' between id and secret"))?;
        check_part(id, 6, "id must be 6 characters [a-z0-9]")?;
        check_part(secret, 16, "secret must be 16 characters [a-z0-9]")?;
        Ok((id.to_string(), secret.to_string()))
    }
}

fn check_part(s: &str, len: usize, what: &'static str) -> Result<(), MalformedToken> {
    if s.len() == len
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        Ok(())
    } else {
        Err(MalformedToken(what))
    }
}

impl FromStr for JoinToken {
    type Err = MalformedToken;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().split('.');
        if parts.next() != Some(TOKEN_PREFIX) {
            return Err(MalformedToken("it does not start with 'weft1.'"));
        }
        let id = parts.next().ok_or(MalformedToken("missing id"))?;
        let secret = parts.next().ok_or(MalformedToken("missing secret"))?;
        let hash = parts.next().ok_or(MalformedToken("missing CA hash"))?;
        if parts.next().is_some() {
            return Err(MalformedToken("too many '.'-separated parts"));
        }
        check_part(id, 6, "id must be 6 characters [a-z0-9]")?;
        check_part(secret, 16, "secret must be 16 characters [a-z0-9]")?;
        let ca_hash =
            parse_hash(hash).ok_or(MalformedToken("CA hash must be 64 hex characters"))?;
        Ok(JoinToken {
            id: id.to_string(),
            secret: secret.to_string(),
            ca_hash,
        })
    }
}

fn parse_hash(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let hex = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(out)
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{TOKEN_PREFIX}.{}.{}.", self.id, self.secret)?;
        for b in self.ca_hash {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        write!(f, "JoinToken({})", self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let t = JoinToken {
            id: "abc123".into(),
            secret: "0123456789abcdef".into(),
            ca_hash: [0xab; 32],
        };
        assert_eq!(t.to_string().parse::<JoinToken>(), Ok(t.clone()));
        assert_eq!(
            JoinToken::parse_credential(&t.credential()),
            Ok((t.id, t.secret))
        );
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        for bad in [
            "",
            "garbage",
            "weft1.abc",
            "weft1.ABC123.0123456789abcdef.00",
            "weft2.abc123.0123456789abcdef.aa",
        ] {
            let e = bad.parse::<JoinToken>().expect_err(bad);
            assert!(e.to_string().contains("join token is malformed"), "{e}");
        }
    }
}
