//! WireGuard keys (Curve25519, 32 bytes), shown base64 as `wg` shows them.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A 32-byte WireGuard key (public, or private where the context says so).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(pub [u8; 32]);

/// Why a key could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is not valid base64")]
    Base64,
    #[error("key is not valid hex")]
    Hex,
    #[error("key must be 32 bytes, got {0}")]
    Length(usize),
}

impl Key {
    /// Parses a key from raw bytes (must be exactly 32).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| KeyError::Length(bytes.len()))?;
        Ok(Key(arr))
    }

    /// Base64 form, as `wg` and wg-quick configs use.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// Lower-case hex form, as the WireGuard UAPI uses.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        s
    }

    /// Parses the UAPI hex form.
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        let s = s.trim();
        if s.len() != 64 {
            return Err(if s.bytes().all(|c| c.is_ascii_hexdigit()) {
                KeyError::Length(s.len() / 2)
            } else {
                KeyError::Hex
            });
        }
        let mut out = [0u8; 32];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let hi = hex_val(chunk[0]).ok_or(KeyError::Hex)?;
            let lo = hex_val(chunk[1]).ok_or(KeyError::Hex)?;
            out[i] = (hi << 4) | lo;
        }
        Ok(Key(out))
    }

    /// True for the all-zero key (UAPI's way of saying "no key").
    pub fn is_zero(&self) -> bool {
        self.0 == [0u8; 32]
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl FromStr for Key {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = STANDARD.decode(s.trim()).map_err(|_| KeyError::Base64)?;
        Key::from_slice(&bytes)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.to_base64())
    }
}

impl Serialize for Key {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn base64_and_hex_round_trip(bytes in any::<[u8; 32]>()) {
            let k = Key(bytes);
            prop_assert_eq!(k.to_base64().parse::<Key>().ok(), Some(k));
            prop_assert_eq!(Key::from_hex(&k.to_hex()).ok(), Some(k));
        }
    }

    #[test]
    fn rejects_wrong_length_and_garbage() {
        assert_eq!("AAAA".parse::<Key>(), Err(KeyError::Length(3)));
        assert_eq!("not base64!".parse::<Key>(), Err(KeyError::Base64));
        assert_eq!(Key::from_hex("zz"), Err(KeyError::Hex));
    }
}
