//! The migration stream: versioned, length-prefixed messages, each authenticated.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "KLNM"
//!      4     2  protocol version (little endian)
//!      6     1  kind (Message)
//!      7     1  flags: bit 0 = the tag is a keyed MAC
//!      8     4  sequence number: 0 for the first message each way, then +1
//!     12     4  payload length (little endian), at most the kind's cap
//!     16     -  payload
//!      -    32  tag: BLAKE3 (keyed BLAKE3 with the snapshot key) of the header and payload
//! ```
//!
//! Everything in the header is checked before the payload is read, and the tag before a
//! byte of the payload is parsed: with a key, a stream without it, a message changed in any
//! way, replayed, dropped or reordered (the sequence number is in the tag) is refused at the
//! first such message. Without a key the tag still catches corruption. The stream carries
//! no secrecy of its own: confidentiality between hosts is the transport's (a tunnel the
//! operator chooses); a Unix socket is the local case.

use std::io::{Read, Write};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::snapshot::Key;
use crate::vstate::memory::GuestMemory;

/// The first bytes of every message.
pub const MAGIC: [u8; 4] = *b"KLNM";
/// The protocol this kiln speaks.
pub const VERSION: u16 = 1;
/// Header length.
pub const HEADER_LEN: usize = 16;
/// Tag length.
pub const TAG_LEN: usize = 32;
/// Guest page size.
pub const PAGE: usize = 4096;
/// Most pages in one `Pages` message (2 MiB of data).
pub const MAX_BATCH: usize = 512;
const FLAG_KEYED: u8 = 1;

/// What a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source → destination, first: the memory layout (JSON [`Hello`]).
    Hello = 1,
    /// Source → destination: guest pages (a count, the addresses, the data).
    Pages = 2,
    /// Source → destination: the paused VM's whole state (a snapshot state file's bytes).
    State = 3,
    /// Destination → source: the VM runs here now.
    Resumed = 4,
    /// Either way: the migration is abandoned (UTF-8 reason).
    Abort = 5,
    /// Destination → source: the state is checked and this host can run it; waiting for
    /// `Go`. Until the source has it, the source can resume the guest.
    Ready = 6,
    /// Source → destination, last: the TAPs and drives are released; take them, build the
    /// VM and resume it.
    Go = 7,
    /// Source → destination: the end of a pre-copy round; answer `Synced` once every page
    /// before it is in (the source paces its rounds by what arrived, not by what its
    /// socket buffered).
    Sync = 8,
    /// Destination → source: the answer to `Sync`.
    Synced = 9,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Pages,
            3 => Kind::State,
            4 => Kind::Resumed,
            5 => Kind::Abort,
            6 => Kind::Ready,
            7 => Kind::Go,
            8 => Kind::Sync,
            9 => Kind::Synced,
            _ => return None,
        })
    }

    /// The largest payload this kind may carry.
    pub fn cap(self) -> usize {
        match self {
            Kind::Hello => 64 << 10,
            Kind::Pages => 4 + MAX_BATCH * (8 + PAGE),
            Kind::State => {
                (crate::snapshot::format::MAX_PAYLOAD as usize)
                    + crate::snapshot::format::HEADER_LEN
            }
            Kind::Resumed | Kind::Ready | Kind::Go | Kind::Sync | Kind::Synced => 0,
            Kind::Abort => 4096,
        }
    }
}

/// The destination's first view of the VM: enough to reserve its memory.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// kiln's version on the source.
    pub kiln_version: String,
    /// Guest memory regions: (guest physical start, length in bytes).
    pub regions: Vec<(u64, u64)>,
}

