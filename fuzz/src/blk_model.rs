//! An independent model of a virtio block device (virtio 1.2, 5.2.6 "Device Operation"),
//! written from the specification, not from kiln's code: the image is a byte array, and each
//! request a chain carries is predicted from the chain's bytes alone.
//!
//! A request (5.2.6) is `le32 type; le32 reserved; le64 sector; u8 data[]; u8 status`. The
//! device may not rely on how the driver splits it into descriptors (2.6.4 "Message
//! Framing"): the header is the first 16 device-readable bytes, the status the chain's last
//! byte, which must be device-writable, and the driver puts every device-writable element
//! after every device-readable one (2.7.4.2). Then:
//! - `VIRTIO_BLK_T_IN` (0): the device-writable bytes before the status receive the image's
//!   bytes from `sector * 512`; `VIRTIO_BLK_T_OUT` (1): the device-readable bytes after the
//!   header land in the image at `sector * 512`, exactly those bytes, nowhere else;
//! - data not a multiple of 512 bytes, a range past the capacity, data in the wrong direction,
//!   a header shorter than 16 device-readable bytes: `VIRTIO_BLK_S_IOERR`, nothing written;
//! - a write when `VIRTIO_BLK_F_RO` is offered: `VIRTIO_BLK_S_IOERR` and no data written
//!   (5.2.6.2, a MUST);
//! - `VIRTIO_BLK_T_FLUSH` (4) with `VIRTIO_BLK_F_FLUSH` negotiated: `VIRTIO_BLK_S_OK`;
//!   without it, and any other type (GET_LIFETIME, DISCARD, WRITE_ZEROES, ... are not offered):
//!   `VIRTIO_BLK_S_UNSUPP`;
//! - `VIRTIO_BLK_T_GET_ID` (8): the device id, an ASCII string NUL-padded to 20 bytes;
//! - used length (2.7.8): the bytes written, so a completed read is its data plus the status
//!   byte, and anything answered is at least the status byte.
//!
//! Where the specification leaves the device a choice (a zero-length read or write, a FLUSH
//! with a sector or data, readable data in a GET_ID, a chain breaking the driver's framing
//! rules, a read past the end of a file shrunk under the device), the model accepts every
//! reasonable answer, but never a change to the image.

use kiln::vstate::memory::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

use crate::guest::Ranges;
use crate::virtq::Walked;

/// Request types (5.2.6).
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush.
pub const T_FLUSH: u32 = 4;
/// Device id.
pub const T_GET_ID: u32 = 8;
/// Status values (5.2.6).
pub const S_OK: u8 = 0;
/// I/O error, or a malformed request.
pub const S_IOERR: u8 = 1;
/// Request type not supported.
pub const S_UNSUPP: u8 = 2;
/// Feature bits (5.2.3).
pub const F_RO: u64 = 1 << 5;
/// FLUSH command.
pub const F_FLUSH: u64 = 1 << 9;
/// Bytes of the device id (VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = 20;
const SECTOR: u64 = 512;
const HEADER: u64 = 16;

/// Guest ranges (address, length), in the order of the bytes they hold.
pub type Spans = Vec<(u64, u64)>;

/// What the device may do with one chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Return the chain with length 0 and write nothing (the chain has no status byte, or
    /// breaks the framing rules).
    Refuse,
    /// Complete with this status.
    Status(u8),
}

/// The prediction for one chain.
#[derive(Clone, Debug)]
pub struct Prediction {
    /// The head.
    pub head: u16,
    /// The answers the specification allows.
    pub allowed: Vec<Answer>,
    /// Guest address of the status byte, if the chain has one.
    pub status_at: Option<u64>,
    /// The status byte before the device ran (a refused chain leaves it).
    pub status_before: u8,
    /// Device-writable bytes of the chain.
    pub writable: u64,
    /// For a read answered OK: where the data goes (address, length) and what it must be
    /// (`None`: a byte the model cannot know).
    pub read: Option<(Spans, Vec<Option<u8>>)>,
    /// For a GET_ID answered OK: where the id goes and the bytes it must start with.
    pub id: Option<(Spans, Vec<u8>)>,
    /// The exact used length of an OK answer, where the specification fixes it.
    pub ok_len: Option<u32>,
    /// Nothing this chain reads or writes overlaps what another chain of the round writes,
    /// nor its own writable bytes its readable ones: its header and data are what the model
    /// read before the device ran, and its status and data are still there after the round.
    /// (Only an earlier chain writing over what this one reads makes the image unknown.)
    pub clean: bool,
}

