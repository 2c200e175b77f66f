//! Cluster names and cluster IDs: the two things that identify a cluster in the mesh.
//!
//! Must not know about certificates or configuration files; callers turn those into these types.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a cluster name or ID was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The name is empty.
    #[error("cluster name must not be empty")]
    EmptyName,
    /// The name is longer than [`ClusterName::MAX_LEN`].
    #[error("cluster name {name:?} is {len} characters long; at most {max} are allowed", max = ClusterName::MAX_LEN)]
    NameTooLong {
        /// The refused name.
        name: String,
        /// Its length.
        len: usize,
    },
    /// The name is not a DNS-1123 label.
    #[error("cluster name {name:?} is not a DNS-1123 label: {reason}")]
    NameSyntax {
        /// The refused name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The name is reserved.
    #[error("cluster name {name:?} is reserved; pick a name that says which cluster this is")]
    NameReserved {
        /// The refused name.
        name: String,
    },
    /// The ID is outside `1..=MAX`.
    #[error("cluster ID {id} is out of range: must be between {min} and {max}", min = ClusterId::MIN, max = ClusterId::MAX)]
    IdOutOfRange {
        /// The refused ID.
        id: u64,
    },
    /// The ID is not a number.
    #[error("cluster ID {value:?} is not a number")]
    IdSyntax {
        /// The refused text.
        value: String,
    },
}

/// Result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The name of a cluster: a DNS-1123 label of at most 32 characters, never `default`.
///
/// Names appear in etcd keys, certificate identities and label values, which is why they are
/// restricted to lowercase alphanumerics and `-`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClusterName(String);

impl ClusterName {
    /// The longest allowed name.
    pub const MAX_LEN: usize = 32;

    /// Validates `name` and wraps it.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        if name.is_empty() {
            return Err(Error::EmptyName);
        }
        if name.len() > Self::MAX_LEN {
            let len = name.chars().count();
            return Err(Error::NameTooLong { name, len });
        }
        let syntax = |reason| Error::NameSyntax {
            name: name.clone(),
            reason,
        };
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(syntax("only lowercase letters, digits and '-' are allowed"));
        }
        if name.starts_with('-') || name.ends_with('-') {
            return Err(syntax("must start and end with a letter or digit"));
        }
        if name == "default" {
            return Err(Error::NameReserved { name });
        }
        Ok(Self(name))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ClusterName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

impl TryFrom<String> for ClusterName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::new(s)
    }
}

impl From<ClusterName> for String {
    fn from(n: ClusterName) -> String {
        n.0
    }
}

impl AsRef<str> for ClusterName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The numeric ID of a cluster, `1..=4095`, unique in a mesh.
///
/// The ID is the upper part of every identity the cluster allocates (see
/// [`crate::identity::NumericIdentity`]), so two clusters with one ID cannot be connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct ClusterId(u16);

impl ClusterId {
    /// The smallest valid cluster ID. `0` means "not in a mesh" and is never valid here.
    pub const MIN: u16 = 1;
    /// The largest valid cluster ID: 12 bits.
    pub const MAX: u16 = 4095;
    /// The number of bits a cluster ID takes in a [`crate::identity::NumericIdentity`].
    pub const BITS: u32 = 12;

    /// Validates `id` and wraps it.
    pub fn new(id: u64) -> Result<Self> {
        if (u64::from(Self::MIN)..=u64::from(Self::MAX)).contains(&id) {
            // In range, so the cast cannot truncate.
            Ok(Self(id as u16))
        } else {
            Err(Error::IdOutOfRange { id })
        }
    }

    /// The ID as a number.
    pub fn get(self) -> u16 {
        self.0
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for ClusterId {
    type Err = Error;
    /// Canonical decimal only: `1`, never `01`, `+1` or ` 1` (one ID, one spelling — an
    /// identity that can be written two ways can be matched two ways).
    fn from_str(s: &str) -> Result<Self> {
        let canonical = !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_digit())
            && (s == "0" || !s.starts_with('0'));
        if !canonical {
            return Err(Error::IdSyntax {
                value: s.to_owned(),
            });
        }
        let id: u64 = s.parse().map_err(|_| Error::IdSyntax {
            value: s.to_owned(),
        })?;
        Self::new(id)
    }
}

impl TryFrom<u64> for ClusterId {
    type Error = Error;
    fn try_from(id: u64) -> Result<Self> {
        Self::new(id)
    }
}

impl From<ClusterId> for u64 {
    fn from(id: ClusterId) -> u64 {
        u64::from(id.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ids_parse_only_in_canonical_decimal() {
        assert_eq!("1".parse::<ClusterId>().map(ClusterId::get).ok(), Some(1));
        assert_eq!(
            "4095".parse::<ClusterId>().map(ClusterId::get).ok(),
            Some(4095)
        );
        for bad in ["01", "+1", " 1", "1 ", "0x1", "", "-1", "1e3", "0"] {
            assert!(bad.parse::<ClusterId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cluster_names_follow_dns_1123_label_rules() {
        let cases: &[(&str, bool)] = &[
            ("east", true),
            ("us-east-1", true),
            ("a", true),
            ("0cluster", true),
            ("abcdefghijklmnopqrstuvwxyz012345", true), // 32
            ("abcdefghijklmnopqrstuvwxyz0123456", false), // 33
            ("", false),
            ("East", false),
            ("-east", false),
            ("east-", false),
            ("east.west", false),
            ("east_west", false),
            ("ést", false),
            ("default", false),
        ];
        for (name, ok) in cases {
            assert_eq!(ClusterName::new(*name).is_ok(), *ok, "{name:?}");
        }
    }

    #[test]
    fn cluster_name_errors_say_what_is_wrong() {
        let e = ClusterName::new("East").unwrap_err().to_string();
        assert!(e.contains("\"East\"") && e.contains("lowercase"), "{e}");
        let e = ClusterName::new("default").unwrap_err().to_string();
        assert!(e.contains("reserved"), "{e}");
    }

    #[test]
    fn cluster_ids_are_between_1_and_4095() {
        assert!(ClusterId::new(0).is_err());
        assert_eq!(ClusterId::new(1).unwrap().get(), 1);
        assert_eq!(ClusterId::new(1023).unwrap().get(), 1023);
        assert_eq!(ClusterId::new(4095).unwrap().get(), 4095);
        assert!(ClusterId::new(4096).is_err());
        assert!("12x".parse::<ClusterId>().is_err());
        assert_eq!("7".parse::<ClusterId>().unwrap().get(), 7);
    }

    #[test]
    fn names_and_ids_round_trip_through_serde_with_validation() {
        let n: ClusterName = serde_json::from_str("\"west\"").unwrap();
        assert_eq!(n.as_str(), "west");
        assert!(serde_json::from_str::<ClusterName>("\"West\"").is_err());
        assert!(serde_json::from_str::<ClusterId>("0").is_err());
        assert_eq!(
            serde_json::to_string(&ClusterId::new(9).unwrap()).unwrap(),
            "9"
        );
    }
}
