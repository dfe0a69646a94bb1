use super::*;
use crate::devices::IrqLine;
use crate::devices::virtio::ActivateError;
use crate::vstate::memory::create_guest_memory;
use vmm_sys_util::eventfd::EventFd;

/// A device that records what the transport did to it.
struct Dummy {
    events: Vec<EventFd>,
    activated: Option<Activation>,
    resets: u32,
    config: [u8; 8],
    fail_activation: bool,
}

impl Dummy {
    fn new(queues: usize) -> Self {
        Dummy {
            events: (0..queues)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                .collect(),
            activated: None,
            resets: 0,
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            fail_activation: false,
        }
    }
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 64][..self.events.len()]
    }
    fn avail_features(&self) -> u64 {
        features::VIRTIO_F_VERSION_1 | features::VIRTIO_RING_F_EVENT_IDX | (1 << 5)
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = self.config.get_mut(offset as usize) {
            *b = data[0];
        }
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        if self.fail_activation || a.queues.len() != self.events.len() {
            return Err(ActivateError::QueueCount {
                expected: self.events.len(),
                got: a.queues.len(),
            });
        }
        self.activated = Some(a);
        Ok(())
    }
    fn reset(&mut self) {
        self.activated = None;
        self.resets += 1;
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.events
    }
}

struct Fixture {
    t: MmioTransport,
    dev: Arc<Mutex<Dummy>>,
    irq: EventFd,
}

fn fixture(queues: usize) -> Fixture {
    let mem = create_guest_memory(16).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(VirtioInterrupt::new(IrqLine::new(irq.try_clone().unwrap())));
    let dev = Arc::new(Mutex::new(Dummy::new(queues)));
    let t = MmioTransport::new(dev.clone(), mem, interrupt);
    Fixture { t, dev, irq }
}

