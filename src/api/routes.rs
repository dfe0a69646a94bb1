//! Method + path + body → [`VmmAction`], with Firecracker's checks and messages
//! (`src/firecracker/src/api_server/parsed_request.rs` and `request/*.rs`).
//!
//! Every error is a 400 with Firecracker's `fault_message`:
//! - an unknown path, or a method the path does not take:
//!   `Invalid request method and/or path: METHOD TOKEN.`, where TOKEN is the first path
//!   segment (Firecracker reports that segment, not the whole path);
//! - a GET with a body: `GET request cannot have a body.`; a PUT or PATCH without one (or
//!   `Content-Length: 0`): `Empty PUT request.` / `Empty PATCH request.` (also for
//!   `PATCH /machine-config` with `{}`);
//! - a body that is not JSON, is truncated, has an unknown field, a missing field or a value
//!   of the wrong type: `An error occurred when deserializing the json body of a request:
//!   ...`, naming the field where there is one;
//! - an id in the path that is missing or empty (`The ID cannot be empty.`), has characters
//!   other than alphanumerics and `_` (`API Resource IDs can only contain alphanumeric
//!   characters and underscores.`), or differs from the body's id (drives: `The id from the
//!   path does not match the id from the body!`; network interfaces: `The id from the path
//!   [a] does not match the id from the body [b]!`).
//!
//! Paths are split as Firecracker splits them: leading slashes are dropped, a trailing slash
//! is ignored (`/drives/rootfs/` is `/drives/rootfs`), segments after the ones an endpoint
//! reads are ignored, and a query string is not stripped (so `/machine-config?x=1` is an
//! unknown path). Whether an action is allowed before or after boot is the VMM's decision.

use serde::Deserialize;

use super::{DriveUpdate, MachineConfigUpdate, NetUpdate, VmmAction};
use crate::config::{
    BootSourceConfig, ConfigError, DriveConfig, LoggerConfig, MachineConfig, MetricsConfig,
    NetConfig, from_json,
};

/// Why a request gets no action: answered with its HTTP status and `fault_message`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// 400: an unknown path or method, a bad body, a bad or mismatched id.
    #[error("{0}")]
    BadRequest(String),
    /// A fault in the byte stream found by the HTTP parser (400, 413, ...).
    #[error("{message}")]
    Http {
        /// The status to answer.
        status: u16,
        /// The `fault_message`.
        message: String,
    },
}

impl RouteError {
    /// The HTTP status to answer.
    pub fn status(&self) -> u16 {
        match self {
            RouteError::BadRequest(_) => 400,
            RouteError::Http { status, .. } => *status,
        }
    }

    /// The `fault_message`.
    pub fn message(&self) -> &str {
        match self {
            RouteError::BadRequest(m) | RouteError::Http { message: m, .. } => m,
        }
    }
}

fn bad(message: impl Into<String>) -> RouteError {
    RouteError::BadRequest(message.into())
}

/// `PUT /actions` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: ActionType,
}

#[derive(Deserialize)]
enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
}

/// `PATCH /vm` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmStateBody {
    state: VmState,
}

#[derive(Deserialize)]
enum VmState {
    Paused,
    Resumed,
}

/// The absolute path of a request target, as Firecracker's HTTP library takes it:
/// `http://host[:port]/p` gives `/p`; a target that starts with neither gives "".
pub(crate) fn abs_path(target: &str) -> &str {
    if let Some(rest) = target.strip_prefix("http://") {
        rest.find('/').map_or("", |i| &rest[i..])
    } else if target.starts_with('/') {
        target
    } else {
        ""
    }
}

