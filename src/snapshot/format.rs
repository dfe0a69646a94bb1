//! The state file: a fixed header, then the state as JSON.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "KILNSNAP"
//!      8     4  format version (little endian)
//!     12     4  flags: bit 0 = the digest is a keyed MAC
//!     16     8  payload length in bytes (little endian)
//!     24    32  BLAKE3 of bytes 0..24 followed by the payload (keyed BLAKE3 with a key)
//!     56     -  payload
//! ```
//!
//! The length, the size cap and the digest are checked **before** a byte of the payload is
//! parsed; with a key, a file made without it (or with another key, or changed in any way)
//! is refused as well.

/// The first bytes of every kiln state file.
pub const MAGIC: [u8; 8] = *b"KILNSNAP";
/// The format this kiln writes and reads (2: the memory digest is over 2 MiB chunks).
pub const VERSION: u32 = 2;
/// Header length.
pub const HEADER_LEN: usize = 56;
/// Largest payload accepted (a state is tens of KiB per vCPU).
pub const MAX_PAYLOAD: u64 = 16 << 20;
const FLAG_KEYED: u32 = 1;

/// A 32-byte key for the keyed MAC.
pub type Key = [u8; 32];

/// Why a state file is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// Shorter than a header.
    #[error("the file is too short to be a kiln snapshot ({0} bytes)")]
    Short(usize),
    /// Not a kiln state file.
    #[error("not a kiln snapshot state file (bad magic)")]
    Magic,
    /// Another format version.
    #[error("snapshot format version {found}, this kiln reads version {VERSION}")]
    Version {
        /// In the file.
        found: u32,
    },
    /// Unknown flag bits.
    #[error("unknown snapshot flags {0:#x}")]
    Flags(u32),
    /// Bigger than the cap.
    #[error("snapshot state of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u64),
    /// The length in the header is not the payload's.
    #[error("snapshot state is truncated or has trailing bytes ({found} bytes for {expected})")]
    Length {
        /// From the header.
        expected: u64,
        /// In the file.
        found: u64,
    },
    /// The file was made with a key and none is given.
    #[error("the snapshot is authenticated with a key: start kiln with --snapshot-key-file")]
    KeyNeeded,
    /// A key is given and the file was made without one.
    #[error("the snapshot is not authenticated, and kiln was started with a snapshot key")]
    NotKeyed,
    /// The digest does not match.
    #[error("the snapshot state does not match its checksum (corrupted or tampered with)")]
    Digest,
}

fn digest(header: &[u8], payload: &[u8], key: Option<&Key>) -> [u8; 32] {
    let mut h = match key {
        Some(k) => blake3::Hasher::new_keyed(k),
        None => blake3::Hasher::new(),
    };
    h.update(header);
    h.update(payload);
    *h.finalize().as_bytes()
}

/// Wraps `payload` in a header and its digest.
pub fn encode(payload: &[u8], key: Option<&Key>) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    let flags = if key.is_some() { FLAG_KEYED } else { 0 };
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let d = digest(&out[..24], payload, key);
    out.extend_from_slice(&d);
    out.extend_from_slice(payload);
    out
}

/// Checks the header and the digest of `file` and returns the payload.
pub fn decode<'a>(file: &'a [u8], key: Option<&Key>) -> Result<&'a [u8], FormatError> {
    if file.len() < HEADER_LEN {
        return Err(FormatError::Short(file.len()));
    }
    let (header, payload) = file.split_at(HEADER_LEN);
    if header[..8] != MAGIC {
        return Err(FormatError::Magic);
    }
    let word = |r: std::ops::Range<usize>| -> [u8; 4] {
        let mut b = [0u8; 4];
        b.copy_from_slice(&header[r]);
        b
    };
    let version = u32::from_le_bytes(word(8..12));
    if version != VERSION {
        return Err(FormatError::Version { found: version });
    }
    let flags = u32::from_le_bytes(word(12..16));
    if flags & !FLAG_KEYED != 0 {
        return Err(FormatError::Flags(flags));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[16..24]);
    let expected = u64::from_le_bytes(len);
    if expected > MAX_PAYLOAD {
        return Err(FormatError::TooLarge(expected));
    }
    if expected != payload.len() as u64 {
        return Err(FormatError::Length {
            expected,
            found: payload.len() as u64,
        });
    }
    match (flags & FLAG_KEYED != 0, key) {
        (true, None) => return Err(FormatError::KeyNeeded),
        (false, Some(_)) => return Err(FormatError::NotKeyed),
        _ => {}
    }
    let want = blake3::Hash::from(digest(&header[..24], payload, key));
    let mut got = [0u8; 32];
    got.copy_from_slice(&header[24..56]);
    // blake3::Hash compares in constant time.
    if want != blake3::Hash::from(got) {
        return Err(FormatError::Digest);
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_and_without_a_key() {
        let key = [7u8; 32];
        for k in [None, Some(&key)] {
            let file = encode(b"{\"a\":1}", k);
            assert_eq!(decode(&file, k).unwrap(), b"{\"a\":1}");
        }
    }

    #[test]
    fn every_single_bit_flip_is_refused() {
        let key = [9u8; 32];
        for k in [None, Some(&key)] {
            let file = encode(b"{\"drive\":\"/srv/a.img\"}", k);
            for i in 0..file.len() {
                for bit in 0..8 {
                    let mut bad = file.clone();
                    bad[i] ^= 1 << bit;
                    assert!(decode(&bad, k).is_err(), "byte {i} bit {bit} accepted");
                }
            }
        }
    }

    #[test]
    fn truncation_length_version_and_keys() {
        let key = [1u8; 32];
        let file = encode(b"payload", None);
        for n in 0..file.len() {
            assert!(decode(&file[..n], None).is_err(), "{n} bytes accepted");
        }
        let mut longer = file.clone();
        longer.push(0);
        assert!(matches!(
            decode(&longer, None),
            Err(FormatError::Length { .. })
        ));
        for other in [1u8, 3] {
            let mut v = file.clone();
            v[8] = other;
            assert_eq!(
                decode(&v, None),
                Err(FormatError::Version {
                    found: u32::from(other)
                })
            );
        }
        assert_eq!(decode(&file, Some(&key)), Err(FormatError::NotKeyed));
        let keyed = encode(b"payload", Some(&key));
        assert_eq!(decode(&keyed, None), Err(FormatError::KeyNeeded));
        assert_eq!(decode(&keyed, Some(&[2u8; 32])), Err(FormatError::Digest));
        // A forged file that re-computes the plain digest but keeps the keyed flag.
        let mut forged = keyed.clone();
        let d = digest(&forged[..24], b"payload", None);
        forged[24..56].copy_from_slice(&d);
        assert_eq!(decode(&forged, Some(&key)), Err(FormatError::Digest));
        let mut huge = file.clone();
        huge[16..24].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(decode(&huge, None), Err(FormatError::TooLarge(_))));
    }
}
