//! Firecracker's boot-timer device: the guest writes the magic byte 123 to the first byte of
//! MMIO 0xc0000000 (typically from its init), and kiln logs the time since it started.

use std::time::Instant;

use super::bus::BusDevice;

/// The value a guest writes to mark the end of its boot.
pub const MAGIC_VALUE_SIGNAL_GUEST_BOOT_COMPLETE: u8 = 123;
/// Size of the device's MMIO window.
pub const BOOT_TIMER_SIZE: u64 = 0x1000;

/// The boot timer.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    start_cpu_us: u64,
    /// Microseconds from start to the guest's signal, once it came.
    pub boot_time_us: Option<u64>,
}

/// CPU time this process has used, in microseconds.
pub fn process_cpu_us() -> u64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage only writes into the struct passed to it.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
        return 0;
    }
    // SAFETY: zero-initialised, then filled by the successful getrusage above.
    let usage = unsafe { usage.assume_init() };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

impl BootTimer {
    /// A timer counting from `start`; `start_cpu_us` is the CPU time already spent then.
    pub fn new(start: Instant, start_cpu_us: u64) -> Self {
        BootTimer {
            start,
            start_cpu_us,
            boot_time_us: None,
        }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.first() != Some(&MAGIC_VALUE_SIGNAL_GUEST_BOOT_COMPLETE) {
            return;
        }
        let us = self.start.elapsed().as_micros() as u64;
        let cpu = process_cpu_us().saturating_sub(self.start_cpu_us);
        self.boot_time_us = Some(us);
        log::info!(
            "Guest-boot-time = {:>6} us {} ms, {:>6} CPU us {} CPU ms",
            us,
            us / 1000,
            cpu,
            cpu / 1000
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_the_magic_byte() {
        let mut t = BootTimer::new(Instant::now(), 0);
        t.write(0, &[1]);
        t.write(4, &[123]);
        assert_eq!(t.boot_time_us, None);
        t.write(0, &[123]);
        assert!(t.boot_time_us.is_some());
        let mut d = [9u8; 4];
        t.read(0, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
