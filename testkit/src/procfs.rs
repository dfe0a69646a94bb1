//! What /proc says about a process: its threads' CPU time (schedstat) and its memory
//! (status, smaps, pagemap).

use std::fs;
use std::io;

use crate::error;

// ---- CPU time ------------------------------------------------------------------------------

/// One thread's schedstat and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadSched {
    /// Its id.
    pub tid: u32,
    /// Its name (`comm`).
    pub comm: String,
    /// Nanoseconds on a CPU.
    pub ns: u64,
    /// Times it was switched in.
    pub slices: u64,
}

/// Parses a schedstat file: nanoseconds on a CPU, nanoseconds waiting, times switched in.
pub fn parse_schedstat(text: &str) -> io::Result<(u64, u64)> {
    let fields: Vec<u64> = text
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    match fields[..] {
        [ns, _, slices] => Ok((ns, slices)),
        _ => Err(error(format!("bad schedstat {text:?}"))),
    }
}

/// Every thread of process `pid` (/proc/<pid>/task/*/{comm,schedstat}); a thread that ends
/// between the listing and the reads is left out.
pub fn threads(pid: u32) -> io::Result<Vec<ThreadSched>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let (Ok(comm), Ok(stat)) = (
            fs::read_to_string(entry.path().join("comm")),
            fs::read_to_string(entry.path().join("schedstat")),
        ) else {
            continue;
        };
        let (ns, slices) = parse_schedstat(&stat)?;
        out.push(ThreadSched {
            tid,
            comm: comm.trim().to_string(),
            ns,
            slices,
        });
    }
    Ok(out)
}

/// CPU nanoseconds thread `tid` of process `pid` has used.
pub fn thread_cpu_ns(pid: u32, tid: u32) -> io::Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))?;
    Ok(parse_schedstat(&text)?.0)
}

/// Times the calling thread was switched in (its schedstat; 0 if unreadable).
pub fn this_thread_switches() -> u64 {
    fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| parse_schedstat(&s).ok())
        .map_or(0, |(_, slices)| slices)
}

/// The CPU time of the calling thread (CLOCK_THREAD_CPUTIME_ID), in nanoseconds.
pub fn this_thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CLOCK_MONOTONIC, in nanoseconds (what a child can stamp and the parent compare).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

// ---- memory --------------------------------------------------------------------------------

/// Resident memory of a VMM process, in KiB.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemSample {
    /// VmHWM: peak RSS.
    pub hwm: u64,
    /// VmRSS now.
    pub rss: u64,
    /// Rss of the guest RAM mapping: guest memory actually touched (0 without a VM).
    pub guest: u64,
    /// Anonymous (private, per-process) memory outside the guest RAM: heap, stacks,
    /// thread arenas, written data pages of the executable.
    pub anon: u64,
    /// File pages (the executable's text and read-only data): shared with the page cache,
    /// so every VM process on the host shares them.
    pub file: u64,
    /// Everything else: the kvm-vcpu run page, vdso.
    pub other: u64,
    /// Size of another mapping the kernel merged with the guest RAM's.
    pub merged: u64,
}

impl MemSample {
    /// VmHWM and VmRSS of `status` (the text of /proc/<pid>/status), the rest zero.
    pub fn from_status(status: &str) -> MemSample {
        let mut m = MemSample::default();
        for line in status.lines() {
            if let Some(v) = kib_field(line, "VmHWM:") {
                m.hwm = v;
            } else if let Some(v) = kib_field(line, "VmRSS:") {
                m.rss = v;
            }
        }
        m
    }

    /// Counts `map`, a mapping outside the guest RAM: its anonymous pages as private anon,
    /// the rest of its Rss as file pages (a mapped file) or other.
    pub fn add_outside_guest(&mut self, map: &Mapping) {
        self.anon += map.anon;
        let rest = map.rss.saturating_sub(map.anon);
        if map.name.starts_with('/') {
            self.file += rest;
        } else {
            self.other += rest;
        }
    }

    /// Peak RSS outside the guest RAM.
    pub fn overhead_peak(&self) -> u64 {
        self.hwm.saturating_sub(self.guest)
    }

    /// RSS outside the guest RAM now.
    pub fn overhead_now(&self) -> u64 {
        self.rss.saturating_sub(self.guest)
    }
}

/// One mapping of /proc/<pid>/smaps; sizes in KiB.
#[derive(Debug, Default)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    /// The mapped file or `[name]`; empty for anonymous memory.
    pub name: String,
    pub size: u64,
    pub rss: u64,
    pub anon: u64,
}