/// Routes one request. `body` is empty when the request had none.
pub fn route(method: &str, target: &str, body: &[u8]) -> Result<VmmAction, RouteError> {
    let path = abs_path(target);
    let mut tokens = path.trim_start_matches('/').split_terminator('/');
    let first = tokens.next().unwrap_or("");
    let body = (!body.is_empty()).then_some(body);
    match (method, first, body) {
        ("GET", "", None) => Ok(VmmAction::GetInstanceInfo),
        ("GET", "version", None) => Ok(VmmAction::GetVersion),
        ("GET", "vm", None) if tokens.next() == Some("config") => Ok(VmmAction::GetVmConfig),
        ("GET", "machine-config", None) => Ok(VmmAction::GetMachineConfig),
        ("GET", _, Some(_)) => Err(bad("GET request cannot have a body.")),
        ("PUT", "actions", Some(body)) => parse_put_actions(body),
        ("PUT", "boot-source", Some(body)) => {
            parse::<BootSourceConfig>(body).map(VmmAction::PutBootSource)
        }
        ("PUT", "drives", Some(body)) => {
            let id = checked_id(tokens.next())?;
            let drive: DriveConfig = parse(body)?;
            if drive.drive_id != id {
                return Err(bad(
                    "The id from the path does not match the id from the body!",
                ));
            }
            Ok(VmmAction::PutDrive(drive))
        }
        ("PUT", "logger", Some(body)) => parse::<LoggerConfig>(body).map(VmmAction::PutLogger),
        ("PUT", "machine-config", Some(body)) => {
            parse::<MachineConfig>(body).map(VmmAction::PutMachineConfig)
        }
        ("PUT", "metrics", Some(body)) => parse::<MetricsConfig>(body).map(VmmAction::PutMetrics),
        ("PUT", "network-interfaces", Some(body)) => {
            let id = checked_id(tokens.next())?;
            let iface: NetConfig = parse(body)?;
            if iface.iface_id != id {
                return Err(net_id_mismatch(id, &iface.iface_id));
            }
            Ok(VmmAction::PutNetworkInterface(iface))
        }
        ("PUT", "snapshot", Some(body)) => match tokens.next() {
            Some("create") => parse(body).map(VmmAction::CreateSnapshot),
            Some("load") => parse(body).map(VmmAction::LoadSnapshot),
            other => Err(bad(format!(
                "Invalid request method and/or path: PUT snapshot/{}.",
                other.unwrap_or("")
            ))),
        },
        ("PUT", "migration", Some(body)) => match tokens.next() {
            Some("receive") => parse(body).map(VmmAction::ReceiveMigration),
            Some("send") => parse(body).map(VmmAction::SendMigration),
            other => Err(bad(format!(
                "Invalid request method and/or path: PUT migration/{}.",
                other.unwrap_or("")
            ))),
        },
        (_, "vsock" | "balloon" | "mmds" | "entropy" | "hotplug" | "pmem" | "cpu-config", _) => {
            Err(bad(format!(
                "kiln has no {first} device: it offers only virtio-blk, virtio-net and the \
                 serial console (a deliberate limit of the attack surface)."
            )))
        }
        ("PUT", _, None) => Err(bad("Empty PUT request.")),
        ("PATCH", "drives", Some(body)) => {
            let id = checked_id(tokens.next())?;
            let update: DriveUpdate = parse(body)?;
            if update.drive_id != id {
                return Err(bad(
                    "The id from the path does not match the id from the body!",
                ));
            }
            Ok(VmmAction::PatchDrive(update))
        }
        ("PATCH", "machine-config", Some(body)) => {
            let update: MachineConfigUpdate = parse(body)?;
            if update == MachineConfigUpdate::default() {
                return Err(bad("Empty PATCH request."));
            }
            Ok(VmmAction::PatchMachineConfig(update))
        }
        ("PATCH", "network-interfaces", Some(body)) => {
            let id = checked_id(tokens.next())?;
            let update: NetUpdate = parse(body)?;
            if update.iface_id != id {
                return Err(net_id_mismatch(id, &update.iface_id));
            }
            Ok(VmmAction::PatchNetworkInterface(update))
        }
        ("PATCH", "vm", Some(body)) => match parse::<VmStateBody>(body)?.state {
            VmState::Paused => Ok(VmmAction::Pause),
            VmState::Resumed => Ok(VmmAction::Resume),
        },
        ("PATCH", _, None) => Err(bad("Empty PATCH request.")),
        (method, token, _) => Err(bad(format!(
            "Invalid request method and/or path: {method} {token}."
        ))),
    }
}

