//! The receiving side of a live migration's stream: the bytes a source (or anyone who can
//! reach the destination's socket) sends, through the message framing, the MAC, the size
//! caps, `Hello`, the page batches and the state, into fresh guest memory.
//!
//! The first input byte picks the mode. Bit 0 clear: the rest is the raw stream (the
//! header, sequence and MAC checks face the fuzzer). Bit 0 set: the rest is a list of
//! messages `[kind u8][len u16 LE][payload]` the harness frames and seals itself, so the
//! parsers behind the MAC face it. Bit 1: the destination has no key (else both use the
//! harness's key).
//!
//! Invariants: nothing panics; a raw stream never passes the MAC under the key unless it is
//! a sealed stream's bytes (the fuzzer cannot forge a keyed BLAKE3); whatever is accepted
//! has memory of exactly the layout `Hello` announced and a state that passes validation;
//! the destination answers `Sync` with `Synced` and writes nothing else.

use std::io::{Cursor, Read, Write};
use std::sync::{Arc, Mutex};

use kiln::migration::protocol::{Channel, Kind, ProtocolError};
use kiln::migration::receive::receive_on;
use kiln::snapshot::{memory::layout, validate};

const KEY: [u8; 32] = [0x5a; 32];

struct Pipe {
    input: Cursor<Vec<u8>>,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn kind_of(b: u8) -> Kind {
    match b % 9 {
        0 => Kind::Hello,
        1 => Kind::Pages,
        2 => Kind::State,
        3 => Kind::Resumed,
        4 => Kind::Abort,
        5 => Kind::Ready,
        6 => Kind::Go,
        7 => Kind::Sync,
        _ => Kind::Synced,
    }
}

/// Frames and seals the messages in `rest` as a keyed source would.
fn seal(rest: &[u8], key: Option<[u8; 32]>) -> (Vec<u8>, usize) {
    let out = Arc::new(Mutex::new(Vec::new()));
    let pipe = Pipe {
        input: Cursor::new(Vec::new()),
        output: out.clone(),
    };
    let mut ch = Channel::new(Box::new(pipe), key);
    let mut syncs = 0;
    let mut r = rest;
    while r.len() >= 3 {
        let kind = kind_of(r[0]);
        let len = usize::from(u16::from_le_bytes([r[1], r[2]])).min(r.len() - 3);
        let payload = &r[3..3 + len];
        r = &r[3 + len..];
        if ch.send(kind, &[payload]).is_ok() && kind == Kind::Sync {
            syncs += 1;
        }
    }
    let bytes = out
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    (bytes, syncs)
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let sealed = mode & 1 != 0;
    let key = (mode & 2 == 0).then_some(KEY);
    let (stream, max_syncs) = if sealed {
        seal(rest, key)
    } else {
        (rest.to_vec(), usize::MAX)
    };
    let answers = Arc::new(Mutex::new(Vec::new()));
    let pipe = Pipe {
        input: Cursor::new(stream),
        output: answers.clone(),
    };
    let mut ch = Channel::new(Box::new(pipe), key);
    let result = receive_on(&mut ch, key.as_ref());
    if let Ok((state, memory, _)) = &result {
        assert!(
            sealed || key.is_none(),
            "a raw stream passed the keyed MAC"
        );
        assert_eq!(state.memory, layout(memory), "memory is not the announced layout");
        assert!(validate(state).is_ok(), "an accepted state fails validation");
    }
    if let Err(kiln::migration::MigrationError::Protocol(ProtocolError::Io(e))) = &result {
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    }
    // The destination's only answers: one `Synced` (empty payload) per `Sync` it took.
    let answers = answers
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let one = 16 + 32;
    assert_eq!(answers.len() % one, 0, "a partial answer");
    let count = answers.len() / one;
    assert!(count <= max_syncs, "{count} answers for {max_syncs} Syncs");
    for m in answers.chunks(one) {
        assert_eq!(m[6], Kind::Synced as u8, "an answer other than Synced");
    }
}