/// The device as the driver set it up.
#[derive(Clone, Debug)]
pub struct Device {
    /// Capacity in sectors (config space, fixed when the device was made).
    pub capacity: u64,
    /// VIRTIO_BLK_F_RO offered.
    pub read_only: bool,
    /// VIRTIO_BLK_F_FLUSH negotiated.
    pub flush: bool,
    /// The drive id.
    pub id: Vec<u8>,
}

/// Byte ranges `[skip, skip + len)` of the concatenation of `bufs`, as guest ranges.
fn stream(bufs: &[&Walked], skip: u64, len: u64) -> Spans {
    let mut out = Vec::new();
    let (mut pos, end) = (0u64, skip + len);
    for b in bufs {
        let (start, stop) = (pos, pos + u64::from(b.len));
        pos = stop;
        let (from, to) = (start.max(skip), stop.min(end));
        if from < to {
            out.push((b.addr + (from - start), to - from));
        }
    }
    out
}

fn read_ranges(mem: &GuestMemory, ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut v = Vec::new();
    for &(addr, len) in ranges {
        let mut b = vec![0u8; len as usize];
        let _ = mem.read_slice(&mut b, GuestAddress(addr));
        v.extend(b);
    }
    v
}

/// Predicts every chain of one round, in the order the device takes them, applying the
/// writes the specification requires to `image` (a byte of `None` is one the model cannot
/// know). Returns the predictions and whether the image is still known exactly afterwards.
pub fn predict(
    mem: &GuestMemory,
    dev: &Device,
    chains: &[(u16, Option<Vec<Walked>>)],
    image: &mut Vec<Option<u8>>,
) -> (Vec<Prediction>, bool) {
    // What each chain's device-writable buffers cover, to find chains that interfere.
    let writes: Vec<Ranges> = chains
        .iter()
        .map(|(_, c)| {
            let mut r = Ranges::default();
            for b in c.iter().flatten().filter(|b| b.writable) {
                r.add(b.addr, u64::from(b.len));
            }
            r
        })
        .collect();
    let mut known = true;
    let mut out = Vec::new();
    for (i, (head, chain)) in chains.iter().enumerate() {
        let mut p = Prediction {
            head: *head,
            allowed: vec![Answer::Refuse],
            status_at: None,
            status_before: 0,
            writable: 0,
            read: None,
            id: None,
            ok_len: None,
            clean: true,
        };
        let Some(bufs) = chain else {
            // Not a chain the device can walk: returned with length 0 (2.7.5.2 / kiln's
            // queue checks; the harness's walk decides), nothing done.
            out.push(p);
            continue;
        };
        let overlaps_itself = bufs.iter().enumerate().any(|(x, b)| {
            let (s, e) = (b.addr, b.addr.saturating_add(u64::from(b.len)));
            bufs.iter().enumerate().any(|(y, o)| {
                x != y
                    && (b.writable || o.writable)
                    && s < o.addr.saturating_add(u64::from(o.len))
                    && o.addr < e
            })
        });
        let untouched_by = |earlier_only: bool| {
            bufs.iter().all(|b| {
                let (s, e) = (b.addr, b.addr.saturating_add(u64::from(b.len)));
                !writes
                    .iter()
                    .enumerate()
                    .any(|(j, w)| j != i && (!earlier_only || j < i) && w.touches(s, e))
            })
        };
        // What the device reads of this chain is as it is now unless an earlier chain (or
        // this one) writes over it; what it writes stays for the check after the round
        // unless any other chain writes there too.
        let reads_clean = !overlaps_itself && untouched_by(true);
        p.clean = reads_clean && untouched_by(false);
        p.writable = bufs
            .iter()
            .filter(|b| b.writable)
            .map(|b| u64::from(b.len))
            .sum();
        // The status byte: the chain's last byte, in a device-writable buffer.
        let last = bufs.iter().rev().find(|b| b.len > 0);
        let Some(last) = last.filter(|b| b.writable) else {
            out.push(p);
            continue;
        };
        let status_at = last.addr + u64::from(last.len) - 1;
        p.status_at = Some(status_at);
        let mut before = [0u8; 1];
        let _ = mem.read_slice(&mut before, GuestAddress(status_at));
        p.status_before = before[0];
        let first_writable = bufs.iter().position(|b| b.writable).unwrap_or(bufs.len());
        let (readable, writable): (Vec<&Walked>, Vec<&Walked>) = (
            bufs[..first_writable].iter().collect(),
            bufs[first_writable..].iter().collect(),
        );
        if writable.iter().any(|b| !b.writable) {
            // A device-readable element after a device-writable one: the driver broke the
            // framing rules; refusing or IOERR, nothing written.
            p.allowed = vec![Answer::Refuse, Answer::Status(S_IOERR)];
            out.push(p);
            continue;
        }
        let r_len: u64 = readable.iter().map(|b| u64::from(b.len)).sum();
        let w_len = p.writable;
        if r_len < HEADER {
            p.allowed = vec![Answer::Status(S_IOERR)];
            out.push(p);
            continue;
        }
        if !reads_clean {
            // Its header may change before the device reads it: any answer, any effect
            // on the image (within the capacity).
            p.allowed = vec![
                Answer::Refuse,
                Answer::Status(S_OK),
                Answer::Status(S_IOERR),
                Answer::Status(S_UNSUPP),
            ];
            known = false;
            out.push(p);
            continue;
        }
        let header = read_ranges(mem, &stream(&readable, 0, HEADER));
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let (d_r, d_w) = (r_len - HEADER, w_len - 1);
        let ioerr = vec![Answer::Status(S_IOERR)];
        let in_range = |len: u64| {
            sector
                .checked_mul(SECTOR)
                .and_then(|o| o.checked_add(len))
                .is_some_and(|end| end <= dev.capacity * SECTOR)
        };
        p.allowed = match kind {
            T_IN | T_OUT if d_r > 0 && d_w > 0 => ioerr,
            T_IN if d_r > 0 => ioerr,
            T_OUT if d_w > 0 => ioerr,
            // No data: the specification does not say; nothing may be written.
            T_IN | T_OUT if d_r + d_w == 0 => vec![Answer::Status(S_OK), Answer::Status(S_IOERR)],
            T_OUT if dev.read_only => ioerr,
            T_IN | T_OUT if !(d_r + d_w).is_multiple_of(SECTOR) || !in_range(d_r + d_w) => ioerr,
            T_IN => {
                let at = (sector * SECTOR) as usize;
                let len = d_w as usize;
                let past_eof = at + len > image.len();
                let want: Vec<Option<u8>> = (at..at + len)
                    .map(|k| image.get(k).copied().unwrap_or(Some(0)))
                    .map(|b| if known { b } else { None })
                    .collect();
                p.read = Some((stream(&writable, 0, d_w), want));
                p.ok_len = Some((d_w + 1) as u32);
                if past_eof {
                    // The file was shrunk under the device: a short read may fail.
                    vec![Answer::Status(S_OK), Answer::Status(S_IOERR)]
                } else {
                    vec![Answer::Status(S_OK)]
                }
            }
            T_OUT => {
                let data = read_ranges(mem, &stream(&readable, HEADER, d_r));
                let at = (sector * SECTOR) as usize;
                if image.len() < at + data.len() {
                    image.resize(at + data.len(), Some(0));
                }
                for (k, b) in data.into_iter().enumerate() {
                    image[at + k] = Some(b);
                }
                p.ok_len = Some(1);
                vec![Answer::Status(S_OK)]
            }
            T_FLUSH if !dev.flush => vec![Answer::Status(S_UNSUPP)],
            T_FLUSH if sector == 0 && d_r + d_w == 0 => {
                p.ok_len = Some(1);
                vec![Answer::Status(S_OK)]
            }
            // The driver must send sector 0 and should send no data: the device may do
            // either.
            T_FLUSH => vec![Answer::Status(S_OK), Answer::Status(S_IOERR)],
            T_GET_ID => {
                let mut id = [0u8; ID_BYTES];
                let n = dev.id.len().min(ID_BYTES);
                id[..n].copy_from_slice(&dev.id[..n]);
                let take = (d_w as usize).min(ID_BYTES);
                p.id = Some((stream(&writable, 0, take as u64), id[..take].to_vec()));
                if d_r == 0 && d_w >= ID_BYTES as u64 {
                    vec![Answer::Status(S_OK)]
                } else {
                    // A short buffer, or readable data: either answer; an OK still carries
                    // the id's first bytes.
                    vec![Answer::Status(S_OK), Answer::Status(S_IOERR)]
                }
            }
            _ => vec![Answer::Status(S_UNSUPP)],
        };
        out.push(p);
    }
    (out, known)
}