/// Why the stream is refused or broke.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The connection failed or closed.
    #[error("the connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// Not a kiln migration stream.
    #[error("not a kiln migration stream (bad magic)")]
    Magic,
    /// Another protocol version.
    #[error("migration protocol version {found}, this kiln speaks version {VERSION}")]
    Version {
        /// In the message.
        found: u16,
    },
    /// Unknown message kind.
    #[error("unknown migration message kind {0}")]
    Kind(u8),
    /// The MAC flag does not match this end's key.
    #[error("the stream is {}: both ends need the same --snapshot-key-file", if *.0 { "authenticated with a key and this kiln has none" } else { "not authenticated and this kiln has a key" })]
    KeyMismatch(bool),
    /// Out of order, replayed or dropped.
    #[error("migration message {found} where {expected} was expected")]
    Sequence {
        /// Expected.
        expected: u32,
        /// Found.
        found: u32,
    },
    /// Larger than its kind allows.
    #[error("a migration message of kind {kind:?} with {len} bytes (at most {})", kind.cap())]
    TooLarge {
        /// The kind.
        kind: Kind,
        /// Its length.
        len: usize,
    },
    /// The tag does not match.
    #[error("a migration message does not match its MAC (corrupted or forged)")]
    Tag,
    /// A message that is not the one this phase needs.
    #[error("unexpected migration message {found:?} (wanted {wanted})")]
    Unexpected {
        /// What came.
        found: Kind,
        /// What was wanted.
        wanted: &'static str,
    },
    /// A payload that does not parse or is out of bounds.
    #[error("invalid migration message: {0}")]
    Invalid(String),
    /// The other end gave up.
    #[error("the other end aborted the migration: {0}")]
    Aborted(String),
}

/// A bidirectional byte stream (Unix or TCP socket).
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// One end of a migration stream.
pub struct Channel {
    stream: Box<dyn Stream>,
    key: Option<Key>,
    send_seq: u32,
    recv_seq: u32,
    bytes_sent: u64,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("keyed", &self.key.is_some())
            .field("send_seq", &self.send_seq)
            .field("recv_seq", &self.recv_seq)
            .finish_non_exhaustive()
    }
}

fn tag(key: Option<&Key>, header: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut h = match key {
        Some(k) => blake3::Hasher::new_keyed(k),
        None => blake3::Hasher::new(),
    };
    h.update(header);
    for p in parts {
        h.update(p);
    }
    *h.finalize().as_bytes()
}

impl Channel {
    /// Wraps a connected stream; `key` authenticates every message both ways.
    pub fn new(stream: Box<dyn Stream>, key: Option<Key>) -> Self {
        Channel {
            stream,
            key,
            send_seq: 0,
            recv_seq: 0,
            bytes_sent: 0,
        }
    }

