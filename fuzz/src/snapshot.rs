//! Snapshot state files: any bytes through the state-file parser (header, size cap,
//! digest, JSON, validation), and every state it accepts restored into the device models.
//!
//! The first input byte picks the mode: bit 0 clear, the rest is a whole state file (the
//! header and digest checks face the fuzzer); bit 0 set, the rest is a payload sealed with
//! the harness's key, so the JSON parser and the validation face it. Bit 1 asks for the
//! parse without the key. Bit 2 set: the rest is a working-set file instead (the first
//! 4 bytes of it, little endian, the memory's page count), with and without a valid
//! checksum (bit 3 re-seals it, so the run checks face the fuzzer).
//!
//! Invariants: nothing panics; a file sealed with the key never opens without it; every
//! state the parser accepts restores into real device models (COM1, the i8042, a
//! virtio-blk transport per saved virtio device) without a panic, and a restored transport
//! that activated its device only did so with queues inside guest memory.

use std::sync::{Arc, Mutex};

use kiln::devices::IrqLine;
use kiln::devices::i8042::I8042Device;
use kiln::devices::serial::SerialDevice;
use kiln::devices::virtio::block::{Block, BlockConfig, DiskFile};
use kiln::devices::virtio::mmio::MmioTransport;
use kiln::devices::virtio::{VirtioDevice, VirtioInterrupt};
use kiln::exit::ExitSignal;
use kiln::snapshot::format::encode;
use kiln::snapshot::parse_state;
use vmm_sys_util::eventfd::EventFd;

use crate::guest;

const KEY: [u8; 32] = [0x42; 32];

fn eventfd() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd")
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 4 != 0 {
        working_set(mode & 8 != 0, rest);
        return;
    }
    let file = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        encode(rest, Some(&KEY))
    };
    let key = (mode & 2 == 0).then_some(&KEY);
    let parsed = parse_state(&file, key, "fuzz");
    if mode & 1 == 1 && key.is_none() {
        assert!(parsed.is_err(), "a keyed file opened without its key");
        return;
    }
    let Ok(state) = parsed else {
        return;
    };

    let mut serial = SerialDevice::new(
        IrqLine::new(eventfd()),
        Box::new(std::io::sink()),
        eventfd(),
    );
    let _ = serial.restore(&state.devices.serial);
    let exit = Arc::new(ExitSignal::new().expect("an eventfd"));
    let mut i8042 = I8042Device::new(exit, IrqLine::new(eventfd()));
    let _ = i8042.restore(&state.devices.i8042);

    let mem = guest::memory();
    for saved in state.devices.blocks.iter().chain(&state.devices.nets) {
        let disk = DiskFile::from_file(guest::memfd(&[0u8; 4096]), false).expect("a memfd disk");
        let config = BlockConfig {
            drive_id: saved.id.clone(),
            read_only: false,
            cache_type: Default::default(),
            io_engine: kiln::config::IoEngine::Sync,
        };
        let block = Arc::new(Mutex::new(
            Block::new(config, disk).expect("a block device"),
        ));
        let device: Arc<Mutex<dyn VirtioDevice>> = block.clone();
        let interrupt = Arc::new(VirtioInterrupt::new(IrqLine::new(eventfd())));
        let mut transport = MmioTransport::new(device, mem.clone(), interrupt);
        if transport.restore(&saved.transport).is_ok() && transport.is_active() {
            for q in saved.transport.queues.iter().filter(|q| q.ready) {
                let n = u64::from(q.size);
                for (addr, len) in [(q.desc, 16 * n), (q.avail, 6 + 2 * n), (q.used, 6 + 8 * n)] {
                    assert!(
                        vm_memory::GuestMemoryBackend::check_range(
                            &mem,
                            vm_memory::GuestAddress(addr),
                            len as usize
                        ),
                        "an activated queue outside guest memory: {q:?}"
                    );
                }
            }
            transport.kick_queues();
            block.lock().expect("not poisoned").process_queue();
        }
    }
}

/// A working-set file: accepted sets are in bounds, ordered, and encode back to the bytes.
fn working_set(reseal: bool, data: &[u8]) {
    use kiln::snapshot::working_set::WorkingSet;
    if data.len() < 4 {
        return;
    }
    let pages = u64::from(u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
    let mut file = data[4..].to_vec();
    if reseal && file.len() >= 32 {
        let body = file.len() - 32;
        let digest = blake3::hash(&file[..body]);
        file[body..].copy_from_slice(digest.as_bytes());
    }
    let Ok(ws) = WorkingSet::decode(&file, pages) else {
        return;
    };
    let mut next = 0;
    for &(first, count) in ws.runs() {
        assert!(
            count > 0 && first >= next,
            "runs out of order: {:?}",
            ws.runs()
        );
        next = first + count;
        assert!(
            next <= pages,
            "a run past the memory: {:?} of {pages}",
            ws.runs()
        );
    }
    assert_eq!(
        ws.encode(),
        file,
        "an accepted file does not encode back to itself"
    );
}
