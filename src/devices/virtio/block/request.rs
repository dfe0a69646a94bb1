//! From a descriptor chain to a block request. virtio 1.x lets the driver frame a request
//! any way it likes, so the chain is read as two byte streams: the device-readable one (the
//! 16-byte header, then the data of a write) and the device-writable one (the data of a read
//! or GET_ID, then the status byte, always last).

use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::queue::Buffer;
use crate::vstate::memory::GuestMemory;

/// Size of `struct virtio_blk_outhdr`.
pub const HEADER_SIZE: u64 = 16;

/// Request types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read (VIRTIO_BLK_T_IN).
    In,
    /// Write (VIRTIO_BLK_T_OUT).
    Out,
    /// Flush (VIRTIO_BLK_T_FLUSH).
    Flush,
    /// Device id (VIRTIO_BLK_T_GET_ID).
    GetId,
    /// Anything else.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            0 => RequestType::In,
            1 => RequestType::Out,
            4 => RequestType::Flush,
            8 => RequestType::GetId,
            other => RequestType::Unsupported(other),
        }
    }
}

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: RequestType,
    /// First sector.
    pub sector: u64,
    /// The data buffers (device-writable for In and GetId, device-readable for Out).
    pub data: Vec<Buffer>,
    /// Total bytes in `data`.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain is not a request.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No device-writable byte at the end: the request cannot even be answered.
    #[error("no status byte")]
    NoStatus,
    /// The chain cannot be a valid request; answered IOERR at `status`.
    #[error("{reason}")]
    Malformed {
        /// Where the IOERR goes.
        status: GuestAddress,
        /// What is wrong.
        reason: &'static str,
    },
}

/// The bytes `[skip, skip + len)` of the stream formed by `bufs`, as buffers.
fn sub_range(bufs: &[Buffer], skip: u64, len: u64) -> Vec<Buffer> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    let end = skip + len;
    for b in bufs {
        let (start, stop) = (pos, pos + u64::from(b.len));
        pos = stop;
        let from = start.max(skip);
        let to = stop.min(end);
        if from < to {
            out.push(Buffer {
                addr: GuestAddress(b.addr.0 + (from - start)),
                len: (to - from) as u32,
                writable: b.writable,
            });
        }
    }
    out
}

fn total(bufs: &[Buffer]) -> u64 {
    bufs.iter().map(|b| u64::from(b.len)).sum()
}

