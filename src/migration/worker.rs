//! The migration thread: started with the VM, before the VMM thread installs its filter,
//! it jails itself under the `migration` seccomp category (sockets, KVM's dirty log, the
//! TAP and drive hand-over) and waits for `PUT /migration/send`. The VMM thread keeps
//! serving the guest while it streams; it only pauses the vCPUs and saves the state when
//! asked, then waits for the end.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::send::{Job, Reply, Request, VmmLink, run};
use crate::seccomp::{SeccompFilters, ThreadCategory};

/// The VMM thread's handle on the migration thread.
#[derive(Debug)]
pub struct Worker {
    jobs: Option<Sender<Job>>,
    /// The migration thread's requests.
    pub requests: Receiver<Request>,
    /// Answers to them.
    pub replies: Sender<Reply>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the migration thread; `wake` is written whenever it has a request.
    pub fn spawn(seccomp: Arc<SeccompFilters>, wake: EventFd) -> std::io::Result<Worker> {
        let (jobs_tx, jobs_rx) = channel::<Job>();
        let (req_tx, req_rx) = channel::<Request>();
        let (rep_tx, rep_rx) = channel::<Reply>();
        let thread = std::thread::Builder::new()
            .name("kiln_migration".into())
            .spawn(move || {
                if let Err(e) = seccomp.install(ThreadCategory::Migration) {
                    log::error!("migration thread: {e}; live migration is not available");
                    return;
                }
                let wake = || {
                    let _ = wake.write(1);
                };
                while let Ok(job) = jobs_rx.recv() {
                    let link = VmmLink {
                        requests: &req_tx,
                        replies: &rep_rx,
                        wake: &wake,
                    };
                    let result = run(&job, &link);
                    if req_tx.send(Request::Finished(result)).is_err() {
                        return;
                    }
                    wake();
                }
            })?;
        Ok(Worker {
            jobs: Some(jobs_tx),
            requests: req_rx,
            replies: rep_tx,
            thread: Some(thread),
        })
    }

    /// Hands a migration to the thread.
    pub fn start(&self, job: Job) -> Result<(), super::MigrationError> {
        let finished = self.thread.as_ref().is_none_or(|t| t.is_finished());
        match &self.jobs {
            Some(jobs) if !finished => jobs
                .send(job)
                .map_err(|_| super::MigrationError::Busy("the migration thread has stopped")),
            _ => Err(super::MigrationError::Busy(
                "the migration thread has stopped",
            )),
        }
    }
}
