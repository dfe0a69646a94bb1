//! The VM's resources before boot (Firecracker's "VM resources"): what the configuration
//! file or the API has set so far, each change validated as it is made, and the
//! [`VmConfig`] the builder boots from.

use serde_json::json;

use crate::api::MachineConfigUpdate;
use crate::config::{
    BUILTIN_KERNEL, BootSourceConfig, ConfigError, DriveConfig, LoggerConfig, MachineConfig,
    MetricsConfig, NetConfig, VmConfig, validate_boot_source, validate_drives, validate_machine,
    validate_net,
};

/// Why a change to the resources was refused. Every message names the field.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    /// The value is invalid (range, consistency, schema).
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// A file the configuration names cannot be opened.
    #[error("{field}: {path}: {source}")]
    File {
        /// The field, e.g. `boot-source.kernel_image_path`.
        field: &'static str,
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// What has been configured so far.
#[derive(Clone, Debug, Default)]
pub struct VmResources {
    /// `boot-source`.
    pub boot_source: Option<BootSourceConfig>,
    /// `machine-config`.
    pub machine: MachineConfig,
    /// `drives`.
    pub drives: Vec<DriveConfig>,
    /// `network-interfaces`.
    pub nets: Vec<NetConfig>,
    /// `logger`.
    pub logger: Option<LoggerConfig>,
    /// `metrics`.
    pub metrics: Option<MetricsConfig>,
}

impl VmResources {
    /// The resources a (validated) configuration file describes.
    pub fn from_config(config: VmConfig) -> Self {
        VmResources {
            boot_source: Some(config.boot_source),
            machine: config.machine_config,
            drives: config.drives,
            nets: config.network_interfaces,
            logger: config.logger,
            metrics: config.metrics,
        }
    }

    /// The configuration to boot, once a kernel is set.
    pub fn to_config(&self) -> Option<VmConfig> {
        Some(VmConfig {
            boot_source: self.boot_source.clone()?,
            machine_config: self.machine.clone(),
            drives: self.drives.clone(),
            network_interfaces: self.nets.clone(),
            logger: self.logger.clone(),
            metrics: self.metrics.clone(),
        })
    }

    /// `GET /vm/config`: the configuration in Firecracker's full-configuration shape, which
    /// is also a valid config file.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = json!({
            "machine-config": self.machine,
            "drives": self.drives,
            "network-interfaces": self.nets,
        });
        if let Some(b) = &self.boot_source {
            v["boot-source"] = json!(b);
        }
        if let Some(l) = &self.logger {
            v["logger"] = json!(l);
        }
        if let Some(m) = &self.metrics {
            v["metrics"] = json!(m);
        }
        v
    }

    /// `PUT /machine-config`.
    pub fn put_machine(&mut self, m: MachineConfig) -> Result<(), ResourceError> {
        validate_machine(&m)?;
        self.machine = m;
        Ok(())
    }

    /// `PATCH /machine-config`: the fields given replace the current ones.
    pub fn patch_machine(&mut self, u: MachineConfigUpdate) -> Result<(), ResourceError> {
        let mut m = self.machine.clone();
        if let Some(v) = u.vcpu_count {
            m.vcpu_count = v;
        }
        if let Some(v) = u.mem_size_mib {
            m.mem_size_mib = v;
        }
        if let Some(v) = u.smt {
            m.smt = v;
        }
        if let Some(v) = u.track_dirty_pages {
            m.track_dirty_pages = v;
        }
        if let Some(v) = u.huge_pages {
            m.huge_pages = v;
        }
        self.put_machine(m)
    }

    /// `PUT /boot-source`. Files that cannot be opened are refused now rather than at
    /// `InstanceStart`.
    pub fn put_boot_source(&mut self, b: BootSourceConfig) -> Result<(), ResourceError> {
        validate_boot_source(&b)?;
        if b.kernel_image_path != BUILTIN_KERNEL {
            openable("boot-source.kernel_image_path", &b.kernel_image_path)?;
        }
        if let Some(p) = &b.initrd_path {
            openable("boot-source.initrd_path", p)?;
        }
        self.boot_source = Some(b);
        Ok(())
    }

    /// `PUT /drives/{id}`: adds the drive, or replaces the one with the same id.
    pub fn put_drive(&mut self, d: DriveConfig) -> Result<(), ResourceError> {
        let mut drives = self.drives.clone();
        match drives.iter_mut().find(|x| x.drive_id == d.drive_id) {
            Some(slot) => *slot = d,
            None => drives.push(d),
        }
        validate_drives(&drives)?;
        self.drives = drives;
        Ok(())
    }

    /// `PUT /network-interfaces/{id}`: adds the interface, or replaces the one with the
    /// same id.
    pub fn put_net(&mut self, n: NetConfig) -> Result<(), ResourceError> {
        let mut nets = self.nets.clone();
        match nets.iter_mut().find(|x| x.iface_id == n.iface_id) {
            Some(slot) => *slot = n,
            None => nets.push(n),
        }
        validate_net(&nets)?;
        self.nets = nets;
        Ok(())
    }

    /// The position of drive `id` in `drives`.
    pub fn drive_index(&self, id: &str) -> Option<usize> {
        self.drives.iter().position(|d| d.drive_id == id)
    }

    /// Where interface `id` is in `nets`.
    pub fn net_index(&self, id: &str) -> Option<usize> {
        self.nets.iter().position(|n| n.iface_id == id)
    }

    /// Whether interface `id` is configured.
    pub fn has_net(&self, id: &str) -> bool {
        self.nets.iter().any(|n| n.iface_id == id)
    }
}

