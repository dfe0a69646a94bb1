#![allow(clippy::unwrap_used)]

use std::io::Write;

use serde_json::Value;

use super::*;
use crate::api::{DriveUpdate, MachineConfigUpdate, NetUpdate};
use crate::config::{
    BUILTIN_KERNEL, BootSourceConfig, CacheType, DriveConfig, MachineConfig, NetConfig,
    RateLimiterConfig,
};
use crate::rate_limiter::LimiterUpdate;
use crate::snapshot::{SnapshotCreateParams, SnapshotLoadParams};

/// A VM stand-in that records what it was asked.
#[derive(Default)]
struct FakeVm {
    paused: bool,
    pause_fails: bool,
    keyboard_full: bool,
    swapped: Vec<(String, u64)>,
    ctrl_alt_del: u32,
    snapshots: Vec<String>,
    limited: Vec<(String, LimiterUpdate)>,
}

impl Machine for FakeVm {
    fn is_paused(&self) -> bool {
        self.paused
    }
    fn pause(&mut self) -> Result<(), VmmError> {
        if self.pause_fails {
            return Err(VmmError::VcpuGone);
        }
        self.paused = true;
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmmError> {
        self.paused = false;
        Ok(())
    }
    fn send_ctrl_alt_del(&mut self) -> Result<(), VmmError> {
        if self.keyboard_full {
            return Err(VmmError::I8042(
                crate::devices::i8042::I8042Error::BufferFull,
            ));
        }
        self.ctrl_alt_del += 1;
        Ok(())
    }
    fn swap_drive(&mut self, drive_id: &str, disk: DiskFile) -> Result<(), VmmError> {
        self.swapped.push((drive_id.to_string(), disk.sectors()));
        Ok(())
    }
    fn update_drive_limiter(
        &mut self,
        drive_id: &str,
        update: &LimiterUpdate,
    ) -> Result<(), VmmError> {
        self.limited.push((drive_id.to_string(), update.clone()));
        Ok(())
    }
    fn update_net_limiters(
        &mut self,
        iface_id: &str,
        rx: &LimiterUpdate,
        tx: &LimiterUpdate,
    ) -> Result<(), VmmError> {
        self.limited.push((format!("{iface_id}/rx"), rx.clone()));
        self.limited.push((format!("{iface_id}/tx"), tx.clone()));
        Ok(())
    }
    fn metrics_sections(&self) -> Vec<Section> {
        vec![("vcpu".into(), json!({"exit_io_out": 7}))]
    }
    fn create_snapshot(
        &mut self,
        params: &SnapshotCreateParams,
        _config: &VmConfig,
        _key: Option<&Key>,
    ) -> Result<(), SnapshotError> {
        self.snapshots.push(params.snapshot_path.clone());
        Ok(())
    }
}

struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("kiln-actions-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    fn file(&self, name: &str, len: usize) -> String {
        let p = self.0.join(name);
        std::fs::File::create(&p)
            .unwrap()
            .write_all(&vec![0u8; len])
            .unwrap();
        p.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn drive(id: &str, path: &str) -> DriveConfig {
    DriveConfig {
        drive_id: id.into(),
        path_on_host: path.into(),
        is_root_device: false,
        is_read_only: false,
        partuuid: None,
        cache_type: CacheType::Unsafe,
        io_engine: None,
        rate_limiter: None,
    }
}

fn net(id: &str) -> NetConfig {
    NetConfig {
        iface_id: id.into(),
        host_dev_name: "tap-x".into(),
        guest_mac: None,
        rx_rate_limiter: None,
        tx_rate_limiter: None,
    }
}

fn limiter() -> RateLimiterConfig {
    serde_json::from_str(r#"{"ops": {"size": 1, "refill_time": 1}}"#).unwrap()
}

/// One instance of every action.
fn every_action() -> Vec<VmmAction> {
    vec![
        VmmAction::GetInstanceInfo,
        VmmAction::GetVersion,
        VmmAction::GetMachineConfig,
        VmmAction::PutMachineConfig(MachineConfig::default()),
        VmmAction::PatchMachineConfig(MachineConfigUpdate {
            vcpu_count: Some(2),
            ..Default::default()
        }),
        VmmAction::PutBootSource(BootSourceConfig {
            kernel_image_path: BUILTIN_KERNEL.into(),
            ..Default::default()
        }),
        VmmAction::PutDrive(drive("d", "/dev/null")),
        VmmAction::PatchDrive(DriveUpdate {
            drive_id: "d".into(),
            path_on_host: None,
            rate_limiter: None,
        }),
        VmmAction::PutNetworkInterface(net("n")),
        VmmAction::PatchNetworkInterface(NetUpdate {
            iface_id: "n".into(),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        }),
        VmmAction::InstanceStart,
        VmmAction::SendCtrlAltDel,
        VmmAction::FlushMetrics,
        VmmAction::Pause,
        VmmAction::Resume,
        VmmAction::GetVmConfig,
        VmmAction::PutLogger(LoggerConfig::default()),
        VmmAction::PutMetrics(MetricsConfig {
            metrics_path: "/nonexistent/dir/metrics".into(),
        }),
        VmmAction::CreateSnapshot(create_params()),
        VmmAction::LoadSnapshot(load_params()),
    ]
}

fn create_params() -> SnapshotCreateParams {
    serde_json::from_str(r#"{"snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m"}"#).unwrap()
}

fn load_params() -> SnapshotLoadParams {
    serde_json::from_str(r#"{"snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m"}"#).unwrap()
}

fn respond(outcome: Outcome) -> VmmResponse {
    match outcome {
        Outcome::Respond(r) => r,
        Outcome::Start(_) | Outcome::Restore(_) | Outcome::Receive(_) => VmmResponse::NoContent,
    }
}

fn json_of(r: &VmmResponse) -> Value {
    match r {
        VmmResponse::Json(s) => serde_json::from_str(s).unwrap(),
        other => panic!("expected 200 + JSON, got {other:?}"),
    }
}

/// Firecracker's table, written out: the actions refused before boot and after boot.
#[test]
fn the_rule_table() {
    let before_only = [
        "PutMachineConfig",
        "PatchMachineConfig",
        "PutBootSource",
        "PutDrive",
        "PutNetworkInterface",
        "InstanceStart",
        "PutLogger",
        "PutMetrics",
        "LoadSnapshot",
    ];
    let after_only = [
        "PatchDrive",
        "PatchNetworkInterface",
        "SendCtrlAltDel",
        "Pause",
        "Resume",
        "CreateSnapshot",
    ];
    for action in every_action() {
        let name = format!("{action:?}");
        let name = name.split(['(', ' ']).next().unwrap().to_string();
        let expected = if before_only.contains(&name.as_str()) {
            When::BeforeBoot
        } else if after_only.contains(&name.as_str()) {
            When::AfterBoot
        } else {
            When::Always
        };
        assert_eq!(when(&action), expected, "{name}");

        // And the handler applies it: the refused side answers 400 with Firecracker's text.
        let mut h = ActionHandler::new("t".into());
        let before = respond(h.handle_preboot(action.clone()));
        if expected == When::AfterBoot {
            assert_eq!(
                before,
                VmmResponse::Error(400, ERR_BEFORE_BOOT.into()),
                "{name}"
            );
        } else {
            assert_ne!(
                before,
                VmmResponse::Error(400, ERR_BEFORE_BOOT.into()),
                "{name}"
            );
        }
        let mut h = ActionHandler::new("t".into());
        let after = h.handle_running(action, &mut FakeVm::default());
        if expected == When::BeforeBoot {
            assert_eq!(
                after,
                VmmResponse::Error(400, ERR_AFTER_BOOT.into()),
                "{name}"
            );
        } else {
            assert_ne!(
                after,
                VmmResponse::Error(400, ERR_AFTER_BOOT.into()),
                "{name}"
            );
            assert!(
                !matches!(after, VmmResponse::Error(500, _)),
                "{name}: {after:?}"
            );
        }
    }
}

#[test]
fn instance_info_names_the_state() {
    let mut h = ActionHandler::new("vm-7".into());
    let info = json_of(&respond(h.handle_preboot(VmmAction::GetInstanceInfo)));
    assert_eq!(info["id"], "vm-7");
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["app_name"], "kiln");
    assert_eq!(info["vmm_version"], FIRECRACKER_API_VERSION);
    assert_eq!(info["kiln_version"], VERSION);
    let mut vm = FakeVm::default();
    let info = json_of(&h.handle_running(VmmAction::GetInstanceInfo, &mut vm));
    assert_eq!(info["state"], "Running");
    assert_eq!(
        h.handle_running(VmmAction::Pause, &mut vm),
        VmmResponse::NoContent
    );
    let info = json_of(&h.handle_running(VmmAction::GetInstanceInfo, &mut vm));
    assert_eq!(info["state"], "Paused");
    assert_eq!(
        h.handle_running(VmmAction::Resume, &mut vm),
        VmmResponse::NoContent
    );
    let info = json_of(&h.handle_running(VmmAction::GetInstanceInfo, &mut vm));
    assert_eq!(info["state"], "Running");
    let version = json_of(&respond(h.handle_preboot(VmmAction::GetVersion)));
    assert_eq!(version["firecracker_version"], FIRECRACKER_API_VERSION);
    assert_eq!(version["kiln_version"], VERSION);
}

#[test]
fn a_failed_pause_is_a_400() {
    let mut h = ActionHandler::new("t".into());
    let mut vm = FakeVm {
        pause_fails: true,
        ..Default::default()
    };
    assert_eq!(
        h.handle_running(VmmAction::Pause, &mut vm),
        VmmResponse::Error(
            400,
            "The microVM could not be paused: a vCPU has stopped.".into()
        )
    );
}

#[test]
fn ctrl_alt_del_reaches_the_keyboard_or_says_why_not() {
    let mut h = ActionHandler::new("t".into());
    let mut vm = FakeVm::default();
    assert_eq!(
        h.handle_running(VmmAction::SendCtrlAltDel, &mut vm),
        VmmResponse::NoContent
    );
    assert_eq!(vm.ctrl_alt_del, 1);
    vm.keyboard_full = true;
    assert_eq!(
        h.handle_running(VmmAction::SendCtrlAltDel, &mut vm),
        VmmResponse::Error(400, "the i8042 output buffer is full".into())
    );
}

#[test]
fn instance_start_needs_a_kernel_then_hands_the_config_over() {
    let mut h = ActionHandler::new("t".into());
    assert_eq!(
        respond(h.handle_preboot(VmmAction::InstanceStart)),
        VmmResponse::Error(
            400,
            "Cannot start the microVM: Cannot start microvm without kernel configuration.".into()
        )
    );
    let boot = BootSourceConfig {
        kernel_image_path: BUILTIN_KERNEL.into(),
        ..Default::default()
    };
    assert_eq!(
        respond(h.handle_preboot(VmmAction::PutBootSource(boot))),
        VmmResponse::NoContent
    );
    assert_eq!(
        respond(
            h.handle_preboot(VmmAction::PatchMachineConfig(MachineConfigUpdate {
                mem_size_mib: Some(64),
                ..Default::default()
            }))
        ),
        VmmResponse::NoContent
    );
    match h.handle_preboot(VmmAction::InstanceStart) {
        Outcome::Start(config) => {
            assert_eq!(config.boot_source.kernel_image_path, BUILTIN_KERNEL);
            assert_eq!(config.machine_config.mem_size_mib, 64);
        }
        other => panic!("expected a start, got {other:?}"),
    }
    assert_eq!(ActionHandler::started(Ok(())), VmmResponse::NoContent);
    assert_eq!(
        ActionHandler::started(Err(StartError::NoBuiltinKernel)),
        VmmResponse::Error(
            400,
            "Cannot start the microVM: boot-source.kernel_image_path: this kiln was built \
             without the test guest"
                .into()
        )
    );
}

#[test]
fn invalid_configuration_is_a_400_naming_the_field() {
    let mut h = ActionHandler::new("t".into());
    let r = respond(h.handle_preboot(VmmAction::PutMachineConfig(MachineConfig {
        vcpu_count: 0,
        ..Default::default()
    })));
    assert!(
        matches!(&r, VmmResponse::Error(400, m) if m.starts_with("machine-config.vcpu_count")),
        "{r:?}"
    );
    let r = respond(h.handle_preboot(VmmAction::PutDrive(drive("bad/id", "/dev/null"))));
    assert!(
        matches!(&r, VmmResponse::Error(400, m) if m.starts_with("drives[0].drive_id")),
        "{r:?}"
    );
    let r = respond(h.handle_preboot(VmmAction::PutMetrics(MetricsConfig {
        metrics_path: "/nonexistent/dir/m".into(),
    })));
    assert!(
        matches!(&r, VmmResponse::Error(400, m) if m.starts_with("metrics_path /nonexistent/dir/m")),
        "{r:?}"
    );
    let r = respond(h.handle_preboot(VmmAction::PutLogger(LoggerConfig {
        log_path: Some("/nonexistent/dir/log".into()),
        ..Default::default()
    })));
    assert!(
        matches!(&r, VmmResponse::Error(400, m) if m.starts_with("log_path /nonexistent/dir/log")),
        "{r:?}"
    );
    // Nothing refused made it into the configuration.
    let config = json_of(&respond(h.handle_preboot(VmmAction::GetVmConfig)));
    assert_eq!(config["drives"], json!([]));
    assert_eq!(config["machine-config"]["vcpu_count"], 1);
    assert!(config.get("metrics").is_none() && config.get("logger").is_none());
}

#[test]
fn drive_patch_after_boot() {
    let dir = Scratch::new("patch");
    let old = dir.file("old.img", 512);
    let new = dir.file("new.img", 4096);
    let mut h = ActionHandler::new("t".into());
    assert_eq!(
        respond(h.handle_preboot(VmmAction::PutDrive(drive("d", &old)))),
        VmmResponse::NoContent
    );
    let mut vm = FakeVm::default();
    let patch = |id: &str, path: Option<&str>, rl: bool| {
        VmmAction::PatchDrive(DriveUpdate {
            drive_id: id.into(),
            path_on_host: path.map(Into::into),
            rate_limiter: rl.then(limiter),
        })
    };
    assert_eq!(
        h.handle_running(patch("x", Some(&new), false), &mut vm),
        VmmResponse::Error(400, "no drive `x`".into())
    );
    assert_eq!(
        h.handle_running(patch("d", None, false), &mut vm),
        VmmResponse::NoContent
    );
    assert!(vm.limited.is_empty());
    let r = h.handle_running(patch("d", Some("/nonexistent/img"), false), &mut vm);
    assert!(
        matches!(&r, VmmResponse::Error(400, m) if m.starts_with("drives[0].path_on_host: /nonexistent/img")),
        "{r:?}"
    );
    assert!(vm.swapped.is_empty());
    assert_eq!(
        h.handle_running(patch("d", Some(&new), false), &mut vm),
        VmmResponse::NoContent
    );
    assert_eq!(vm.swapped, vec![("d".to_string(), 8)]);
    let config = json_of(&h.handle_running(VmmAction::GetVmConfig, &mut vm));
    assert_eq!(config["drives"][0]["path_on_host"], new.as_str());
}

#[test]
fn rate_limiter_patches_follow_firecracker_rules() {
    let dir = Scratch::new("patch-rl");
    let img = dir.file("d.img", 512);
    let mut h = ActionHandler::new("t".into());
    let mut d = drive("d", &img);
    d.rate_limiter = Some(
        serde_json::from_str(
            r#"{"bandwidth": {"size": 1000, "refill_time": 100}, "ops": {"size": 10, "refill_time": 10}}"#,
        )
        .unwrap(),
    );
    respond(h.handle_preboot(VmmAction::PutDrive(d)));
    respond(h.handle_preboot(VmmAction::PutNetworkInterface(net("n"))));
    let mut vm = FakeVm::default();
    // Ops replaced (burst granted), bandwidth absent: kept.
    let rl: RateLimiterConfig =
        serde_json::from_str(r#"{"ops": {"size": 20, "one_time_burst": 5, "refill_time": 10}}"#)
            .unwrap();
    let patch = VmmAction::PatchDrive(DriveUpdate {
        drive_id: "d".into(),
        path_on_host: None,
        rate_limiter: Some(rl.clone()),
    });
    assert_eq!(h.handle_running(patch, &mut vm), VmmResponse::NoContent);
    assert_eq!(
        vm.limited,
        vec![("d".to_string(), LimiterUpdate::from_config(Some(&rl)))]
    );
    let config = json_of(&h.handle_running(VmmAction::GetVmConfig, &mut vm));
    assert_eq!(
        config["drives"][0]["rate_limiter"],
        json!({"bandwidth": {"size": 1000, "refill_time": 100},
               "ops": {"size": 20, "one_time_burst": 5, "refill_time": 10}})
    );
    // size 0 disables.
    let off: RateLimiterConfig =
        serde_json::from_str(r#"{"bandwidth": {"size": 0, "refill_time": 100}}"#).unwrap();
    let patch = VmmAction::PatchDrive(DriveUpdate {
        drive_id: "d".into(),
        path_on_host: None,
        rate_limiter: Some(off),
    });
    assert_eq!(h.handle_running(patch, &mut vm), VmmResponse::NoContent);
    let config = json_of(&h.handle_running(VmmAction::GetVmConfig, &mut vm));
    assert_eq!(
        config["drives"][0]["rate_limiter"],
        json!({"ops": {"size": 20, "one_time_burst": 5, "refill_time": 10}})
    );
    // Interfaces: RX and TX separately.
    let patch = VmmAction::PatchNetworkInterface(NetUpdate {
        iface_id: "n".into(),
        rx_rate_limiter: None,
        tx_rate_limiter: Some(limiter()),
    });
    assert_eq!(h.handle_running(patch, &mut vm), VmmResponse::NoContent);
    assert_eq!(vm.limited.len(), 4);
    assert!(vm.limited[2].1.is_keep());
    let config = json_of(&h.handle_running(VmmAction::GetVmConfig, &mut vm));
    assert_eq!(
        config["network-interfaces"][0]["tx_rate_limiter"],
        json!({"ops": {"size": 1, "refill_time": 1}})
    );
    assert!(
        config["network-interfaces"][0]
            .get("rx_rate_limiter")
            .is_none()
    );
}

#[test]
fn net_patch_after_boot() {
    let mut h = ActionHandler::new("t".into());
    assert_eq!(
        respond(h.handle_preboot(VmmAction::PutNetworkInterface(net("n")))),
        VmmResponse::NoContent
    );
    let mut vm = FakeVm::default();
    let patch = |id: &str, rl: bool| {
        VmmAction::PatchNetworkInterface(NetUpdate {
            iface_id: id.into(),
            rx_rate_limiter: rl.then(limiter),
            tx_rate_limiter: None,
        })
    };
    assert_eq!(
        h.handle_running(patch("m", false), &mut vm),
        VmmResponse::Error(400, "no network interface `m`".into())
    );
    assert_eq!(
        h.handle_running(patch("n", false), &mut vm),
        VmmResponse::NoContent
    );
    assert!(vm.limited.is_empty());
    assert_eq!(
        h.handle_running(patch("n", true), &mut vm),
        VmmResponse::NoContent
    );
    assert_eq!(vm.limited.len(), 2);
}

#[test]
fn flush_metrics_needs_a_destination_and_writes_the_vm_sections() {
    let dir = Scratch::new("metrics");
    let path = dir.0.join("m.json");
    let mut h = ActionHandler::new("t".into());
    let mut vm = FakeVm::default();
    assert_eq!(
        h.handle_running(VmmAction::FlushMetrics, &mut vm),
        VmmResponse::Error(
            400,
            "The metrics system is not initialized: configure it with PUT /metrics.".into()
        )
    );
    h.set_metrics_path(&path).unwrap();
    h.set_extra_metrics(Box::new(|| vec![("api_server".into(), json!({"n": 1}))]));
    assert_eq!(
        respond(h.handle_preboot(VmmAction::FlushMetrics)),
        VmmResponse::NoContent
    );
    assert_eq!(
        h.handle_running(VmmAction::FlushMetrics, &mut vm),
        VmmResponse::NoContent
    );
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].get("vcpu").is_none(), "no VM before boot");
    assert_eq!(lines[0]["api_server"]["n"], 1);
    assert_eq!(lines[1]["vcpu"]["exit_io_out"], 7);
    assert_eq!(lines[1]["api_server"]["n"], 1);
    let config = json_of(&respond(h.handle_preboot(VmmAction::GetVmConfig)));
    assert_eq!(
        config["metrics"]["metrics_path"],
        path.display().to_string()
    );
}

#[test]
fn snapshots_need_a_paused_vm_and_a_fresh_process() {
    let mut h = ActionHandler::new("t".into());
    let mut vm = FakeVm::default();
    let r = h.handle_running(VmmAction::CreateSnapshot(create_params()), &mut vm);
    assert!(
        matches!(&r, VmmResponse::Error(400, m) if m.contains("must be paused")),
        "{r:?}"
    );
    assert!(vm.snapshots.is_empty());
    // Configured (a kernel set): create works once paused.
    assert_eq!(
        respond(h.handle_preboot(VmmAction::PutBootSource(BootSourceConfig {
            kernel_image_path: BUILTIN_KERNEL.into(),
            ..Default::default()
        }))),
        VmmResponse::NoContent
    );
    assert_eq!(
        h.handle_running(VmmAction::Pause, &mut vm),
        VmmResponse::NoContent
    );
    assert_eq!(
        h.handle_running(VmmAction::CreateSnapshot(create_params()), &mut vm),
        VmmResponse::NoContent
    );
    assert_eq!(vm.snapshots, ["/tmp/s"]);
    // A load after boot-specific configuration is refused with Firecracker's words.
    assert_eq!(
        respond(h.handle_preboot(VmmAction::LoadSnapshot(load_params()))),
        VmmResponse::Error(
            400,
            "Loading a microVM snapshot not allowed after configuring boot-specific resources."
                .into()
        )
    );
    // A fresh handler (logger and metrics may come first) hands the load over.
    let mut fresh = ActionHandler::new("t".into());
    let dir = Scratch::new("load");
    fresh.set_metrics_path(&dir.0.join("m")).unwrap();
    assert!(matches!(
        fresh.handle_preboot(VmmAction::LoadSnapshot(load_params())),
        Outcome::Restore(_)
    ));
}