/// Checks one chain's answer against its prediction: `len` is the used length, and the
/// status byte and data are read from guest memory after the device ran.
pub fn check(mem: &GuestMemory, p: &Prediction, len: u32) {
    let head = p.head;
    let read_byte = |addr: u64| {
        let mut b = [0u8; 1];
        let _ = mem.read_slice(&mut b, GuestAddress(addr));
        b[0]
    };
    let answer = if len == 0 {
        Answer::Refuse
    } else {
        let at = p.status_at.unwrap_or_else(|| {
            panic!("head {head}: used length {len} for a chain without a status byte")
        });
        Answer::Status(read_byte(at))
    };
    if !p.clean {
        // Its bytes may have changed under it: only the length bound (checked by the caller).
        return;
    }
    assert!(
        p.allowed.contains(&answer),
        "head {head}: answered {answer:?} (used length {len}); the specification allows {:?}",
        p.allowed
    );
    if answer == Answer::Refuse {
        if let Some(at) = p.status_at {
            assert_eq!(
                read_byte(at),
                p.status_before,
                "head {head}: refused, yet its status byte changed"
            );
        }
        return;
    }
    assert!(
        u64::from(len) <= p.writable,
        "head {head}: used length {len} > {} writable bytes",
        p.writable
    );
    if answer != Answer::Status(S_OK) {
        return;
    }
    if let Some(want) = p.ok_len {
        assert_eq!(len, want, "head {head}: used length of an OK answer");
    }
    if let Some((ranges, want)) = &p.read {
        let got = read_ranges(mem, ranges);
        assert_eq!(got.len(), want.len());
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            if let Some(w) = w {
                assert_eq!(
                    g, w,
                    "head {head}: byte {k} of the read data differs from the image"
                );
            }
        }
    }
    if let Some((ranges, want)) = &p.id {
        assert_eq!(
            &read_ranges(mem, ranges),
            want,
            "head {head}: the device id delivered"
        );
    }
}

/// Compares the image file with the model (bytes the model cannot know are skipped).
pub fn assert_image(file: &[u8], model: &[Option<u8>]) {
    assert_eq!(
        file.len(),
        model.len(),
        "the image is {} bytes, the model {}",
        file.len(),
        model.len()
    );
    if let Some(k) = file
        .iter()
        .zip(model)
        .position(|(f, m)| m.is_some_and(|m| m != *f))
    {
        panic!(
            "image byte {k} (sector {}, offset {}) is {:#04x}, the model says {:#04x?}",
            k / 512,
            k % 512,
            file[k],
            model[k]
        );
    }
}