fn openable(field: &'static str, path: &str) -> Result<(), ResourceError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|source| ResourceError::File {
            field,
            path: path.to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheType;

    fn drive(id: &str, root: bool) -> DriveConfig {
        DriveConfig {
            drive_id: id.into(),
            path_on_host: "/dev/null".into(),
            is_root_device: root,
            is_read_only: true,
            partuuid: None,
            cache_type: CacheType::Unsafe,
            io_engine: None,
            rate_limiter: None,
        }
    }

    #[test]
    fn nothing_to_boot_without_a_kernel() {
        let r = VmResources::default();
        assert!(r.to_config().is_none());
        assert!(r.to_json().get("boot-source").is_none());
    }

    #[test]
    fn boot_source_files_must_open() {
        let mut r = VmResources::default();
        let b = BootSourceConfig {
            kernel_image_path: "/nonexistent/vmlinux".into(),
            ..Default::default()
        };
        let e = r.put_boot_source(b).unwrap_err().to_string();
        assert!(e.starts_with("boot-source.kernel_image_path: /nonexistent/vmlinux"));
        let b = BootSourceConfig {
            kernel_image_path: BUILTIN_KERNEL.into(),
            initrd_path: Some("/nonexistent/initrd".into()),
            ..Default::default()
        };
        let e = r.put_boot_source(b).unwrap_err().to_string();
        assert!(e.starts_with("boot-source.initrd_path: /nonexistent/initrd"));
        assert!(r.boot_source.is_none());
        let b = BootSourceConfig {
            kernel_image_path: BUILTIN_KERNEL.into(),
            ..Default::default()
        };
        r.put_boot_source(b).unwrap();
        assert_eq!(r.to_config().unwrap().drives.len(), 0);
    }

    #[test]
    fn machine_patch_keeps_the_rest_and_is_validated() {
        let mut r = VmResources::default();
        r.patch_machine(MachineConfigUpdate {
            mem_size_mib: Some(256),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(r.machine.mem_size_mib, 256);
        assert_eq!(r.machine.vcpu_count, 1);
        let e = r
            .patch_machine(MachineConfigUpdate {
                vcpu_count: Some(0),
                ..Default::default()
            })
            .unwrap_err();
        assert!(
            e.to_string().starts_with("machine-config.vcpu_count"),
            "{e}"
        );
        assert_eq!(r.machine.vcpu_count, 1, "a refused patch changes nothing");
    }

    #[test]
    fn drives_replace_by_id_and_a_second_root_is_refused() {
        let mut r = VmResources::default();
        r.put_drive(drive("a", true)).unwrap();
        r.put_drive(drive("b", false)).unwrap();
        let mut a2 = drive("a", true);
        a2.is_read_only = false;
        r.put_drive(a2).unwrap();
        assert_eq!(r.drives.len(), 2);
        assert!(!r.drives[0].is_read_only);
        assert!(r.put_drive(drive("c", true)).is_err());
        assert_eq!(r.drives.len(), 2, "a refused drive changes nothing");
        assert_eq!(r.drive_index("b"), Some(1));
        assert_eq!(r.drive_index("z"), None);
    }
}
