//! What an unauthenticated peer controls in the handshake: the first frame (decoded with the
//! small hello limit) checked against the pool's token, and the token line a worker reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use offload_ipc::frame::FrameDecoder;
use offload_ipc::handshake::{check_hello, token_from_hex, token_to_hex, HandshakeError};
use offload_ipc::protocol::{ToParent, TOKEN_LEN};

fuzz_target!(|data: &[u8]| {
    let token = [0x5a; TOKEN_LEN];
    let mut decoder = FrameDecoder::new(4096);
    let space = decoder.read_buf();
    let n = space.len().min(data.len());
    space[..n].copy_from_slice(&data[..n]);
    decoder.filled(n);
    if let Ok(Some(ToParent::Hello(hello))) = decoder.next_message::<ToParent>() {
        match check_hello(&hello, &token) {
            // Only the real token may pass.
            Ok(()) => assert_eq!(hello.token, token),
            Err(HandshakeError::WrongToken) => assert_ne!(hello.token, token),
            Err(_) => assert_eq!(hello.token, token),
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(parsed) = token_from_hex(text) {
            assert_eq!(token_from_hex(&token_to_hex(&parsed)), Some(parsed));
        }
    }
});