/// Parses the chain `bufs` (already walked and checked to lie in guest memory).
pub fn parse(mem: &GuestMemory, bufs: &[Buffer]) -> Result<Request, RequestError> {
    let split = bufs.iter().position(|b| b.writable).unwrap_or(bufs.len());
    let (readable, writable) = bufs.split_at(split);

    // The status byte: the last byte of the writable stream, which must be device-writable
    // (a device-readable buffer after it is never written to).
    let status = writable
        .iter()
        .rev()
        .find(|b| b.len > 0)
        .filter(|b| b.writable)
        .map(|b| GuestAddress(b.addr.0 + u64::from(b.len) - 1))
        .ok_or(RequestError::NoStatus)?;
    let malformed = |reason| RequestError::Malformed { status, reason };

    if writable.iter().any(|b| !b.writable) {
        return Err(malformed(
            "device-readable buffer after a device-writable one",
        ));
    }
    let readable_len = total(readable);
    if readable_len < HEADER_SIZE {
        return Err(malformed("header missing, short or device-writable"));
    }

    let mut header = [0u8; HEADER_SIZE as usize];
    let mut filled = 0usize;
    for piece in sub_range(readable, 0, HEADER_SIZE) {
        let n = piece.len as usize;
        mem.read_slice(&mut header[filled..filled + n], piece.addr)
            .map_err(|_| malformed("header unreadable"))?;
        filled += n;
    }
    let kind = RequestType::from(u32::from_le_bytes([
        header[0], header[1], header[2], header[3],
    ]));
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);

    let writable_len = total(writable);
    let data = match kind {
        RequestType::Out => {
            // Nothing but the status byte may be device-writable.
            if writable_len != 1 {
                return Err(malformed("write request with device-writable data"));
            }
            sub_range(readable, HEADER_SIZE, readable_len - HEADER_SIZE)
        }
        RequestType::In | RequestType::GetId => {
            // Nothing but the header may be device-readable.
            if readable_len != HEADER_SIZE {
                return Err(malformed("read request with device-readable data"));
            }
            sub_range(writable, 0, writable_len - 1)
        }
        RequestType::Flush | RequestType::Unsupported(_) => Vec::new(),
    };
    if data.is_empty()
        && matches!(
            kind,
            RequestType::In | RequestType::Out | RequestType::GetId
        )
    {
        return Err(malformed("request without data"));
    }
    let data_len = total(&data);
    Ok(Request {
        kind,
        sector,
        data,
        data_len,
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    fn b(addr: u64, len: u32, writable: bool) -> Buffer {
        Buffer {
            addr: GuestAddress(addr),
            len,
            writable,
        }
    }

    fn header(mem: &GuestMemory, at: u64, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(at)).unwrap();
        mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    #[test]
    fn linux_framing() {
        let mem = create_guest_memory(16).unwrap();
        header(&mem, 0x1000, 0, 7);
        let r = parse(
            &mem,
            &[
                b(0x1000, 16, false),
                b(0x2000, 4096, true),
                b(0x3000, 1, true),
            ],
        )
        .unwrap();
        assert_eq!(r.kind, RequestType::In);
        assert_eq!(r.sector, 7);
        assert_eq!(r.data, vec![b(0x2000, 4096, true)]);
        assert_eq!(r.status, GuestAddress(0x3000));
    }

    #[test]
    fn any_layout() {
        let mem = create_guest_memory(16).unwrap();
        // Header and write data in one buffer, split header across two.
        header(&mem, 0x1000, 1, 9);
        let r = parse(
            &mem,
            &[
                b(0x1000, 10, false),
                b(0x100a, 6 + 512, false),
                b(0x3000, 1, true),
            ],
        )
        .unwrap();
        assert_eq!(r.kind, RequestType::Out);
        assert_eq!(r.sector, 9);
        assert_eq!(r.data, vec![b(0x1010, 512, false)]);
        // Read data and status in one buffer.
        header(&mem, 0x1000, 0, 1);
        let r = parse(&mem, &[b(0x1000, 16, false), b(0x2000, 513, true)]).unwrap();
        assert_eq!(r.data, vec![b(0x2000, 512, true)]);
        assert_eq!(r.status, GuestAddress(0x2200));
    }

    #[test]
    fn unanswerable_chains() {
        let mem = create_guest_memory(16).unwrap();
        assert_eq!(parse(&mem, &[]), Err(RequestError::NoStatus));
        assert_eq!(
            parse(&mem, &[b(0x1000, 16, false)]),
            Err(RequestError::NoStatus)
        );
        assert_eq!(
            parse(&mem, &[b(0x1000, 16, false), b(0x2000, 0, true)]),
            Err(RequestError::NoStatus)
        );
    }

    #[test]
    fn malformed_but_answerable() {
        let mem = create_guest_memory(16).unwrap();
        // Device-writable header.
        let e = parse(&mem, &[b(0x1000, 16, true), b(0x3000, 1, true)]).unwrap_err();
        assert!(matches!(
            e,
            RequestError::Malformed {
                status: GuestAddress(0x3000),
                ..
            }
        ));
        // Short header.
        assert!(matches!(
            parse(&mem, &[b(0x1000, 8, false), b(0x3000, 1, true)]),
            Err(RequestError::Malformed { .. })
        ));
        // Readable after writable.
        assert!(matches!(
            parse(
                &mem,
                &[
                    b(0x1000, 16, false),
                    b(0x2000, 8, true),
                    b(0x2800, 8, false),
                    b(0x3000, 1, true)
                ]
            ),
            Err(RequestError::Malformed { .. })
        ));
        // The last buffer is device-readable: there is no status byte to write.
        assert_eq!(
            parse(
                &mem,
                &[
                    b(0x1000, 16, false),
                    b(0x2000, 512, true),
                    b(0x3000, 1, false)
                ]
            ),
            Err(RequestError::NoStatus)
        );
    }

    #[test]
    fn data_in_the_wrong_direction() {
        let mem = create_guest_memory(16).unwrap();
        header(&mem, 0x1000, 1, 0);
        assert!(matches!(
            parse(
                &mem,
                &[
                    b(0x1000, 16, false),
                    b(0x2000, 512, true),
                    b(0x3000, 1, true)
                ]
            ),
            Err(RequestError::Malformed { .. })
        ));
        header(&mem, 0x1000, 0, 0);
        assert!(matches!(
            parse(
                &mem,
                &[
                    b(0x1000, 16, false),
                    b(0x2000, 512, false),
                    b(0x3000, 1, true)
                ]
            ),
            Err(RequestError::Malformed { .. })
        ));
        assert!(matches!(
            parse(&mem, &[b(0x1000, 16, false), b(0x3000, 1, true)]),
            Err(RequestError::Malformed {
                reason: "request without data",
                ..
            })
        ));
    }

    #[test]
    fn types() {
        let mem = create_guest_memory(16).unwrap();
        for (t, want) in [
            (4, RequestType::Flush),
            (8, RequestType::GetId),
            (99, RequestType::Unsupported(99)),
        ] {
            header(&mem, 0x1000, t, 0);
            let r = parse(&mem, &[b(0x1000, 16, false), b(0x2000, 21, true)]).unwrap();
            assert_eq!(r.kind, want);
            let expect_data = if want == RequestType::GetId { 20 } else { 0 };
            assert_eq!(r.data_len, expect_data);
        }
    }

    #[test]
    fn sub_ranges() {
        let bufs = [b(0, 10, false), b(100, 10, false), b(200, 10, false)];
        assert_eq!(
            sub_range(&bufs, 5, 10),
            vec![b(5, 5, false), b(100, 5, false)]
        );
        assert_eq!(sub_range(&bufs, 0, 30).len(), 3);
        assert_eq!(sub_range(&bufs, 30, 5), vec![]);
        assert_eq!(sub_range(&bufs, 12, 0), vec![]);
    }
}
