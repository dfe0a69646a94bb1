//! The control API: Firecracker's HTTP/1.1 + JSON interface on a Unix socket.
//!
//! - `http.rs`: parsing requests (httparse) and writing responses;
//! - `routes.rs`: method + path + body → a typed [`VmmAction`], with Firecracker's checks;
//! - `actions.rs`: applying each [`VmmAction`] with Firecracker's pre-boot and post-boot rules;
//! - `server.rs`: the API thread (its own seccomp category), its connections, and the hand-off
//!   of each request to the VMM thread through a channel and an eventfd.
//!
//! The VMM thread answers every [`VmmAction`] with a [`VmmResponse`] (`actions.rs`); the API
//! thread writes it.
//!
//! Status codes: 204 (success without data), 200 + JSON (GETs), 400 + `fault_message` for
//! every request error (routing, body, ids, pre-/post-boot rules — Firecracker's codes and
//! messages), 413 for a body over `--http-api-max-payload-size` (Firecracker answers 400
//! there), 503 for a connection over the limit of 10 or once the VMM thread is gone. An
//! unknown path or a method a path does not take is a 400, as in Firecracker (not 405).

pub mod actions;
pub mod http;
pub mod routes;
pub mod server;

pub use http::DEFAULT_MAX_PAYLOAD;
pub use routes::route;
pub use server::{ApiBridge, ApiError, ApiMetrics, handle_bytes, start_api_server};

use serde::{Deserialize, Serialize};

use crate::config::{
    BootSourceConfig, DriveConfig, LoggerConfig, MachineConfig, MetricsConfig, NetConfig,
    RateLimiterConfig,
};

/// `PATCH /machine-config`: any subset of the machine configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// Number of vCPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_count: Option<u64>,
    /// Memory in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_size_mib: Option<u64>,
    /// SMT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// Dirty page tracking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// Huge pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<crate::config::HugePages>,
}

/// `PATCH /drives/{drive_id}` (after boot): a new backing file, new rate-limiter buckets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    /// The drive.
    pub drive_id: String,
    /// The new backing file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// New buckets: an absent bucket is kept, size or refill_time 0 removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// `PATCH /network-interfaces/{iface_id}` (after boot): new rate limiters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetUpdate {
    /// The interface.
    pub iface_id: String,
    /// New RX buckets (as for drives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// New TX buckets (as for drives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// What a client asked the VMM to do (after routing and body parsing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmAction {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /version`.
    GetVersion,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /boot-source`.
    PutBootSource(BootSourceConfig),
    /// `PUT /drives/{id}`.
    PutDrive(DriveConfig),
    /// `PATCH /drives/{id}`.
    PatchDrive(DriveUpdate),
    /// `PUT /network-interfaces/{id}`.
    PutNetworkInterface(NetConfig),
    /// `PATCH /network-interfaces/{id}`.
    PatchNetworkInterface(NetUpdate),
    /// `PUT /actions` `InstanceStart`.
    InstanceStart,
    /// `PUT /actions` `SendCtrlAltDel`.
    SendCtrlAltDel,
    /// `PUT /actions` `FlushMetrics`.
    FlushMetrics,
    /// `PATCH /vm` `Paused`.
    Pause,
    /// `PATCH /vm` `Resumed`.
    Resume,
    /// `GET /vm/config`.
    GetVmConfig,
    /// `PUT /logger`.
    PutLogger(LoggerConfig),
    /// `PUT /metrics`.
    PutMetrics(MetricsConfig),
    /// `PUT /snapshot/create`.
    CreateSnapshot(crate::snapshot::SnapshotCreateParams),
    /// `PUT /snapshot/load`.
    LoadSnapshot(crate::snapshot::SnapshotLoadParams),
    /// `PUT /migration/receive` (kiln extension).
    ReceiveMigration(crate::migration::ReceiveParams),
    /// `PUT /migration/send` (kiln extension).
    SendMigration(crate::migration::SendParams),
}

/// The VMM's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmResponse {
    /// 204 No Content.
    NoContent,
    /// 200 OK with a JSON body.
    Json(String),
    /// An error: status code and `fault_message`.
    Error(u16, String),
}

impl VmmResponse {
    /// A 400 Bad Request with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        VmmResponse::Error(400, message.into())
    }
}

/// Firecracker's message for a pre-boot-only request after boot.
pub const ERR_AFTER_BOOT: &str =
    "The requested operation is not supported after starting the microVM.";
/// Firecracker's message for a post-boot-only request before boot.
pub const ERR_BEFORE_BOOT: &str =
    "The requested operation is not supported before starting the microVM.";
