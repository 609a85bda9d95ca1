//! A fault-injecting wrapper around a real engine, for tests and for
//! rehearsing disk failures in a lab: on command, one device's requests
//! hang, fail with `EIO`, or complete late.
//!
//! An SDS uses it only when started with `--fault-injection` (which
//! `pflex up` never passes); without that flag the store talks to its
//! engine directly and this module costs nothing.
//!
//! A hung request is held, buffer and all, exactly as a stuck device would
//! hold it in the kernel: its caller may stop waiting, but the request only
//! completes (for real, on the inner engine) once the fault is cleared. So a
//! write that was abandoned during the hang lands late, as it would on a
//! real device that recovers.

use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{CompletionSender, EngineKind, IoCompletion, IoEngine, IoRequest, PendingIo};

/// What a device does with the requests it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "fault")]
pub enum DeviceFault {
    /// Requests go to the device.
    #[default]
    None,
    /// Requests are held until the fault is cleared.
    Hang,
    /// Requests fail at once with `EIO`.
    Eio,
    /// Requests complete `delay_ms` late.
    Slow { delay_ms: u64 },
}

/// The faults in force, per device, shared by the engine and its handle.
#[derive(Default)]
struct FaultTable {
    devices: Mutex<Vec<DeviceState>>,
}

#[derive(Default)]
struct DeviceState {
    fault: DeviceFault,
    held: Vec<(IoRequest, CompletionSender)>,
}

impl FaultTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<DeviceState>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An engine whose devices fail on command (see the module docs).
pub struct FaultyEngine {
    inner: Arc<dyn IoEngine>,
    table: Arc<FaultTable>,
}

/// Sets the faults of a [`FaultyEngine`]'s devices.
#[derive(Clone)]
pub struct FaultHandle {
    inner: Arc<dyn IoEngine>,
    table: Arc<FaultTable>,
}

impl FaultyEngine {
    /// Wraps `inner`, with no fault in force.
    pub fn new(inner: Box<dyn IoEngine>) -> (Self, FaultHandle) {
        let table = Arc::new(FaultTable::default());
        table.lock().resize_with(inner.device_count(), DeviceState::default);
        let inner: Arc<dyn IoEngine> = Arc::from(inner);
        (Self { inner: inner.clone(), table: table.clone() }, FaultHandle { inner, table })
    }
}

impl FaultHandle {
    /// Sets the fault of `device`; clearing a hang sends what it held to
    /// the device. False if there is no such device.
    pub fn set(&self, device: usize, fault: DeviceFault) -> bool {
        let released = {
            let mut devices = self.table.lock();
            let Some(dev) = devices.get_mut(device) else { return false };
            dev.fault = fault;
            if fault == DeviceFault::Hang {
                Vec::new()
            } else {
                std::mem::take(&mut dev.held)
            }
        };
        for (request, sender) in released {
            forward(self.inner.clone(), request, sender, Duration::ZERO);
        }
        true
    }

    /// The fault of every device, in device order.
    pub fn faults(&self) -> Vec<DeviceFault> {
        self.table.lock().iter().map(|d| d.fault).collect()
    }
}

/// Runs `request` on `engine` and answers `sender`, `delay` late. Needs a
/// tokio runtime (the store always runs in one).
fn forward(
    engine: Arc<dyn IoEngine>,
    request: IoRequest,
    sender: CompletionSender,
    delay: Duration,
) {
    let pending = engine.submit(request);
    let answer = async move {
        let completion = pending.await;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        sender.send(completion);
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn(answer)),
        Err(_) => tracing::error!("a faulty device was used outside a runtime; request dropped"),
    }
}

impl IoEngine for FaultyEngine {
    fn kind(&self) -> EngineKind {
        self.inner.kind()
    }

    fn submit(&self, request: IoRequest) -> PendingIo {
        let fault = self.table.lock().get(request.device).map(|d| d.fault).unwrap_or_default();
        match fault {
            DeviceFault::None => self.inner.submit(request),
            DeviceFault::Eio => PendingIo::ready(IoCompletion::failed(
                request,
                io::Error::from_raw_os_error(libc::EIO),
            )),
            DeviceFault::Hang => {
                let (sender, pending) = PendingIo::channel();
                let mut state = self.table.lock();
                match state.get_mut(request.device) {
                    // Still hung (the fault may have changed since it was read).
                    Some(dev) if dev.fault == DeviceFault::Hang => dev.held.push((request, sender)),
                    _ => {
                        drop(state);
                        forward(self.inner.clone(), request, sender, Duration::ZERO);
                    }
                }
                pending
            }
            DeviceFault::Slow { delay_ms } => {
                let (sender, pending) = PendingIo::channel();
                forward(self.inner.clone(), request, sender, Duration::from_millis(delay_ms));
                pending
            }
        }
    }

    fn device_count(&self) -> usize {
        self.inner.device_count()
    }

    fn device_fd(&self, device: usize) -> Option<RawFd> {
        self.inner.device_fd(device)
    }

    fn in_flight_peak(&self) -> usize {
        self.inner.in_flight_peak()
    }
}
