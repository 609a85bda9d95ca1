//! Group commit: one thread owns the database connection and runs requests
//! in batches, one transaction (and one fsync) per batch.
//!
//! Every request still behaves as if it ran alone: each runs inside its own
//! savepoint, released on success and rolled back on error, so a refused
//! request leaves nothing behind while the others of its batch commit. No
//! reply leaves before the batch's `COMMIT` has returned, so nothing is
//! acknowledged that a crash could lose. With `synchronous = FULL` the
//! fsync per commit is what limits a one-request-per-transaction MDM; a
//! batch shares it among everyone who arrived while the previous one was
//! being written.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;

use rusqlite::Connection;

use crate::error::MdmError;

/// Most requests one transaction carries, so a flood still commits (and
/// answers) in bounded steps.
pub const MAX_BATCH: usize = 512;

/// What a finished request still has to do once its batch is committed:
/// deliver its result, or the commit's failure.
struct Finished {
    ok: bool,
    deliver: Deliver,
}

/// Sends a request's answer; given the commit's failure, if any.
type Deliver = Box<dyn FnOnce(Option<&str>) + Send>;

type Job = Box<dyn FnOnce(&Connection) -> Finished + Send>;

/// The handle through which requests reach the database thread.
pub struct DbWriter {
    jobs: mpsc::Sender<Job>,
}

/// Counters of the writer (for `/metrics`).
#[derive(Debug, Default)]
pub struct WriterStats {
    pub batches: std::sync::atomic::AtomicU64,
    pub requests: std::sync::atomic::AtomicU64,
}

impl DbWriter {
    /// Moves `conn` onto its own thread, which runs until every handle is
    /// dropped.
    pub fn start(conn: Connection, stats: std::sync::Arc<WriterStats>) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("mdm-db".to_string())
            .spawn(move || run(conn, queue, &stats))?;
        Ok(Self { jobs })
    }

    /// Runs `work` in the next batch; its result arrives once that batch is
    /// committed (an `Err` from `work` rolls back only its own changes).
    pub async fn submit<T, F>(&self, work: F) -> Result<T, MdmError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, MdmError> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = catch_unwind(AssertUnwindSafe(|| work(conn)))
                .unwrap_or_else(|_| Err(MdmError::Internal("a request panicked".to_string())));
            Finished {
                ok: result.is_ok(),
                deliver: Box::new(move |commit_failure| {
                    let outcome = match commit_failure {
                        Some(reason) => Err(MdmError::Internal(format!("commit failed: {reason}"))),
                        None => result,
                    };
                    let _ = reply.send(outcome);
                }),
            }
        });
        self.jobs
            .send(job)
            .map_err(|_| MdmError::Internal("the database thread has stopped".to_string()))?;
        answer
            .await
            .map_err(|_| MdmError::Internal("the database thread dropped a request".to_string()))?
    }
}

fn run(conn: Connection, queue: mpsc::Receiver<Job>, stats: &WriterStats) {
    use std::sync::atomic::Ordering;
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.requests.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let finished = run_batch(&conn, batch);
        match finished {
            Ok(done) => done.into_iter().for_each(|f| (f.deliver)(None)),
            Err((reason, done)) => {
                tracing::error!(error = %reason, "a database batch failed to commit");
                done.into_iter().for_each(|f| (f.deliver)(Some(&reason)))
            }
        }
    }
}

type BatchFailure = (String, Vec<Finished>);

/// Runs every job of `batch` in one transaction, each in its own savepoint.
/// On a failure of the transaction itself everything is rolled back: the
/// jobs that ran get the failure, the ones that did not are dropped (their
/// callers see an internal error); none of them is acknowledged.
fn run_batch(conn: &Connection, batch: Vec<Job>) -> Result<Vec<Finished>, BatchFailure> {
    let mut done = Vec::with_capacity(batch.len());
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        return Err((e.to_string(), done));
    }
    for job in batch {
        if let Err(e) = conn.execute_batch("SAVEPOINT request") {
            let _ = conn.execute_batch("ROLLBACK");
            return Err((e.to_string(), done));
        }
        let finished = job(conn);
        let closed = if finished.ok {
            conn.execute_batch("RELEASE request")
        } else {
            conn.execute_batch("ROLLBACK TO request; RELEASE request")
        };
        done.push(finished);
        if let Err(e) = closed {
            let _ = conn.execute_batch("ROLLBACK");
            return Err((e.to_string(), done));
        }
    }
    match conn.execute_batch("COMMIT") {
        Ok(()) => Ok(done),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err((e.to_string(), done))
        }
    }
}

/// Connections for requests that only read. Each read runs in its own
/// transaction on one of them, sees the last committed batch (WAL keeps
/// readers and the writer apart) and never waits in the writer's queue;
/// `query_only` makes any write through them an error.
pub struct DbReaders {
    conns: Vec<std::sync::Mutex<Connection>>,
    next: std::sync::atomic::AtomicUsize,
}

impl DbReaders {
    /// `count` connections to the database at `path` (already migrated).
    pub fn open(path: &std::path::Path, count: usize) -> Result<Self, crate::db::DbError> {
        let conns = (0..count.max(1))
            .map(|_| {
                let conn = crate::db::open_reader(path)?;
                Ok(std::sync::Mutex::new(conn))
            })
            .collect::<Result<_, crate::db::DbError>>()?;
        Ok(Self { conns, next: std::sync::atomic::AtomicUsize::new(0) })
    }

    /// Runs `work` on a reader connection, on the blocking pool.
    pub fn read<T>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, MdmError>,
    ) -> Result<T, MdmError> {
        use std::sync::atomic::Ordering;
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        // The first free connection from a rotating start, else wait for one.
        let n = self.conns.len();
        let mut guard =
            (0..n).find_map(|i| self.conns[(start + i) % n].try_lock().ok()).unwrap_or_else(|| {
                self.conns[start % n].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
            });
        let tx = guard.transaction()?;
        let value = work(&tx)?;
        tx.finish()?;
        Ok(value)
    }
}