fn rd(t: &mut MmioTransport, off: u64) -> u32 {
    let mut d = [0u8; 4];
    t.read(off, &mut d);
    u32::from_le_bytes(d)
}

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Drives the spec's initialisation sequence up to (not including) DRIVER_OK.
fn negotiate(t: &mut MmioTransport) {
    wr(t, reg::STATUS, ACKNOWLEDGE);
    wr(t, reg::STATUS, ACKNOWLEDGE | DRIVER);
    wr(t, reg::DRIVER_FEATURES_SEL, 1);
    wr(t, reg::DRIVER_FEATURES, 1);
    wr(t, reg::DRIVER_FEATURES_SEL, 0);
    wr(t, reg::DRIVER_FEATURES, (1 << 29) | (1 << 5));
    wr(t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(rd(t, reg::STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
}

fn setup_queue(t: &mut MmioTransport, sel: u32, size: u32, base: u64) {
    wr(t, reg::QUEUE_SEL, sel);
    wr(t, reg::QUEUE_NUM, size);
    wr(t, reg::QUEUE_DESC_LOW, base as u32);
    wr(t, reg::QUEUE_DESC_HIGH, (base >> 32) as u32);
    wr(t, reg::QUEUE_AVAIL_LOW, (base + 0x1000) as u32);
    wr(t, reg::QUEUE_AVAIL_HIGH, 0);
    wr(t, reg::QUEUE_USED_LOW, (base + 0x2000) as u32);
    wr(t, reg::QUEUE_USED_HIGH, 0);
    wr(t, reg::QUEUE_READY, 1);
}

#[test]
fn identification_registers() {
    let mut f = fixture(1);
    assert_eq!(rd(&mut f.t, reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(rd(&mut f.t, reg::VERSION), 2);
    assert_eq!(rd(&mut f.t, reg::DEVICE_ID), 2);
    assert_eq!(rd(&mut f.t, reg::VENDOR_ID), 0);
    wr(&mut f.t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(rd(&mut f.t, reg::DEVICE_FEATURES), 1);
    wr(&mut f.t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(rd(&mut f.t, reg::DEVICE_FEATURES), (1 << 29) | (1 << 5));
    wr(&mut f.t, reg::DEVICE_FEATURES_SEL, 7);
    assert_eq!(rd(&mut f.t, reg::DEVICE_FEATURES), 0);
    assert_eq!(rd(&mut f.t, reg::QUEUE_NUM_MAX), 256);
}

#[test]
fn full_initialisation_activates() {
    let mut f = fixture(2);
    negotiate(&mut f.t);
    setup_queue(&mut f.t, 0, 128, 0x10000);
    setup_queue(&mut f.t, 1, 64, 0x20000);
    assert_eq!(rd(&mut f.t, reg::QUEUE_READY), 1);
    wr(
        &mut f.t,
        reg::STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    assert_eq!(rd(&mut f.t, reg::STATUS) & DRIVER_OK, DRIVER_OK);
    let dev = f.dev.lock().unwrap();
    let a = dev.activated.as_ref().unwrap();
    assert_eq!(a.queues.len(), 2);
    assert_eq!(
        a.acked_features,
        features::VIRTIO_F_VERSION_1 | features::VIRTIO_RING_F_EVENT_IDX | (1 << 5)
    );
    use virtio_queue::QueueT;
    assert_eq!(a.queues[0].size(), 128);
    assert_eq!(a.queues[0].desc_table(), 0x10000);
    assert_eq!(a.queues[0].avail_ring(), 0x11000);
    assert_eq!(a.queues[0].used_ring(), 0x12000);
    assert!(a.queues[0].event_idx_enabled());
    assert_eq!(f.t.metrics().activations.get(), 1);
}

#[test]
fn unoffered_feature_bits_are_dropped() {
    let mut f = fixture(1);
    wr(&mut f.t, reg::STATUS, ACKNOWLEDGE);
    wr(&mut f.t, reg::STATUS, ACKNOWLEDGE | DRIVER);
    wr(&mut f.t, reg::DRIVER_FEATURES, u32::MAX);
    wr(&mut f.t, reg::DRIVER_FEATURES_SEL, 1);
    wr(&mut f.t, reg::DRIVER_FEATURES, u32::MAX);
    assert_eq!(
        f.t.acked_features,
        features::VIRTIO_F_VERSION_1 | features::VIRTIO_RING_F_EVENT_IDX | (1 << 5)
    );
}

#[test]
fn legacy_driver_does_not_get_features_ok() {
    let mut f = fixture(1);
    wr(&mut f.t, reg::STATUS, ACKNOWLEDGE);
    wr(&mut f.t, reg::STATUS, ACKNOWLEDGE | DRIVER);
    wr(&mut f.t, reg::DRIVER_FEATURES, 1 << 5);
    wr(&mut f.t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(rd(&mut f.t, reg::STATUS), ACKNOWLEDGE | DRIVER);
}

#[test]
fn status_transition_table() {
    use StatusAction::*;
    const A: u32 = ACKNOWLEDGE;
    const D: u32 = DRIVER;
    const F: u32 = FEATURES_OK;
    const O: u32 = DRIVER_OK;
    assert_eq!(status_action(0, A), Set);
    assert_eq!(status_action(A, A | D), Set);
    assert_eq!(status_action(A | D, A | D | F), NegotiateFeatures);
    assert_eq!(status_action(A | D | F, A | D | F | O), Activate);
    assert_eq!(status_action(A | D | F | O, 0), Reset);
    assert_eq!(status_action(A | D, A | D | FAILED), Set);
    // Skipping steps, going back, or jumping straight to DRIVER_OK is illegal.
    assert_eq!(status_action(0, A | D), Reject);
    assert_eq!(status_action(0, A | D | F | O), Reject);
    assert_eq!(status_action(A | D, A), Reject);
    assert_eq!(status_action(A | D, A | D | O), Reject);
    assert_eq!(status_action(A | D | F | O, A | D | F | O), Reject);
    assert_eq!(status_action(0, DEVICE_NEEDS_RESET), Reject);
    // After NEEDS_RESET only a reset (or FAILED) is accepted.
    assert_eq!(
        status_action(
            A | D | F | DEVICE_NEEDS_RESET,
            A | D | F | DEVICE_NEEDS_RESET | O
        ),
        Reject
    );
    assert_eq!(status_action(A | D | F | DEVICE_NEEDS_RESET, 0), Reset);
}

#[test]
fn illegal_status_writes_are_ignored() {
    let mut f = fixture(1);
    wr(
        &mut f.t,
        reg::STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    assert_eq!(rd(&mut f.t, reg::STATUS), 0);
    assert!(f.dev.lock().unwrap().activated.is_none());
    assert_eq!(f.t.metrics().illegal_status.get(), 1);
}

#[test]
fn bad_queue_configurations_are_not_made_ready() {
    let mut f = fixture(1);
    negotiate(&mut f.t);
    // size 0, not a power of two, above the maximum
    for size in [0, 100, 512] {
        setup_queue(&mut f.t, 0, size, 0x10000);
        assert_eq!(rd(&mut f.t, reg::QUEUE_READY), 0, "size {size}");
    }
    // misaligned descriptor table, rings outside RAM
    setup_queue(&mut f.t, 0, 128, 0x10008);
    assert_eq!(rd(&mut f.t, reg::QUEUE_READY), 0);
    setup_queue(&mut f.t, 0, 128, (16 << 20) - 0x800);
    assert_eq!(rd(&mut f.t, reg::QUEUE_READY), 0);
    setup_queue(&mut f.t, 0, 128, 0xffff_ffff_0000_0000);
    assert_eq!(rd(&mut f.t, reg::QUEUE_READY), 0);
    assert_eq!(f.t.metrics().bad_queues.get(), 6);
    // DRIVER_OK with no ready queue: not activated, NEEDS_RESET and a config interrupt.
    wr(
        &mut f.t,
        reg::STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    assert!(f.dev.lock().unwrap().activated.is_none());
    assert_eq!(
        rd(&mut f.t, reg::STATUS) & (DEVICE_NEEDS_RESET | DRIVER_OK),
        DEVICE_NEEDS_RESET
    );
    assert_eq!(
        rd(&mut f.t, reg::INTERRUPT_STATUS),
        crate::devices::virtio::INT_CONFIG
    );
    assert_eq!(f.irq.read().unwrap(), 1);
    // A reset recovers the device.
    wr(&mut f.t, reg::STATUS, 0);
    assert_eq!(rd(&mut f.t, reg::STATUS), 0);
    negotiate(&mut f.t);
    setup_queue(&mut f.t, 0, 128, 0x10000);
    wr(
        &mut f.t,
        reg::STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    assert!(f.dev.lock().unwrap().activated.is_some());
}

#[test]
fn queue_registers_only_between_features_ok_and_driver_ok() {
    let mut f = fixture(1);
    setup_queue(&mut f.t, 0, 128, 0x10000);
    assert_eq!(rd(&mut f.t, reg::QUEUE_READY), 0);
    negotiate(&mut f.t);
    setup_queue(&mut f.t, 0, 128, 0x10000);
    wr(
        &mut f.t,
        reg::STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    // After DRIVER_OK the driver cannot move the rings under the device.
    wr(&mut f.t, reg::QUEUE_DESC_LOW, 0x50000);
    assert_eq!(f.t.queues[0].desc, 0x10000);
    // Features are frozen too.
    wr(&mut f.t, reg::DRIVER_FEATURES, 0);
    assert_ne!(f.t.acked_features, 0);
}

#[test]
fn out_of_range_queue_select() {
    let mut f = fixture(1);
    negotiate(&mut f.t);
    wr(&mut f.t, reg::QUEUE_SEL, 7);
    assert_eq!(rd(&mut f.t, reg::QUEUE_NUM_MAX), 0);
    assert_eq!(rd(&mut f.t, reg::QUEUE_READY), 0);
    wr(&mut f.t, reg::QUEUE_NUM, 16);
    wr(&mut f.t, reg::QUEUE_READY, 1);
    wr(&mut f.t, reg::QUEUE_DESC_LOW, 0x1000);
    wr(&mut f.t, reg::QUEUE_SEL, u32::MAX);
    wr(&mut f.t, reg::QUEUE_READY, 1);
    assert!(f.t.metrics().bad_accesses.get() >= 4);
}

#[test]
fn read_only_registers_and_odd_widths() {
    let mut f = fixture(1);
    wr(&mut f.t, reg::MAGIC_VALUE, 0);
    wr(&mut f.t, reg::INTERRUPT_STATUS, 0xff);
    wr(&mut f.t, reg::QUEUE_NUM_MAX, 4);
    assert_eq!(rd(&mut f.t, reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(rd(&mut f.t, reg::QUEUE_NUM_MAX), 256);
    let mut two = [0u8; 2];
    f.t.read(reg::MAGIC_VALUE, &mut two);
    assert_eq!(two, [0, 0]);
    f.t.write(reg::STATUS, &[1]);
    assert_eq!(rd(&mut f.t, reg::STATUS), 0);
    // Unknown offsets below the config space.
    assert_eq!(rd(&mut f.t, 0x0f0), 0);
    wr(&mut f.t, 0x0f0, 1);
}

#[test]
fn config_space_any_width() {
    let mut f = fixture(1);
    let mut b = [0u8; 1];
    f.t.read(0x100 + 3, &mut b);
    assert_eq!(b, [4]);
    let mut q = [0u8; 8];
    f.t.read(0x100, &mut q);
    assert_eq!(q, [1, 2, 3, 4, 5, 6, 7, 8]);
    f.t.read(0x100 + 6, &mut q);
    assert_eq!(q, [7, 8, 0, 0, 0, 0, 0, 0]);
    f.t.write(0x100, &[9]);
    f.t.read(0x100, &mut b);
    assert_eq!(b, [9]);
    f.t.read(0xfff, &mut b);
}

#[test]
fn notify_is_forwarded_only_when_running() {
    let mut f = fixture(1);
    wr(&mut f.t, reg::QUEUE_NOTIFY, 0);
    assert!(f.dev.lock().unwrap().events[0].read().is_err());
    negotiate(&mut f.t);
    setup_queue(&mut f.t, 0, 128, 0x10000);
    wr(
        &mut f.t,
        reg::STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    wr(&mut f.t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(f.dev.lock().unwrap().events[0].read().unwrap(), 1);
    wr(&mut f.t, reg::QUEUE_NOTIFY, 5);
}

#[test]
fn reset_returns_everything_to_power_on() {
    let mut f = fixture(1);
    negotiate(&mut f.t);
    setup_queue(&mut f.t, 0, 128, 0x10000);
    wr(
        &mut f.t,
        reg::STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    f.t.interrupt.signal_used_queue();
    wr(&mut f.t, reg::STATUS, 0);
    assert_eq!(rd(&mut f.t, reg::STATUS), 0);
    assert_eq!(rd(&mut f.t, reg::INTERRUPT_STATUS), 0);
    assert_eq!(rd(&mut f.t, reg::QUEUE_READY), 0);
    assert_eq!(f.t.acked_features, 0);
    let dev = f.dev.lock().unwrap();
    assert!(dev.activated.is_none());
    assert_eq!(dev.resets, 1);
}

#[test]
fn interrupt_ack() {
    let mut f = fixture(1);
    f.t.interrupt.signal_used_queue();
    assert_eq!(rd(&mut f.t, reg::INTERRUPT_STATUS), 1);
    wr(&mut f.t, reg::INTERRUPT_ACK, 1);
    assert_eq!(rd(&mut f.t, reg::INTERRUPT_STATUS), 0);
}

#[test]
fn failed_activation_sets_needs_reset() {
    let mut f = fixture(1);
    f.dev.lock().unwrap().fail_activation = true;
    negotiate(&mut f.t);
    setup_queue(&mut f.t, 0, 128, 0x10000);
    wr(
        &mut f.t,
        reg::STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    assert_eq!(
        rd(&mut f.t, reg::STATUS) & DEVICE_NEEDS_RESET,
        DEVICE_NEEDS_RESET
    );
    assert_eq!(f.t.metrics().activate_failures.get(), 1);
}
