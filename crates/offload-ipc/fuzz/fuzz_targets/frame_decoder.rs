//! The frame decoder on arbitrary bytes, split at arbitrary points: it must never panic,
//! never hand out a frame over its limit, and never buffer much more than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use offload_ipc::frame::FrameDecoder;
use offload_ipc::protocol::{ToParent, ToWorker};

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    // The first byte picks how the stream is cut into reads.
    let Some((&cut, mut rest)) = data.split_first() else { return };
    let step = usize::from(cut % 61) + 1;
    let mut decoder = FrameDecoder::new(MAX);
    while !rest.is_empty() {
        let space = decoder.read_buf();
        let n = space.len().min(step).min(rest.len());
        space[..n].copy_from_slice(&rest[..n]);
        decoder.filled(n);
        rest = &rest[n..];
        loop {
            // Alternate message types so both decoders see every frame shape.
            let decoded = if cut % 2 == 0 {
                decoder.next_message::<ToWorker>().map(|m| m.is_some())
            } else {
                decoder.next_message::<ToParent>().map(|m| m.is_some())
            };
            match decoded {
                Ok(true) => continue,
                Ok(false) => break,
                Err(_) => return, // the connection would be closed here
            }
        }
    }
    let _ = decoder.finish();
});