fn parse_put_actions(body: &[u8]) -> Result<VmmAction, RouteError> {
    Ok(match parse::<ActionBody>(body)?.action_type {
        ActionType::FlushMetrics => VmmAction::FlushMetrics,
        ActionType::InstanceStart => VmmAction::InstanceStart,
        ActionType::SendCtrlAltDel => VmmAction::SendCtrlAltDel,
    })
}

fn net_id_mismatch(path_id: &str, body_id: &str) -> RouteError {
    bad(format!(
        "The id from the path [{path_id}] does not match the id from the body [{body_id}]!"
    ))
}

/// Firecracker's id check for the id in a path.
fn checked_id(id: Option<&str>) -> Result<&str, RouteError> {
    match id {
        None | Some("") => Err(bad("The ID cannot be empty.")),
        Some(id) if !id.chars().all(|c| c == '_' || c.is_alphanumeric()) => Err(bad(
            "API Resource IDs can only contain alphanumeric characters and underscores.",
        )),
        Some(id) => Ok(id),
    }
}

/// Deserializes a body, with Firecracker's message prefix and the offending field's path.
fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, RouteError> {
    let fail = |detail: String| {
        bad(format!(
            "An error occurred when deserializing the json body of a request: {detail}."
        ))
    };
    // The whole body must be one JSON value: syntax errors, truncation and trailing bytes.
    serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(|e| fail(e.to_string()))?;
    let text = std::str::from_utf8(body).map_err(|e| fail(e.to_string()))?;
    from_json(text).map_err(|e| {
        fail(match e {
            ConfigError::Parse { path, message } if path == "config" => message,
            other => other.to_string(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CacheType, MacAddr};

    fn err(method: &str, path: &str, body: &str) -> String {
        match route(method, path, body.as_bytes()) {
            Err(RouteError::BadRequest(message)) => message,
            other => panic!("{method} {path} {body}: {other:?}"),
        }
    }

    #[test]
    fn gets() {
        assert_eq!(route("GET", "/", b""), Ok(VmmAction::GetInstanceInfo));
        assert_eq!(route("GET", "/version", b""), Ok(VmmAction::GetVersion));
        assert_eq!(route("GET", "/version/", b""), Ok(VmmAction::GetVersion));
        assert_eq!(route("GET", "//version", b""), Ok(VmmAction::GetVersion));
        assert_eq!(
            route("GET", "http://localhost/machine-config", b""),
            Ok(VmmAction::GetMachineConfig)
        );
        assert_eq!(route("GET", "/vm/config", b""), Ok(VmmAction::GetVmConfig));
        assert_eq!(route("GET", "/vm/config/", b""), Ok(VmmAction::GetVmConfig));
        assert_eq!(
            err("GET", "/vm", ""),
            "Invalid request method and/or path: GET vm."
        );
        assert_eq!(
            err("GET", "/machine-config", "{}"),
            "GET request cannot have a body."
        );
        assert_eq!(err("GET", "/nope", "{}"), "GET request cannot have a body.");
        assert_eq!(
            err("GET", "/drives/x", ""),
            "Invalid request method and/or path: GET drives."
        );
        assert_eq!(
            err("GET", "/machine-config?x=1", ""),
            "Invalid request method and/or path: GET machine-config?x=1."
        );
    }

    #[test]
    fn methods_and_empty_bodies() {
        assert_eq!(err("PUT", "/boot-source", ""), "Empty PUT request.");
        assert_eq!(err("PUT", "/nowhere", ""), "Empty PUT request.");
        assert_eq!(err("PATCH", "/vm", ""), "Empty PATCH request.");
        assert_eq!(
            err("PATCH", "/machine-config", "{}"),
            "Empty PATCH request."
        );
        assert_eq!(
            err("POST", "/actions", "{}"),
            "Invalid request method and/or path: POST actions."
        );
        assert_eq!(
            err("DELETE", "/drives/x", ""),
            "Invalid request method and/or path: DELETE drives."
        );
        assert_eq!(
            err("PUT", "/version", "{}"),
            "Invalid request method and/or path: PUT version."
        );
        assert_eq!(
            err("PATCH", "/boot-source", "{}"),
            "Invalid request method and/or path: PATCH boot-source."
        );
        assert!(
            err("PUT", "/snapshot/create", "{}")
                .starts_with("An error occurred when deserializing the json body of a request: missing field `snapshot_path`")
        );
        assert_eq!(
            err("PUT", "/snapshot/fork", "{}"),
            "Invalid request method and/or path: PUT snapshot/fork."
        );
    }

    #[test]
    fn snapshot_bodies_of_every_firecracker_version() {
        use crate::snapshot::{MemBackendType, SnapshotType};
        let VmmAction::CreateSnapshot(c) = route(
            "PUT",
            "/snapshot/create",
            br#"{"snapshot_path": "s", "mem_file_path": "m", "snapshot_type": "Diff", "version": "1.0.0"}"#,
        )
        .unwrap() else {
            panic!("not a create");
        };
        assert_eq!(c.snapshot_type, SnapshotType::Diff);
        let VmmAction::CreateSnapshot(c) = route(
            "PUT",
            "/snapshot/create",
            br#"{"snapshot_path": "s", "mem_file_path": "m"}"#,
        )
        .unwrap() else {
            panic!("not a create");
        };
        assert_eq!(c.snapshot_type, SnapshotType::Full, "Full is the default");
        // Old clients: mem_file_path and enable_diff_snapshots.
        let VmmAction::LoadSnapshot(l) = route(
            "PUT",
            "/snapshot/load",
            br#"{"snapshot_path": "s", "mem_file_path": "m", "enable_diff_snapshots": true, "resume_vm": true}"#,
        )
        .unwrap() else {
            panic!("not a load");
        };
        assert_eq!(l.mem_file_path.as_deref(), Some("m"));
        assert!(l.enable_diff_snapshots && l.resume_vm);
        // New clients: mem_backend, track_dirty_pages, network_overrides, clock_realtime.
        let VmmAction::LoadSnapshot(l) = route(
            "PUT",
            "/snapshot/load",
            br#"{"snapshot_path": "s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u.sock"},
                "track_dirty_pages": false, "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap9"}],
                "clock_realtime": true, "drive_overrides": [{"drive_id": "rootfs", "path_on_host": "/r.img"}]}"#,
        )
        .unwrap() else {
            panic!("not a load");
        };
        let backend = l.mem_backend.unwrap();
        assert_eq!(backend.backend_type, MemBackendType::Uffd);
        assert_eq!(l.network_overrides[0].host_dev_name, "tap9");
        assert_eq!(l.drive_overrides[0].path_on_host, "/r.img");
        assert!(
            err(
                "PUT",
                "/snapshot/load",
                r#"{"snapshot_path": "s", "bogus": 1}"#
            )
            .contains("unknown field `bogus`")
        );
    }

    #[test]
    fn devices_kiln_lacks_are_named() {
        for (method, path) in [
            ("PUT", "/vsock"),
            ("PUT", "/balloon"),
            ("GET", "/mmds"),
            ("PUT", "/entropy"),
        ] {
            let e = err(method, path, if method == "GET" { "" } else { "{}" });
            assert!(e.starts_with("kiln has no "), "{path}: {e}");
            assert!(e.contains(path.trim_start_matches('/')), "{path}: {e}");
        }
    }

    #[test]
    fn actions_and_vm_state() {
        for (body, action) in [
            (
                r#"{"action_type": "InstanceStart"}"#,
                VmmAction::InstanceStart,
            ),
            (
                r#"{"action_type": "SendCtrlAltDel"}"#,
                VmmAction::SendCtrlAltDel,
            ),
            (
                r#"{"action_type": "FlushMetrics"}"#,
                VmmAction::FlushMetrics,
            ),
        ] {
            assert_eq!(route("PUT", "/actions", body.as_bytes()), Ok(action));
        }
        let e = err("PUT", "/actions", r#"{"action_type": "Reboot"}"#);
        assert!(
            e.starts_with("An error occurred when deserializing the json body of a request: "),
            "{e}"
        );
        assert!(e.contains("unknown variant `Reboot`"), "{e}");
        assert!(e.ends_with('.'), "{e}");
        let e = err(
            "PUT",
            "/actions",
            r#"{"action_type": "FlushMetrics", "payload": 1}"#,
        );
        assert!(e.contains("unknown field `payload`"), "{e}");
        assert_eq!(
            route("PATCH", "/vm", br#"{"state": "Paused"}"#),
            Ok(VmmAction::Pause)
        );
        assert_eq!(
            route("PATCH", "/vm", br#"{"state": "Resumed"}"#),
            Ok(VmmAction::Resume)
        );
        assert!(err("PATCH", "/vm", r#"{"state": "Running"}"#).contains("unknown variant"));
        assert!(err("PATCH", "/vm", r#"{"invalid": "Paused"}"#).contains("unknown field"));
    }

    #[test]
    fn bodies_parse_into_config_types() {
        assert_eq!(
            route(
                "PUT",
                "/boot-source",
                br#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#
            ),
            Ok(VmmAction::PutBootSource(BootSourceConfig {
                kernel_image_path: "/k".into(),
                initrd_path: None,
                boot_args: Some("console=ttyS0".into()),
            }))
        );
        assert_eq!(
            route(
                "PUT",
                "/machine-config",
                br#"{"vcpu_count": 2, "mem_size_mib": 256}"#
            ),
            Ok(VmmAction::PutMachineConfig(MachineConfig {
                vcpu_count: 2,
                mem_size_mib: 256,
                ..MachineConfig::default()
            }))
        );
        assert!(
            err("PUT", "/machine-config", r#"{"vcpu_count": 2}"#)
                .contains("missing field `mem_size_mib`")
        );
        assert_eq!(
            route("PATCH", "/machine-config", br#"{"vcpu_count": 4}"#),
            Ok(VmmAction::PatchMachineConfig(MachineConfigUpdate {
                vcpu_count: Some(4),
                ..MachineConfigUpdate::default()
            }))
        );
        let Ok(VmmAction::PutDrive(d)) = route(
            "PUT",
            "/drives/rootfs",
            br#"{"drive_id": "rootfs", "path_on_host": "/d.img", "is_root_device": true, "cache_type": "Writeback"}"#,
        ) else {
            panic!("drive")
        };
        assert_eq!(
            (d.drive_id.as_str(), d.cache_type),
            ("rootfs", CacheType::Writeback)
        );
        assert_eq!(
            route(
                "PATCH",
                "/drives/rootfs/",
                br#"{"drive_id": "rootfs", "path_on_host": "/new.img"}"#
            ),
            Ok(VmmAction::PatchDrive(DriveUpdate {
                drive_id: "rootfs".into(),
                path_on_host: Some("/new.img".into()),
                rate_limiter: None,
            }))
        );
        let Ok(VmmAction::PutNetworkInterface(n)) = route(
            "PUT",
            "/network-interfaces/eth0",
            br#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:00:00:00:01"}"#,
        ) else {
            panic!("net")
        };
        assert_eq!(n.guest_mac, Some(MacAddr([6, 0, 0, 0, 0, 1])));
        assert_eq!(
            route(
                "PATCH",
                "/network-interfaces/eth0",
                br#"{"iface_id": "eth0"}"#
            ),
            Ok(VmmAction::PatchNetworkInterface(NetUpdate {
                iface_id: "eth0".into(),
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            }))
        );
        assert_eq!(
            route("PUT", "/logger", br#"{"level": "Debug"}"#),
            Ok(VmmAction::PutLogger(LoggerConfig {
                level: Some(crate::config::LogLevel::Debug),
                ..LoggerConfig::default()
            }))
        );
        assert_eq!(
            route("PUT", "/metrics", br#"{"metrics_path": "/m"}"#),
            Ok(VmmAction::PutMetrics(MetricsConfig {
                metrics_path: "/m".into()
            }))
        );
    }

    #[test]
    fn ids() {
        let drive = r#"{"drive_id": "a", "path_on_host": "/d", "is_root_device": false}"#;
        assert_eq!(
            err("PUT", "/drives/b", drive),
            "The id from the path does not match the id from the body!"
        );
        assert_eq!(err("PUT", "/drives", drive), "The ID cannot be empty.");
        assert_eq!(err("PUT", "/drives/", drive), "The ID cannot be empty.");
        assert_eq!(err("PUT", "/drives//a", drive), "The ID cannot be empty.");
        assert_eq!(
            err("PUT", "/drives/a-b", drive),
            "API Resource IDs can only contain alphanumeric characters and underscores."
        );
        assert_eq!(
            err("PUT", "/drives/a?x=1", drive),
            "API Resource IDs can only contain alphanumeric characters and underscores."
        );
        assert_eq!(
            err("PATCH", "/drives/b", r#"{"drive_id": "a"}"#),
            "The id from the path does not match the id from the body!"
        );
        assert_eq!(
            err(
                "PUT",
                "/network-interfaces/eth1",
                r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#
            ),
            "The id from the path [eth1] does not match the id from the body [eth0]!"
        );
        assert_eq!(
            err(
                "PATCH",
                "/network-interfaces/eth1",
                r#"{"iface_id": "eth0"}"#
            ),
            "The id from the path [eth1] does not match the id from the body [eth0]!"
        );
        // The id is checked before the body is parsed, as Firecracker does.
        assert_eq!(
            err("PUT", "/drives/a!", "garbage"),
            "API Resource IDs can only contain alphanumeric characters and underscores."
        );
    }

    #[test]
    fn bad_json() {
        let prefix = "An error occurred when deserializing the json body of a request: ";
        for body in [
            r#"{"kernel_image_path": "/k""#,
            r#"{"kernel_image_path": "/k"} trailing"#,
            r#"{"kernel_image_path": "/k"}{}"#,
            "not json",
            "[]",
            "null",
            r#"{"kernel_image_path": 5}"#,
            r#"{"kernel_image_path": "/k", "unknown": 1}"#,
            "\u{0}",
        ] {
            let e = err("PUT", "/boot-source", body);
            assert!(e.starts_with(prefix) && e.ends_with('.'), "{body}: {e}");
        }
        let e = err(
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/k", "unknown": 1}"#,
        );
        assert!(e.contains("unknown field `unknown`"), "{e}");
        // Nested errors name the field.
        let e = err(
            "PUT",
            "/drives/a",
            r#"{"drive_id": "a", "path_on_host": "/d", "is_root_device": false, "rate_limiter": {"ops": {"size": 1}}}"#,
        );
        assert!(e.contains("rate_limiter.ops"), "{e}");
        // Not UTF-8.
        let r = route("PUT", "/boot-source", b"{\"kernel_image_path\": \"\xff\"}");
        assert!(
            matches!(r, Err(RouteError::BadRequest(ref m)) if m.starts_with(prefix)),
            "{r:?}"
        );
    }

    #[test]
    fn absolute_paths() {
        assert_eq!(abs_path("http://localhost/a/b"), "/a/b");
        assert_eq!(abs_path("http://localhost:80/a"), "/a");
        assert_eq!(abs_path("http://localhost"), "");
        assert_eq!(abs_path("/a"), "/a");
        assert_eq!(abs_path("a"), "");
        assert_eq!(abs_path("*"), "");
    }
}