/// The mappings of `smaps` (the text of /proc/<pid>/smaps), in address order.
pub fn parse_smaps(smaps: &str) -> Vec<Mapping> {
    let mut maps: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        let range = first.split_once('-').and_then(|(a, b)| {
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        });
        if let Some((start, end)) = range {
            let perms = fields.next().unwrap_or("").to_string();
            let name = fields.nth(3).unwrap_or("").to_string();
            maps.push(Mapping {
                start,
                end,
                perms,
                name,
                ..Mapping::default()
            });
        } else if let Some(cur) = maps.last_mut() {
            if let Some(v) = kib_field(line, "Size:") {
                cur.size = v;
            } else if let Some(v) = kib_field(line, "Rss:") {
                cur.rss = v;
            } else if let Some(v) = kib_field(line, "Anonymous:") {
                cur.anon = v;
            }
        }
    }
    maps
}

/// The value of a `Name:   1234 kB` line of /proc/<pid>/status or smaps, in KiB.
fn kib_field(line: &str, name: &str) -> Option<u64> {
    line.strip_prefix(name)?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

/// KiB of `[start, end)` of process `pid` resident in RAM, from /proc/<pid>/pagemap.
pub fn present_kib(pid: u32, start: u64, end: u64) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let pages = usize::try_from((end - start) / 4096).map_err(|e| error(e.to_string()))?;
    let mut raw = vec![0u8; pages * 8];
    fs::File::open(format!("/proc/{pid}/pagemap"))?.read_exact_at(&mut raw, start / 4096 * 8)?;
    let present = raw.chunks_exact(8).filter(|e| e[7] & 0x80 != 0).count();
    Ok(present as u64 * 4)
}

/// The memory of VMM process `pid`, from /proc/<pid>/smaps and /proc/<pid>/status. The
/// guest RAM is the anonymous read-write private mapping of `guest_kib`; with `vm` false
/// there must be none. The kernel may merge it with an adjacent anonymous read-write mapping
/// (with an API thread, a malloc arena's heap lands right after it): then the mapping is
/// larger than the guest, the guest part is at the end that has no arena reserve (`---p`)
/// after it: its resident pages are counted from /proc/<pid>/pagemap, the rest of the
/// mapping's Rss is the VMM's private memory.
pub fn read_memory(pid: u32, guest_kib: u64, vm: bool) -> io::Result<MemSample> {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let mut m = MemSample::from_status(&status);
    let maps = parse_smaps(&smaps);
    // Guest RAM, possibly merged with less than an arena (64 MiB) of something else.
    let is_guest = |m: &Mapping| {
        m.name.is_empty()
            && m.perms == "rw-p"
            && m.size >= guest_kib
            && m.size < guest_kib + (64 << 10)
    };
    let guests: Vec<usize> = (0..maps.len()).filter(|&i| is_guest(&maps[i])).collect();
    if guests.len() != usize::from(vm) {
        return Err(error(format!(
            "pid {pid}: expected {} anonymous rw-p mapping of {guest_kib} kB (the guest RAM), \
             found {}",
            usize::from(vm),
            guests.len()
        )));
    }
    for (i, map) in maps.iter().enumerate() {
        if guests.contains(&i) {
            let extra_bytes = (map.size - guest_kib) * 1024;
            if extra_bytes == 0 {
                m.guest = map.rss;
            } else {
                let reserve_after = maps
                    .get(i + 1)
                    .is_some_and(|n| n.start == map.end && n.perms == "---p");
                let (start, end) = if reserve_after {
                    (map.start, map.end - extra_bytes)
                } else {
                    (map.start + extra_bytes, map.end)
                };
                m.guest = present_kib(pid, start, end)?;
                m.anon += map.rss.saturating_sub(m.guest);
            }
            m.merged += map.size - guest_kib;
        } else {
            m.add_outside_guest(map);
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_and_status() {
        let smaps = "\
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 
Size:               1024 kB
Rss:                 512 kB
Anonymous:           512 kB
55aa00000000-55aa00001000 r-xp 00000000 08:01 42   /usr/bin/kiln
Size:                  4 kB
Rss:                   4 kB
Anonymous:             0 kB
";
        let maps = parse_smaps(smaps);
        assert_eq!(maps.len(), 2);
        assert_eq!(
            (maps[0].start, maps[0].end),
            (0x7f00_0000_0000, 0x7f00_0010_0000)
        );
        assert_eq!((maps[0].size, maps[0].rss, maps[0].anon), (1024, 512, 512));
        assert_eq!(maps[0].name, "");
        assert_eq!(
            (maps[1].perms.as_str(), maps[1].name.as_str()),
            ("r-xp", "/usr/bin/kiln")
        );
        let mut m = MemSample::from_status("VmHWM:\t  2048 kB\nVmRSS:\t  1500 kB\n");
        assert_eq!((m.hwm, m.rss), (2048, 1500));
        m.add_outside_guest(&maps[1]);
        assert_eq!((m.anon, m.file, m.other), (0, 4, 0));
    }

    #[test]
    fn schedstat_of_this_process() {
        assert_eq!(parse_schedstat("123 456 7\n").ok(), Some((123, 7)));
        assert!(parse_schedstat("123").is_err());
        let me = threads(std::process::id()).expect("read /proc/self/task");
        assert!(me.iter().any(|t| t.tid == std::process::id()));
    }
}
