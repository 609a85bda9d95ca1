//! The plain engine: `pread`/`pwrite`/`fdatasync` on a buffered file, run
//! by a few threads per device so that concurrent requests overlap.
//!
//! It is the reference the uring engine is tested against and the engine
//! for filesystems that refuse O_DIRECT (tmpfs). Without O_DIRECT a
//! completed write sits in the page cache: it survives the process being
//! killed but not the machine losing power until a FLUSH (`fdatasync`) or a
//! FUA write (`pwritev2` with `RWF_DSYNC`), which is exactly the NBD
//! durability contract.
//!
//! A request and its buffer are owned by the worker thread from the moment
//! it is dequeued until its completion is sent back.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use super::{
    CompletionSender, DeviceFile, EngineKind, IoCompletion, IoEngine, IoOp, IoRequest, PendingIo,
};

/// Worker threads per device.
pub const DEFAULT_THREADS: usize = 4;

struct Job {
    request: IoRequest,
    reply: CompletionSender,
}

struct DeviceWorkers {
    queue: mpsc::Sender<Job>,
    file: Arc<File>,
    threads: Vec<JoinHandle<()>>,
}

/// `pread`/`pwrite` engine over buffered files.
pub struct SyncEngine {
    devices: Vec<DeviceWorkers>,
    activity: Arc<Activity>,
}

/// How many jobs are being executed, and the most ever at once.
#[derive(Default)]
struct Activity {
    running: AtomicUsize,
    peak: AtomicUsize,
}

impl SyncEngine {
    pub fn open(devices: &[DeviceFile], threads_per_device: usize) -> io::Result<Self> {
        let mut opened = Vec::with_capacity(devices.len());
        let activity = Arc::new(Activity::default());
        for (index, device) in devices.iter().enumerate() {
            let file =
                OpenOptions::new().read(true).write(true).open(&device.path).map_err(|e| {
                    io::Error::new(e.kind(), format!("opening {}: {e}", device.path.display()))
                })?;
            let file = Arc::new(file);
            let (queue, jobs) = mpsc::channel::<Job>();
            let jobs = Arc::new(Mutex::new(jobs));
            let threads = (0..threads_per_device.max(1))
                .map(|n| {
                    let jobs = jobs.clone();
                    let file = file.clone();
                    let activity = activity.clone();
                    std::thread::Builder::new()
                        .name(format!("sds-sync-dev{index}-{n}"))
                        .spawn(move || serve(&file, &jobs, &activity))
                })
                .collect::<io::Result<Vec<_>>>()?;
            opened.push(DeviceWorkers { queue, file, threads });
        }
        Ok(Self { devices: opened, activity })
    }
}

/// One worker: takes jobs until the engine is dropped.
fn serve(file: &File, jobs: &Mutex<mpsc::Receiver<Job>>, activity: &Activity) {
    loop {
        let next = jobs.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(Job { mut request, reply }) = next else { return };
        let running = activity.running.fetch_add(1, Ordering::Relaxed) + 1;
        activity.peak.fetch_max(running, Ordering::Relaxed);
        let result = execute(file, &mut request);
        activity.running.fetch_sub(1, Ordering::Relaxed);
        reply.send(IoCompletion::of(request, result));
    }
}

fn execute(file: &File, request: &mut IoRequest) -> io::Result<()> {
    match (request.op, request.buf.as_mut()) {
        (IoOp::DataSync, _) => file.sync_data(),
        (IoOp::Read, Some(buf)) => file.read_exact_at(buf, request.offset),
        (IoOp::Write { fua: false }, Some(buf)) => file.write_all_at(buf, request.offset),
        (IoOp::Write { fua: true }, Some(buf)) => write_all_dsync(file, buf, request.offset),
        (_, None) => Err(io::Error::new(io::ErrorKind::InvalidInput, "missing buffer")),
    }
}

/// `pwritev2(RWF_DSYNC)` until everything is written.
fn write_all_dsync(file: &File, mut data: &[u8], mut offset: u64) -> io::Result<()> {
    while !data.is_empty() {
        let iov = libc::iovec { iov_base: data.as_ptr() as *mut _, iov_len: data.len() };
        // SAFETY: iov describes `data`, which is live and readable for the
        // whole call; the kernel only reads from it.
        let written =
            unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, offset as i64, libc::RWF_DSYNC) };
        if written < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if written == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "the device accepted no bytes"));
        }
        data = &data[written as usize..];
        offset += written as u64;
    }
    Ok(())
}

impl IoEngine for SyncEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Sync
    }

    fn submit(&self, request: IoRequest) -> PendingIo {
        if let Err(error) = request.validate(self.devices.len(), false) {
            return PendingIo::ready(IoCompletion::failed(request, error));
        }
        let (reply, pending) = PendingIo::channel();
        match self.devices[request.device].queue.send(Job { request, reply }) {
            Ok(()) => pending,
            Err(mpsc::SendError(job)) => PendingIo::ready(IoCompletion::failed(
                job.request,
                io::Error::other("the device workers have stopped"),
            )),
        }
    }

    fn device_count(&self) -> usize {
        self.devices.len()
    }

    fn device_fd(&self, device: usize) -> Option<RawFd> {
        self.devices.get(device).map(|d| d.file.as_raw_fd())
    }

    fn in_flight_peak(&self) -> usize {
        self.activity.peak.load(Ordering::Relaxed)
    }
}

impl Drop for SyncEngine {
    fn drop(&mut self) {
        for device in std::mem::take(&mut self.devices) {
            let DeviceWorkers { queue, threads, .. } = device;
            drop(queue);
            for thread in threads {
                let _ = thread.join();
            }
        }
    }
}
