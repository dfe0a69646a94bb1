#![allow(clippy::unwrap_used)]

use std::io::{Cursor, Read, Write};
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::vstate::memory::create_guest_memory;

/// Reads from a fixed buffer, writes into a shared one.
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
        self.output.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn writer(key: Option<Key>) -> (Channel, Arc<Mutex<Vec<u8>>>) {
    let out = Arc::new(Mutex::new(Vec::new()));
    let pipe = Pipe {
        input: Cursor::new(Vec::new()),
        output: out.clone(),
    };
    (Channel::new(Box::new(pipe), key), out)
}

fn reader(bytes: Vec<u8>, key: Option<Key>) -> Channel {
    let pipe = Pipe {
        input: Cursor::new(bytes),
        output: Arc::new(Mutex::new(Vec::new())),
    };
    Channel::new(Box::new(pipe), key)
}

/// The bytes of `msgs` as a sender with `key` writes them.
fn stream(key: Option<Key>, msgs: &[(Kind, &[u8])]) -> Vec<u8> {
    let (mut ch, out) = writer(key);
    for (kind, payload) in msgs {
        ch.send(*kind, &[payload]).unwrap();
    }
    out.lock().unwrap().clone()
}

#[test]
fn messages_go_through_with_and_without_a_key() {
    for key in [None, Some([7u8; 32])] {
        let bytes = stream(key, &[(Kind::Hello, b"{}"), (Kind::Ready, b"")]);
        let mut ch = reader(bytes, key);
        let mut buf = Vec::new();
        assert_eq!(ch.recv(&mut buf).unwrap(), Kind::Hello);
        assert_eq!(buf, b"{}");
        assert_eq!(ch.recv(&mut buf).unwrap(), Kind::Ready);
        assert!(buf.is_empty());
    }
}

#[test]
fn every_changed_byte_is_refused() {
    let key = Some([3u8; 32]);
    let bytes = stream(key, &[(Kind::Abort, b"reason")]);
    for i in 0..bytes.len() {
        for bit in [0x01, 0x80] {
            let mut b = bytes.clone();
            b[i] ^= bit;
            let r = reader(b, key).recv(&mut Vec::new());
            assert!(
                !matches!(r, Err(ProtocolError::Aborted(_))),
                "byte {i} bit {bit:#x} changed and the message was taken"
            );
        }
    }
    // Unchanged, it is the abort it says.
    assert!(matches!(
        reader(bytes, key).recv(&mut Vec::new()),
        Err(ProtocolError::Aborted(r)) if r == "reason"
    ));
}

#[test]
fn another_key_or_none_is_refused_at_the_first_message() {
    let bytes = stream(Some([1u8; 32]), &[(Kind::Hello, b"{}")]);
    assert!(matches!(
        reader(bytes.clone(), Some([2u8; 32])).recv(&mut Vec::new()),
        Err(ProtocolError::Tag)
    ));
    assert!(matches!(
        reader(bytes, None).recv(&mut Vec::new()),
        Err(ProtocolError::KeyMismatch(true))
    ));
    let bytes = stream(None, &[(Kind::Hello, b"{}")]);
    assert!(matches!(
        reader(bytes, Some([2u8; 32])).recv(&mut Vec::new()),
        Err(ProtocolError::KeyMismatch(false))
    ));
}

#[test]
fn replayed_or_dropped_messages_are_refused() {
    let key = Some([5u8; 32]);
    let one = stream(key, &[(Kind::Ready, b"")]);
    let mut twice = one.clone();
    twice.extend_from_slice(&one);
    let mut ch = reader(twice, key);
    ch.recv(&mut Vec::new()).unwrap();
    assert!(matches!(
        ch.recv(&mut Vec::new()),
        Err(ProtocolError::Sequence {
            expected: 1,
            found: 0
        })
    ));
    // The second of two messages alone: the first was dropped.
    let two = stream(key, &[(Kind::Ready, b""), (Kind::Go, b"")]);
    let second = two[HEADER_LEN + TAG_LEN..].to_vec();
    assert!(matches!(
        reader(second, key).recv(&mut Vec::new()),
        Err(ProtocolError::Sequence { .. })
    ));
}

#[test]
fn a_length_over_the_cap_is_refused_before_the_payload_is_read() {
    let mut bytes = stream(None, &[(Kind::Ready, b"")]);
    bytes[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut buf = Vec::new();
    assert!(matches!(
        reader(bytes, None).recv(&mut buf),
        Err(ProtocolError::TooLarge {
            kind: Kind::Ready,
            ..
        })
    ));
    assert!(buf.capacity() < 1 << 20, "the claimed length was allocated");
    // A sender cannot make one either.
    let (mut ch, _) = writer(None);
    assert!(ch.send(Kind::Ready, &[b"x"]).is_err());
}

fn batch(addrs: &[u64], fill: u8) -> Vec<u8> {
    let mut p = (addrs.len() as u32).to_le_bytes().to_vec();
    for a in addrs {
        p.extend_from_slice(&a.to_le_bytes());
    }
    p.extend(std::iter::repeat_n(fill, addrs.len() * PAGE));
    p
}

#[test]
fn pages_land_where_they_say_and_bad_batches_write_nothing() {
    let mem = create_guest_memory(1).unwrap();
    assert_eq!(
        apply_pages(&mem, &batch(&[0x1000, 0x3000], 0xab)).unwrap(),
        2
    );
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0xab);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3fff)).unwrap(), 0xab);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 0);

    let bad = [
        batch(&[0x2000, 0x1001], 0xcd),           // unaligned
        batch(&[0x2000, 1 << 20], 0xcd),          // past the end
        batch(&[0x2000, u64::MAX - 0xfff], 0xcd), // wraps
        batch(&[0x2000], 0xcd)[..100].to_vec(),   // short
        {
            let mut b = batch(&[0x2000], 0xcd);
            b[..4].copy_from_slice(&((MAX_BATCH + 1) as u32).to_le_bytes());
            b
        },
        Vec::new(),
    ];
    for b in &bad {
        assert!(apply_pages(&mem, b).is_err());
        // The good page of the batch was not written either.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 0);
    }
}