    /// Bytes written so far (headers and tags included).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    fn header(&self, kind: Kind, len: usize, seq: u32) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&VERSION.to_le_bytes());
        h[6] = kind as u8;
        h[7] = if self.key.is_some() { FLAG_KEYED } else { 0 };
        h[8..12].copy_from_slice(&seq.to_le_bytes());
        h[12..16].copy_from_slice(&(len as u32).to_le_bytes());
        h
    }

    /// Sends one message whose payload is `parts` concatenated.
    pub fn send(&mut self, kind: Kind, parts: &[&[u8]]) -> Result<(), ProtocolError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > kind.cap() {
            return Err(ProtocolError::TooLarge { kind, len });
        }
        let header = self.header(kind, len, self.send_seq);
        let t = tag(self.key.as_ref(), &header, parts);
        self.stream.write_all(&header)?;
        for p in parts {
            self.stream.write_all(p)?;
        }
        self.stream.write_all(&t)?;
        self.stream.flush()?;
        self.send_seq = self.send_seq.wrapping_add(1);
        self.bytes_sent += (HEADER_LEN + len + TAG_LEN) as u64;
        Ok(())
    }

    /// Receives one message that must be `want` (an empty payload for `Ready`, `Go`, ...).
    pub fn expect(&mut self, want: Kind, name: &'static str) -> Result<(), ProtocolError> {
        let mut buf = Vec::new();
        let kind = self.recv(&mut buf)?;
        if kind != want {
            return Err(ProtocolError::Unexpected {
                found: kind,
                wanted: name,
            });
        }
        Ok(())
    }

    /// Receives one message into `buf` (its payload), checked in full before it is
    /// returned: header, size cap, sequence, tag. An `Abort` becomes an error.
    pub fn recv(&mut self, buf: &mut Vec<u8>) -> Result<Kind, ProtocolError> {
        let mut header = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut header)?;
        if header[..4] != MAGIC {
            return Err(ProtocolError::Magic);
        }
        let version = u16::from_le_bytes([header[4], header[5]]);
        if version != VERSION {
            return Err(ProtocolError::Version { found: version });
        }
        let kind = Kind::from_u8(header[6]).ok_or(ProtocolError::Kind(header[6]))?;
        let keyed = header[7] & FLAG_KEYED != 0;
        if header[7] & !FLAG_KEYED != 0 {
            return Err(ProtocolError::Invalid(format!("flags {:#x}", header[7])));
        }
        if keyed != self.key.is_some() {
            return Err(ProtocolError::KeyMismatch(keyed));
        }
        let seq = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        if seq != self.recv_seq {
            return Err(ProtocolError::Sequence {
                expected: self.recv_seq,
                found: seq,
            });
        }
        let len = u32::from_le_bytes([header[12], header[13], header[14], header[15]]) as usize;
        if len > kind.cap() {
            return Err(ProtocolError::TooLarge { kind, len });
        }
        buf.clear();
        buf.resize(len, 0);
        self.stream.read_exact(buf)?;
        let mut got = [0u8; TAG_LEN];
        self.stream.read_exact(&mut got)?;
        let want = tag(self.key.as_ref(), &header, &[buf]);
        // Constant time: blake3's Hash comparison.
        if blake3::Hash::from(got) != blake3::Hash::from(want) {
            return Err(ProtocolError::Tag);
        }
        self.recv_seq = self.recv_seq.wrapping_add(1);
        if kind == Kind::Abort {
            return Err(ProtocolError::Aborted(
                String::from_utf8_lossy(buf).into_owned(),
            ));
        }
        Ok(kind)
    }

    /// Sends `Abort` with `reason`, ignoring a connection that is already gone.
    pub fn abort(&mut self, reason: &str) {
        let reason = &reason.as_bytes()[..reason.len().min(Kind::Abort.cap())];
        let _ = self.send(Kind::Abort, &[reason]);
    }
}

/// Writes a `Pages` payload into `memory`: every address page-aligned and the whole page
/// inside guest RAM, checked before anything is written. Returns the number of pages.
pub fn apply_pages(memory: &GuestMemory, payload: &[u8]) -> Result<usize, ProtocolError> {
    let invalid = |m: String| ProtocolError::Invalid(m);
    let count = payload
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| invalid("a page batch without its count".into()))?;
    if count > MAX_BATCH {
        return Err(invalid(format!(
            "{count} pages in one batch (at most {MAX_BATCH})"
        )));
    }
    let addrs_end = 4 + count * 8;
    if payload.len() != addrs_end + count * PAGE {
        return Err(invalid(format!(
            "a batch of {count} pages has {} bytes",
            payload.len()
        )));
    }
    let addr = |i: usize| {
        let b = &payload[4 + i * 8..12 + i * 8];
        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    };
    for i in 0..count {
        let a = addr(i);
        if a % PAGE as u64 != 0 || !page_in_memory(memory, a) {
            return Err(invalid(format!("page address {a:#x} is not a guest page")));
        }
    }
    for i in 0..count {
        let data = &payload[addrs_end + i * PAGE..addrs_end + (i + 1) * PAGE];
        memory
            .write_slice(data, GuestAddress(addr(i)))
            .map_err(|e| invalid(e.to_string()))?;
    }
    Ok(count)
}

fn page_in_memory(memory: &GuestMemory, addr: u64) -> bool {
    memory
        .to_region_addr(GuestAddress(addr))
        .is_some_and(|(region, offset)| {
            use vm_memory::GuestMemoryRegion;
            offset
                .raw_value()
                .checked_add(PAGE as u64)
                .is_some_and(|end| end <= region.len())
        })
}

#[cfg(test)]
mod tests;
