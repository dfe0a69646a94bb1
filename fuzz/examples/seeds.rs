//! Writes the seed corpus of every fuzz target into `fuzz/seeds/<target>/`, built with
//! kiln's own types (config structs, API actions, the seccomp filters it ships, kernels
//! its loader accepts) and the harnesses' encoders, and runs each seed through its
//! harness once so that a seed never starts a campaign with a crash.
//!
//! `cargo run --example seeds [-- <dir>]` from `fuzz/`.

use std::path::PathBuf;

use kiln::api::{DriveUpdate, MachineConfigUpdate, VmmAction};
use kiln::config::{
    BootSourceConfig, CacheType, DriveConfig, LoggerConfig, MacAddr, MachineConfig, MetricsConfig,
    NetConfig, VmConfig,
};
use kiln::devices::virtio::block::features::VIRTIO_BLK_F_FLUSH;
use kiln::devices::virtio::features::{
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use kiln::devices::virtio::net::features as netf;
use kiln_fuzz::virtq::{Addr, Buf, ChainSpec, RawDesc};
use kiln_fuzz::wire::Wire;
use kiln_fuzz::{api, blk, i8042, jailer, loader, mmio, net, serial};

struct Out {
    dir: PathBuf,
    count: usize,
}

impl Out {
    fn put(&mut self, target: &str, name: &str, bytes: &[u8]) {
        let d = self.dir.join(target);
        std::fs::create_dir_all(&d).expect("create the seed directory");
        std::fs::write(d.join(name), bytes).expect("write a seed");
        self.count += 1;
    }
}

fn blk_seeds(o: &mut Out) {
    use blk::{Input, Op, Req};
    let all = VIRTIO_F_VERSION_1
        | VIRTIO_RING_F_EVENT_IDX
        | VIRTIO_RING_F_INDIRECT_DESC
        | VIRTIO_BLK_F_FLUSH;
    let base = |features: u64, read_only: bool, ops: Vec<Op>| Input {
        read_only,
        writeback: true,
        features,
        size_log: 4,
        sectors: 64,
        id_len: 20,
        ops,
    };
    let mut indirect = Req::valid(0, 3, 2, 1);
    indirect.indirect = Some(2);
    let mut split = Req::valid(1, 7, 1, 2);
    split.header_split = 6;
    let seeds = [
        (
            "read",
            base(
                all,
                false,
                vec![Op::Request(Req::valid(0, 1, 1, 2)), Op::Process],
            ),
        ),
        (
            "write",
            base(
                all,
                false,
                vec![Op::Request(Req::valid(1, 5, 3, 1)), Op::Process],
            ),
        ),
        (
            "flush-getid",
            base(
                all,
                false,
                vec![
                    Op::Request(Req::valid(4, 0, 0, 0)),
                    Op::Request(Req {
                        data: vec![(0x8000 | 20, true)],
                        ..Req::valid(8, 0, 0, 0)
                    }),
                    Op::Process,
                ],
            ),
        ),
        (
            "indirect-split",
            base(
                all,
                false,
                vec![Op::Request(indirect), Op::Request(split), Op::Process],
            ),
        ),
        (
            "read-only",
            base(
                all,
                true,
                vec![
                    Op::Request(Req::valid(1, 0, 1, 1)),
                    Op::Request(Req::valid(0, 63, 1, 1)),
                    Op::Process,
                ],
            ),
        ),
        (
            "event-idx",
            base(
                all,
                false,
                vec![
                    Op::SetUsedEvent(1),
                    Op::Request(Req::valid(0, 0, 1, 1)),
                    Op::Request(Req::valid(0, 1, 1, 1)),
                    Op::Process,
                    Op::Request(Req::valid(0, 2, 1, 1)),
                    Op::Process,
                ],
            ),
        ),
        (
            "hostile",
            base(
                all,
                false,
                vec![
                    Op::Chain(ChainSpec::Direct(vec![Buf {
                        addr: Addr::Raw(0x3_ffff),
                        len: 4096,
                        writable: true,
                    }])),
                    Op::Raw(RawDesc {
                        table: 0,
                        index: 5,
                        addr: Addr::Arena(0),
                        len: 16,
                        flags: 1,
                        next: 5,
                    }),
                    Op::Publish(5),
                    Op::Publish(999),
                    Op::Process,
                    Op::SetAvailIdx(1000),
                    Op::Process,
                    Op::Reset,
                    Op::Truncate(2),
                    Op::Request(Req::valid(0, 10, 1, 1)),
                    Op::Process,
                ],
            ),
        ),
    ];
    for (name, s) in seeds {
        blk::run(&s);
        o.put("virtio_blk", name, &s.to_bytes());
        blk::run_async(&s);
        o.put("virtio_blk_async", name, &s.to_bytes());
    }
}

fn net_seeds(o: &mut Out) {
    use net::{Input, Op};
    let all = u64::MAX;
    let frame = |len: usize| {
        let mut f = net::host_frame(len, 7);
        f[12] = 0xff;
        f
    };
    let seeds = [
        (
            "tx",
            Input {
                features: all,
                size_log: (8, 8),
                ops: vec![
                    Op::TxFrame {
                        frame: frame(60),
                        segments: 0,
                        indirect: None,
                    },
                    Op::TxFrame {
                        frame: frame(1514),
                        segments: 3,
                        indirect: Some(1),
                    },
                    Op::ProcessTx { drain: true },
                ],
            },
        ),
        (
            "rx-mrg",
            Input {
                features: all,
                size_log: (8, 8),
                ops: vec![
                    Op::RxBuffers {
                        count: 4,
                        size: 1526,
                    },
                    Op::HostSend { len: 100, seed: 1 },
                    Op::HostSend { len: 3000, seed: 2 },
                    Op::ProcessRx,
                ],
            },
        ),
        (
            "rx-big-buffers",
            Input {
                features: all,
                size_log: (8, 8),
                ops: vec![
                    Op::RxBuffers {
                        count: 2,
                        size: 40000,
                    },
                    Op::HostSend { len: 1514, seed: 3 },
                    Op::ProcessRx,
                ],
            },
        ),
        (
            "rx-no-mrg",
            Input {
                features: all & !netf::VIRTIO_NET_F_MRG_RXBUF,
                size_log: (4, 4),
                ops: vec![
                    Op::RxBuffers {
                        count: 2,
                        size: 1526,
                    },
                    Op::HostSend { len: 4000, seed: 4 },
                    Op::HostSend { len: 64, seed: 5 },
                    Op::ProcessRx,
                    Op::RxBuffers { count: 1, size: 8 },
                    Op::ProcessRx,
                ],
            },
        ),
        (
            "tx-eagain",
            Input {
                features: all,
                size_log: (8, 8),
                ops: {
                    let mut v = Vec::new();
                    for _ in 0..40 {
                        v.push(Op::TxFrame {
                            frame: frame(4000),
                            segments: 1,
                            indirect: None,
                        });
                    }
                    v.push(Op::ProcessTx { drain: false });
                    v.push(Op::ProcessTx { drain: true });
                    v.push(Op::TapWritable);
                    v
                },
            },
        ),
    ];
    for (name, s) in seeds {
        net::run(&s);
        o.put("virtio_net", name, &s.to_bytes());
    }
}

fn mmio_seeds(o: &mut Out) {
    use mmio::{Input, Op};
    let q = |sel: u8| Op::Queue {
        sel,
        size: 16,
        desc: 0x1000 + 0x3000 * u64::from(sel),
        avail: 0x2000 + 0x3000 * u64::from(sel),
        used: 0x3000 + 0x3000 * u64::from(sel),
        ready: 1,
    };
    let f = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;
    let seeds = [
        (
            "blk-activate",
            Input {
                net: false,
                ops: vec![
                    Op::Init { features: f },
                    q(0),
                    Op::Status(15),
                    Op::Read {
                        offset: 0x100,
                        width: 3,
                    },
                    Op::Write {
                        offset: 0x50,
                        width: 2,
                        value: 0,
                    },
                    Op::Status(0),
                ],
            },
        ),
        (
            "net-activate",
            Input {
                net: true,
                ops: vec![
                    Op::Init { features: f },
                    q(0),
                    q(1),
                    Op::Status(15),
                    Op::Status(15 | 128),
                    Op::Status(0),
                ],
            },
        ),
        (
            "bad-queues",
            Input {
                net: false,
                ops: vec![
                    Op::Init { features: f },
                    Op::Queue {
                        sel: 0,
                        size: 300,
                        desc: 0x1008,
                        avail: 0x2001,
                        used: 0x3_fff0,
                        ready: 1,
                    },
                    Op::Queue {
                        sel: 1,
                        size: 16,
                        desc: 0,
                        avail: 0,
                        used: 0,
                        ready: 1,
                    },
                    Op::Status(15),
                    Op::Status(0),
                ],
            },
        ),
        (
            "legacy-driver",
            Input {
                net: false,
                ops: vec![
                    Op::Init { features: 0 },
                    Op::Status(1),
                    Op::Status(3),
                    Op::Status(7),
                    Op::Read {
                        offset: 0x70,
                        width: 2,
                    },
                ],
            },
        ),
    ];
    for (name, s) in seeds {
        mmio::run(&s);
        o.put("virtio_mmio", name, &s.to_bytes());
    }
}

fn serial_seeds(o: &mut Out) {
    use serial::{Input, Op};
    let mut ops: Vec<Op> = b"hello\n".iter().map(|b| Op::Write(0, *b)).collect();
    ops.push(Op::Write(1, 1));
    ops.push(Op::Input(b"login: root\n".to_vec()));
    ops.extend((0..13).map(|_| Op::Read(0)));
    ops.push(Op::Read(5));
    ops.push(Op::Write(4, 0x10));
    ops.extend(b"loop".iter().map(|b| Op::Write(0, *b)));
    ops.extend((0..4).map(|_| Op::Read(0)));
    ops.push(Op::Write(3, 0x80));
    ops.push(Op::Write(0, 12));
    ops.push(Op::Odd {
        offset: 0,
        len: 4,
        write: false,
    });
    ops.push(Op::Input(vec![b'x'; 100]));
    let s = Input { ops };
    serial::run(&s);
    o.put("serial", "console", &s.to_bytes());
}

fn i8042_seeds(o: &mut Out) {
    use i8042::{Input, Op};
    let s = Input {
        ops: vec![
            Op::Write(4, 0xaa),
            Op::Drain,
            Op::Write(4, 0x20),
            Op::Read(0),
            Op::Write(4, 0x60),
            Op::Write(0, 0x45),
            Op::Write(0, 0xf2),
            Op::Drain,
            Op::CtrlAltDel,
            Op::Write(4, 0xd1),
            Op::Write(0, 0xfe),
            Op::Write(4, 0xfe),
        ],
    };
    i8042::run(&s);
    o.put("i8042", "probe-and-reset", &s.to_bytes());
}

fn rate_limiter_seeds(o: &mut Out) {
    use kiln_fuzz::rate_limiter::{Edge, Input, Op};
    let cases = [
        // 10 per 10 ms with a burst: burst, bucket, then waits.
        ("ops-10-per-10ms", 10, 25, 10, vec![1, 30, 1, 1, 7]),
        // u64 sizes, 1 ms, a request of the whole range.
        (
            "u64-max",
            u64::MAX,
            u64::MAX,
            1,
            vec![u64::MAX, u64::MAX, u64::MAX],
        ),
        // A request far larger than a tiny bucket: debt.
        ("debt", 1, 0, u64::MAX, vec![1, u64::MAX, 1]),
    ];
    for (name, size, burst, refill_ms, requests) in cases {
        let mut ops = Vec::new();
        for r in requests {
            ops.push(Op::Reduce(Edge(r)));
            ops.push(Op::Advance(Edge(1_000_000)));
        }
        ops.push(Op::SaveRestore(Edge(3_600_000_000_000)));
        ops.push(Op::Reduce(Edge(1)));
        let s = Input {
            size: Edge(size),
            burst: Edge(burst),
            refill_ms: Edge(refill_ms),
            ops,
        };
        kiln_fuzz::rate_limiter::run(&s);
        o.put("rate_limiter", name, &s.to_bytes());
    }
}

fn loader_seeds(o: &mut Out) {
    use loader::{Input, Kernel, Phdr};
    let load = |paddr: u64| Phdr {
        kind: 1,
        offset: 64 + 56,
        paddr,
        filesz: 16,
        memsz: 0x1000,
    };
    let elf = Kernel::Elf {
        class: 2,
        machine: 62,
        entry: 0x100_0000,
        phdrs: vec![load(0x100_0000)],
        tail: vec![0xf4; 16],
    };
    // PT_NOTE with XEN_ELFNOTE_PHYS32_ENTRY after the PT_LOAD's payload.
    let mut tail = vec![0xf4u8; 16];
    for v in [4u32, 4, 18] {
        tail.extend_from_slice(&v.to_le_bytes());
    }
    tail.extend_from_slice(b"Xen\0");
    tail.extend_from_slice(&0x100_0008u32.to_le_bytes());
    let note = Phdr {
        kind: 4,
        offset: 64 + 2 * 56 + 16,
        paddr: 0,
        filesz: 20,
        memsz: 0,
    };
    let pvh = Kernel::Elf {
        class: 2,
        machine: 62,
        entry: 0x100_0000,
        phdrs: vec![
            Phdr {
                offset: 64 + 2 * 56,
                ..load(0x100_0000)
            },
            note,
        ],
        tail,
    };
    let bz = Kernel::BzImage {
        setup_sects: 1,
        version: 0x020f,
        loadflags: 1,
        code32_start: 0x10_0000,
        initrd_addr_max: 0x37ff_ffff,
        xloadflags: 3,
        cmdline_size: 2047,
        init_size: 0x8_0000,
        payload: vec![0xf4; 0x400],
    };
    let base = |kernel: Kernel| Input {
        mem: 2,
        kernel,
        initrd_len: 5000,
        boot_args: kiln::config::DEFAULT_BOOT_ARGS.as_bytes().to_vec(),
        devices: 2,
        root: 2,
        partuuid: b"0eaa91a0-01".to_vec(),
        vcpus: 2,
    };
    let mut seeds = vec![
        ("elf", base(elf)),
        ("pvh", base(pvh)),
        ("bzimage", base(bz)),
    ];
    if let Some(guest) = kiln::test_guest::ELF {
        seeds.push((
            "test-guest",
            Input {
                kernel: Kernel::Raw(guest.to_vec()),
                ..base(Kernel::Raw(Vec::new()))
            },
        ));
    }
    for (name, s) in seeds {
        loader::run(&s);
        o.put("kernel_loader", name, &s.to_bytes());
    }
}

fn configs() -> Vec<VmConfig> {
    let drive = |id: &str, root: bool| DriveConfig {
        drive_id: id.into(),
        path_on_host: format!("/images/{id}.ext4"),
        is_root_device: root,
        is_read_only: !root,
        partuuid: None,
        cache_type: if root {
            CacheType::Writeback
        } else {
            CacheType::Unsafe
        },
        io_engine: None,
        rate_limiter: None,
    };
    let full = VmConfig {
        boot_source: BootSourceConfig {
            kernel_image_path: "/images/vmlinux".into(),
            initrd_path: Some("/images/initrd".into()),
            boot_args: Some("console=ttyS0 reboot=k panic=1".into()),
        },
        machine_config: MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 256,
            smt: false,
            track_dirty_pages: true,
            ..MachineConfig::default()
        },
        drives: vec![drive("rootfs", true), drive("data", false)],
        network_interfaces: vec![NetConfig {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: Some(MacAddr([0xaa, 0xfc, 0, 0, 0, 1])),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        }],
        logger: Some(LoggerConfig {
            log_path: Some("/tmp/log".into()),
            level: Some(kiln::config::LogLevel::Info),
            ..Default::default()
        }),
        metrics: Some(MetricsConfig {
            metrics_path: "/tmp/metrics".into(),
        }),
    };
    let minimal = VmConfig {
        boot_source: BootSourceConfig {
            kernel_image_path: kiln::config::BUILTIN_KERNEL.into(),
            ..Default::default()
        },
        ..Default::default()
    };
    vec![full, minimal]
}

