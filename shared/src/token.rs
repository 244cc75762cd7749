//! One-time join tokens: shown once by the agent, stored only as a hash.

use sha2::{Digest, Sha256};

use crate::pki::fill_random;

/// A fresh token: 128 random bits as 8 groups of 4 hex digits, easy to read aloud.
pub fn generate_token() -> String {
    let mut bytes = [0u8; 16];
    fill_random(&mut bytes);
    hex::encode(bytes)
        .as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).expect("hex is ascii"))
        .collect::<Vec<_>>()
        .join("-")
}

/// The hash an agent stores; dashes, spaces and case do not matter.
pub fn token_hash(token: &str) -> [u8; 32] {
    let normalized: String = token
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    Sha256::digest(normalized.as_bytes()).into()
}

/// Compares two hashes in constant time (`subtle`: ring deprecated its own compare as
/// internal, with no promise about side channels).
pub fn hashes_match(a: &[u8; 32], b: &[u8; 32]) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_fresh_and_forgiving_to_type() {
        let a = generate_token();
        assert_eq!(a.len(), 39);
        assert_ne!(a, generate_token());
        let typed = a.replace('-', "").to_uppercase();
        assert!(hashes_match(&token_hash(&a), &token_hash(&typed)));
        assert!(!hashes_match(&token_hash(&a), &token_hash("0000")));
    }
}
