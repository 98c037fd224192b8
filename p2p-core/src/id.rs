//! Node identity.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A node's identifier: 16 bytes, shown as 32 lower-case hex digits.
///
/// A node's id derives from its identity's public key ([`crate::identity::node_id_of`]);
/// with a cluster key the secure handshake proves it. The protocol treats it as opaque.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub [u8; 16]);

impl NodeId {
    /// A fresh random id.
    pub fn random() -> Self {
        NodeId(rand::random())
    }

    /// The first 8 hex digits: enough to tell nodes apart in a person's terminal.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(8);
        s
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_32_hex_digits_and_short_is_its_prefix() {
        let id = NodeId([0xab; 16]);
        assert_eq!(id.to_string(), "ab".repeat(16));
        assert_eq!(id.short(), "abababab");
        assert_ne!(NodeId::random(), NodeId::random());
    }
}