fn config_seeds(o: &mut Out) {
    for (i, c) in configs().iter().enumerate() {
        let json = serde_json::to_string_pretty(c).expect("serialize");
        kiln_fuzz::config::run(json.as_bytes());
        o.put("config_json", &format!("config-{i}"), json.as_bytes());
    }
}

fn api_seeds(o: &mut Out) {
    let c = &configs()[0];
    let actions = vec![
        VmmAction::GetInstanceInfo,
        VmmAction::GetVersion,
        VmmAction::PutMachineConfig(c.machine_config.clone()),
        VmmAction::PatchMachineConfig(MachineConfigUpdate {
            vcpu_count: Some(4),
            ..Default::default()
        }),
        VmmAction::PutBootSource(c.boot_source.clone()),
        VmmAction::PutDrive(c.drives[0].clone()),
        VmmAction::PatchDrive(DriveUpdate {
            drive_id: "rootfs".into(),
            path_on_host: Some("/x".into()),
            rate_limiter: None,
        }),
        VmmAction::PutNetworkInterface(c.network_interfaces[0].clone()),
        VmmAction::PutLogger(c.logger.clone().expect("a logger")),
        VmmAction::PutMetrics(c.metrics.clone().expect("metrics")),
        VmmAction::InstanceStart,
        VmmAction::Pause,
        VmmAction::GetVmConfig,
    ];
    let mut stream = Vec::new();
    for (i, a) in actions.iter().enumerate() {
        let (method, path, body) = api::request_for(a);
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
        if !body.is_empty() {
            req += &format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            );
        }
        req += "\r\n";
        req += &body;
        let one = api::Input {
            chunk: 7,
            limit: 0,
            bytes: req.clone().into_bytes(),
        };
        api::run(&one);
        o.put("api_http", &format!("request-{i}"), &one.to_bytes());
        stream.extend_from_slice(req.as_bytes());
    }
    let all = api::Input {
        chunk: 0,
        limit: 0,
        bytes: stream,
    };
    api::run(&all);
    o.put("api_http", "pipelined", &all.to_bytes());
}

