//! The keyed digest of a memory file, in 2 MiB chunks so that a Diff snapshot re-hashes only
//! the chunks it changed (its cost follows the dirty pages, not the guest's size).
//!
//! A chunk's digest is the keyed BLAKE3 of a domain tag, the chunk's index and either a zero
//! marker (the chunk is all zero: nothing to read, a hole in the file) or its bytes. The
//! memory's digest, kept in the authenticated state file, is the keyed BLAKE3 of the chunk
//! count and every chunk digest in order. Both sides decide "all zero" from the content alone,
//! so the writer (hashing guest memory) and the reader (hashing the file, skipping holes) agree.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::format::Key;

/// Bytes per chunk (the last chunk of a region may be shorter).
pub const CHUNK: u64 = 2 << 20;

/// One digest per chunk of the memory file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryDigest {
    chunks: Vec<[u8; 32]>,
}

/// The digest of chunk `index` holding `data` (`None`: known to be all zero).
pub fn chunk_digest(key: &Key, index: u64, data: Option<&[u8]>) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(b"kiln memory chunk\0");
    h.update(&index.to_le_bytes());
    match data.filter(|d| d.iter().any(|b| *b != 0)) {
        None => h.update(&[0]),
        Some(d) => {
            h.update(&[1]);
            h.update(&(d.len() as u64).to_le_bytes());
            h.update(d)
        }
    };
    *h.finalize().as_bytes()
}

impl MemoryDigest {
    /// Digests for `len` bytes of memory, every chunk all zero.
    pub fn zeroed(key: &Key, len: u64) -> MemoryDigest {
        MemoryDigest {
            chunks: (0..len.div_ceil(CHUNK))
                .map(|i| chunk_digest(key, i, None))
                .collect(),
        }
    }

    /// Replaces the digest of chunk `index` (ignored past the end).
    pub fn set(&mut self, index: u64, digest: [u8; 32]) {
        if let Some(c) = usize::try_from(index)
            .ok()
            .and_then(|i| self.chunks.get_mut(i))
        {
            *c = digest;
        }
    }

    /// The digest of the whole memory.
    pub fn total(&self, key: &Key) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(key);
        h.update(b"kiln memory\0");
        h.update(&(self.chunks.len() as u64).to_le_bytes());
        for c in &self.chunks {
            h.update(c);
        }
        *h.finalize().as_bytes()
    }

    /// The digests of the first `len` bytes of `file`; holes (found with SEEK_DATA) are not
    /// read.
    pub fn of_file(file: &File, len: u64, key: &Key) -> io::Result<MemoryDigest> {
        let mut digest = MemoryDigest::zeroed(key, len);
        let mut buf = vec![0u8; CHUNK as usize];
        let mut off = 0u64;
        while off < len {
            let data = match next_data(file, off)? {
                Some(d) if d < len => d,
                _ => break,
            };
            let index = data / CHUNK;
            let start = index * CHUNK;
            let n = (len - start).min(CHUNK) as usize;
            file.read_exact_at(&mut buf[..n], start)?;
            digest.set(index, chunk_digest(key, index, Some(&buf[..n])));
            off = start + n as u64;
        }
        Ok(digest)
    }
}

/// The first offset at or after `off` holding data (`None`: only a hole follows).
fn next_data(file: &File, off: u64) -> io::Result<Option<u64>> {
    let Ok(at) = libc::off_t::try_from(off) else {
        return Ok(None);
    };
    // SAFETY: lseek on a file descriptor `file` owns; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), at, libc::SEEK_DATA) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            // A file system without SEEK_DATA: read everything.
            Some(libc::EINVAL) => Ok(Some(off)),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: Key = [7; 32];

    #[test]
    fn a_zero_chunk_hashes_the_same_read_or_not() {
        let zeros = vec![0u8; CHUNK as usize];
        assert_eq!(
            chunk_digest(&KEY, 3, Some(&zeros)),
            chunk_digest(&KEY, 3, None)
        );
        let mut one = zeros.clone();
        one[17] = 1;
        assert_ne!(
            chunk_digest(&KEY, 3, Some(&one)),
            chunk_digest(&KEY, 3, None)
        );
        // The index is bound: the same bytes elsewhere are another digest.
        assert_ne!(
            chunk_digest(&KEY, 3, Some(&one)),
            chunk_digest(&KEY, 4, Some(&one))
        );
        // So is the key.
        assert_ne!(
            chunk_digest(&KEY, 3, Some(&one)),
            chunk_digest(&[8; 32], 3, Some(&one))
        );
    }

    #[test]
    fn a_sparse_file_digests_as_its_bytes() {
        let path = std::env::temp_dir().join(format!("kiln-digest-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let len = 5 * CHUNK + 4096;
        file.set_len(len).unwrap();
        file.write_all_at(b"abc", 2 * CHUNK + 100).unwrap();
        file.write_all_at(b"z", len - 1).unwrap();
        let got = MemoryDigest::of_file(&file, len, &KEY).unwrap();
        // The oracle: every chunk read in full, by hand.
        let mut want = MemoryDigest::zeroed(&KEY, len);
        for i in 0..len.div_ceil(CHUNK) {
            let n = (len - i * CHUNK).min(CHUNK) as usize;
            let mut buf = vec![0u8; n];
            file.read_exact_at(&mut buf, i * CHUNK).unwrap();
            want.set(i, chunk_digest(&KEY, i, Some(&buf)));
        }
        assert_eq!(got, want);
        assert_eq!(got.total(&KEY), want.total(&KEY));
        assert_ne!(got.total(&KEY), MemoryDigest::zeroed(&KEY, len).total(&KEY));
        // A flipped byte anywhere changes the total.
        file.write_all_at(b"abd", 2 * CHUNK + 100).unwrap();
        let flipped = MemoryDigest::of_file(&file, len, &KEY).unwrap();
        assert_ne!(flipped.total(&KEY), got.total(&KEY));
        std::fs::remove_file(&path).unwrap();
    }
}
