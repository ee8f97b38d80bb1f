//! The handshake rules, shared by both ends so they cannot drift apart.

use crate::protocol::{build_id, Hello, PROTOCOL_VERSION, TOKEN_LEN};

/// Why the parent refused a connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The peer did not present this pool's token: not one of our workers.
    #[error(
        "a process connected to the pool's socket without the pool's token; connection refused"
    )]
    WrongToken,
    /// The worker speaks another protocol version.
    #[error("worker speaks protocol {worker}, the pool speaks {pool}; rebuild the worker program with the same offload version")]
    ProtocolMismatch {
        /// The worker's version.
        worker: u32,
        /// Ours.
        pool: u32,
    },
    /// The worker was built from other code.
    #[error("worker program is `{worker}`, the pool is `{pool}`; rebuild the worker program with the same offload version")]
    BuildMismatch {
        /// The worker's build id.
        worker: String,
        /// Ours.
        pool: String,
    },
}

/// Checks a worker's [`Hello`] against the pool's token. The token comparison takes the same
/// time wherever the first difference is, so the token cannot be guessed byte by byte.
///
/// # Errors
///
/// The first [`HandshakeError`] that applies; a wrong token is checked first, so a stranger
/// learns nothing about the pool's versions.
pub fn check_hello(hello: &Hello, token: &[u8; TOKEN_LEN]) -> Result<(), HandshakeError> {
    let diff = hello
        .token
        .iter()
        .zip(token)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if diff != 0 {
        return Err(HandshakeError::WrongToken);
    }
    if hello.protocol != PROTOCOL_VERSION {
        return Err(HandshakeError::ProtocolMismatch {
            worker: hello.protocol,
            pool: PROTOCOL_VERSION,
        });
    }
    let pool = build_id();
    if hello.build != pool {
        return Err(HandshakeError::BuildMismatch {
            worker: hello.build.clone(),
            pool,
        });
    }
    Ok(())
}

/// A fresh random token from the OS.
///
/// # Errors
///
/// When the OS random source cannot be read.
pub fn new_token() -> std::io::Result<[u8; TOKEN_LEN]> {
    use std::io::Read;
    let mut token = [0; TOKEN_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut token)?;
    Ok(token)
}

/// The token as the hex line a worker reads from its stdin.
pub fn token_to_hex(token: &[u8; TOKEN_LEN]) -> String {
    token.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses [`token_to_hex`]'s output.
pub fn token_from_hex(text: &str) -> Option<[u8; TOKEN_LEN]> {
    let text = text.trim();
    if text.len() != 2 * TOKEN_LEN || !text.is_ascii() {
        return None;
    }
    let mut token = [0; TOKEN_LEN];
    for (i, byte) in token.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(token: [u8; TOKEN_LEN]) -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            build: build_id(),
            token,
            pid: 1,
        }
    }

    #[test]
    fn only_the_right_token_version_and_build_pass() {
        let token = new_token().unwrap();
        assert_eq!(check_hello(&hello(token), &token), Ok(()));
        let mut wrong = token;
        wrong[31] ^= 1;
        assert_eq!(
            check_hello(&hello(wrong), &token),
            Err(HandshakeError::WrongToken)
        );
        let mut old = hello(token);
        old.protocol = 0;
        assert!(matches!(
            check_hello(&old, &token),
            Err(HandshakeError::ProtocolMismatch { worker: 0, .. })
        ));
        let mut other = hello(token);
        other.build = "something else".into();
        let err = check_hello(&other, &token).unwrap_err();
        assert!(
            err.to_string().contains("rebuild the worker program"),
            "{err}"
        );
    }

    #[test]
    fn tokens_are_random_and_survive_hex() {
        let a = new_token().unwrap();
        assert_ne!(a, new_token().unwrap());
        assert_eq!(token_from_hex(&token_to_hex(&a)), Some(a));
        assert_eq!(token_from_hex("zz"), None);
        assert_eq!(token_from_hex(&"é".repeat(32)), None);
    }
}