fn jailer_seeds(o: &mut Out) {
    use jailer::{Arg, FLAGS, Input};
    let flag = |f: &str| Arg::Flag(FLAGS.iter().position(|x| *x == f).expect("a known flag") as u8);
    let raw = |s: &str| Arg::Raw(s.as_bytes().to_vec());
    let args = vec![
        flag("--id"),
        raw("vm-1"),
        flag("--exec-file"),
        raw("/usr/bin/kiln"),
        flag("--uid"),
        raw("123"),
        flag("--gid"),
        raw("100"),
        flag("--cgroup"),
        raw("cpu.shares=512"),
        flag("--cgroup-version"),
        raw("2"),
        flag("--parent-cgroup"),
        raw("machine/vms"),
        flag("--resource-limit"),
        raw("no-file=64"),
        flag("--netns"),
        raw("/var/run/netns/n"),
        flag("--daemonize"),
        flag("--"),
        raw("--config-file"),
        raw("vm.json"),
    ];
    let mut elf = vec![0u8; 64 + 56];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
    elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
    elf[64] = 3; // PT_INTERP
    let s = Input { args, exec: elf };
    jailer::run(&s);
    o.put("jailer_args", "full", &s.to_bytes());
}

fn seccomp_seeds(o: &mut Out) {
    let shipped = include_str!("../../seccomp-filters/x86_64.json");
    kiln_fuzz::seccomp::run(shipped.as_bytes());
    o.put("seccomp_json", "x86_64", shipped.as_bytes());
    let small = r#"{"vmm":{"default_action":"trap","filter_action":"allow","filter":[{"syscall":"read"},{"syscall":"ioctl","args":[{"index":1,"type":"dword","op":"eq","val":21506}]}]},"vcpu":{"default_action":"kill_process","filter_action":"allow","filter":[{"syscall":"ioctl","args":[{"index":1,"type":"qword","op":{"masked_eq":255},"val":128}]}]},"api":{"default_action":{"errno":1},"filter_action":"allow","filter":[]}}"#;
    kiln_fuzz::seccomp::run(small.as_bytes());
    o.put("seccomp_json", "small", small.as_bytes());
}

/// `seeds --show <target> <file>`: prints a fuzz input as the target decodes it.
fn show(target: &str, file: &str) {
    let data = std::fs::read(file).expect("read the input");
    let mut u = arbitrary::Unstructured::new(&data);
    match target {
        "virtio_blk" | "virtio_blk_async" => println!("{:#?}", blk::Input::decode(&mut u)),
        "virtio_net" => println!("{:#?}", net::Input::decode(&mut u)),
        "virtio_mmio" => println!("{:#?}", mmio::Input::decode(&mut u)),
        "serial" => println!("{:#?}", serial::Input::decode(&mut u)),
        "i8042" => println!("{:#?}", i8042::Input::decode(&mut u)),
        "kernel_loader" => println!("{:#?}", loader::Input::decode(&mut u)),
        "api_http" => println!("{:#?}", api::Input::decode(&mut u)),
        "jailer_args" => println!("{:#?}", jailer::Input::decode(&mut u)),
        "rate_limiter" => println!("{:#?}", kiln_fuzz::rate_limiter::Input::decode(&mut u)),
        _ => println!("{}", String::from_utf8_lossy(&data)),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 4 && args[1] == "--show" {
        return show(&args[2], &args[3]);
    }
    let dir = std::env::args().nth(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds"),
        PathBuf::from,
    );
    let mut o = Out { dir, count: 0 };
    blk_seeds(&mut o);
    net_seeds(&mut o);
    mmio_seeds(&mut o);
    serial_seeds(&mut o);
    i8042_seeds(&mut o);
    loader_seeds(&mut o);
    config_seeds(&mut o);
    api_seeds(&mut o);
    jailer_seeds(&mut o);
    seccomp_seeds(&mut o);
    rate_limiter_seeds(&mut o);
    println!("{} seeds written to {}", o.count, o.dir.display());
}
