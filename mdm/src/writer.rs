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
//!
//! On a replicated MDM (see [`crate::raft`]) the batch is not committed
//! here: its changeset is recorded, the transaction rolled back, and the
//! changeset committed through the Raft log ([`Commit`]); the state machine
//! applies it to this database like on every other member. Replies still
//! wait for that commit.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::Arc;

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

/// Why a batch was not committed (given to each of its requests).
#[derive(Debug, Clone)]
pub enum CommitFailure {
    Database(String),
    NotLeader(Option<String>),
    Unreplicated(String),
}

impl CommitFailure {
    fn to_error(&self) -> MdmError {
        match self {
            CommitFailure::Database(reason) => {
                MdmError::Internal(format!("commit failed: {reason}"))
            }
            CommitFailure::NotLeader(leader) => MdmError::NotLeader { leader: leader.clone() },
            CommitFailure::Unreplicated(reason) => MdmError::Unreplicated(reason.clone()),
        }
    }
}

impl From<MdmError> for CommitFailure {
    fn from(e: MdmError) -> Self {
        match e {
            MdmError::NotLeader { leader } => CommitFailure::NotLeader(leader),
            MdmError::Unreplicated(reason) => CommitFailure::Unreplicated(reason),
            other => CommitFailure::Database(other.to_string()),
        }
    }
}

/// Sends a request's answer; given the commit's failure, if any.
type Deliver = Box<dyn FnOnce(Option<&CommitFailure>) + Send>;

/// A request: run on the connection, or (given none) refused unrun.
type Job = Box<dyn FnOnce(Option<&Connection>) -> Finished + Send>;

/// Commits a batch elsewhere than in this database's own transaction.
pub trait Commit: Send + 'static {
    /// Whether a batch may run now (a replica that is not the leader refuses).
    fn before_batch(&self) -> Result<(), MdmError>;
    /// Commits the batch's net `changes`; returns once they are applied here.
    fn commit(&self, changes: Vec<u8>) -> Result<(), MdmError>;
}

/// Where a batch is committed.
pub enum CommitMode {
    /// `COMMIT` on this database (a single MDM).
    Local,
    /// Through the Raft log.
    Replicated(Box<dyn Commit>),
}

/// The handle through which requests reach the database thread.
pub struct DbWriter {
    jobs: mpsc::Sender<Job>,
    stats: Arc<WriterStats>,
}

/// Counters of the writer (for `/metrics`).
#[derive(Debug, Default)]
pub struct WriterStats {
    pub batches: std::sync::atomic::AtomicU64,
    pub requests: std::sync::atomic::AtomicU64,
    /// Writes queued behind their answers that failed or were not committed.
    pub behind_failed: std::sync::atomic::AtomicU64,
}

impl DbWriter {
    /// Moves `conn` onto its own thread, which runs until every handle is
    /// dropped.
    pub fn start(
        conn: Connection,
        stats: Arc<WriterStats>,
        mode: CommitMode,
    ) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new().name("mdm-db".to_string()).spawn({
            let stats = Arc::clone(&stats);
            move || run(conn, queue, &stats, &mode)
        })?;
        Ok(Self { jobs, stats })
    }

    /// Queues `work` for a coming batch without waiting for it: for a write
    /// that nobody is told about (its failure is logged and counted in
    /// [`WriterStats::behind_failed`]). Jobs run in the order they are
    /// queued, so a request submitted after this one sees its changes.
    pub fn submit_behind<F>(&self, what: &'static str, work: F)
    where
        F: FnOnce(&Connection) -> Result<(), MdmError> + Send + 'static,
    {
        let stats = Arc::clone(&self.stats);
        let job: Job = Box::new(move |conn| {
            let result = run_guarded(conn, work);
            Finished {
                ok: result.is_ok(),
                deliver: Box::new(move |commit_failure| {
                    let error = match (commit_failure, result) {
                        (Some(failure), _) => failure.to_error(),
                        (None, Err(e)) => e,
                        (None, Ok(())) => return,
                    };
                    stats.behind_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(what, error = %error, "a write behind its answer was not made");
                }),
            }
        });
        if self.jobs.send(job).is_err() {
            self.stats.behind_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                what,
                "a write behind its answer was not made: the database thread has stopped"
            );
        }
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
            let result = run_guarded(conn, work);
            Finished {
                ok: result.is_ok(),
                deliver: Box::new(move |commit_failure| {
                    let outcome = match commit_failure {
                        Some(failure) => Err(failure.to_error()),
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

/// Runs a request on the connection, a panic becoming its error; given no
/// connection (its batch was refused), it is not run.
fn run_guarded<T>(
    conn: Option<&Connection>,
    work: impl FnOnce(&Connection) -> Result<T, MdmError>,
) -> Result<T, MdmError> {
    match conn {
        Some(conn) => catch_unwind(AssertUnwindSafe(|| work(conn)))
            .unwrap_or_else(|_| Err(MdmError::Internal("a request panicked".to_string()))),
        None => Err(MdmError::Internal("refused unrun".to_string())),
    }
}

fn run(conn: Connection, queue: mpsc::Receiver<Job>, stats: &WriterStats, mode: &CommitMode) {
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
        let finished = match mode {
            CommitMode::Local => run_batch(&conn, batch),
            CommitMode::Replicated(commit) => run_replicated_batch(&conn, batch, commit.as_ref()),
        };
        match finished {
            Ok(done) => done.into_iter().for_each(|f| (f.deliver)(None)),
            Err((failure, done)) => {
                if let CommitFailure::Database(reason) = &failure {
                    tracing::error!(error = %reason, "a database batch failed to commit");
                }
                done.into_iter().for_each(|f| (f.deliver)(Some(&failure)))
            }
        }
        if matches!(mode, CommitMode::Local) {
            // Replicated, the state machine's connection commits (and does this).
            crate::db::restart_wal_if_due(&conn);
        }
    }
}

type BatchFailure = (CommitFailure, Vec<Finished>);

/// Runs every job of `batch` in one transaction, each in its own savepoint.
/// On a failure of the transaction itself everything is rolled back: the
/// jobs that ran get the failure, the ones that did not are dropped (their
/// callers see an internal error); none of them is acknowledged.
fn run_batch(conn: &Connection, batch: Vec<Job>) -> Result<Vec<Finished>, BatchFailure> {
    let done = run_jobs(conn, batch, |_| Ok(()))?;
    match conn.execute_batch("COMMIT") {
        Ok(()) => Ok(done),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err((db_failure(e), done))
        }
    }
}

fn db_failure(e: impl std::fmt::Display) -> CommitFailure {
    CommitFailure::Database(e.to_string())
}

/// Opens the batch's transaction, runs each job in its own savepoint and
/// leaves the transaction open; `opened` runs right after `BEGIN`.
fn run_jobs<'c>(
    conn: &'c Connection,
    batch: Vec<Job>,
    opened: impl FnOnce(&'c Connection) -> Result<(), CommitFailure>,
) -> Result<Vec<Finished>, BatchFailure> {
    let mut done = Vec::with_capacity(batch.len());
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        done.extend(batch.into_iter().map(|job| job(None)));
        return Err((db_failure(e), done));
    }
    if let Err(failure) = opened(conn) {
        let _ = conn.execute_batch("ROLLBACK");
        done.extend(batch.into_iter().map(|job| job(None)));
        return Err((failure, done));
    }
    let mut jobs = batch.into_iter();
    while let Some(job) = jobs.next() {
        if let Err(e) = conn.execute_batch("SAVEPOINT request") {
            let _ = conn.execute_batch("ROLLBACK");
            done.push(job(None));
            done.extend(jobs.map(|job| job(None)));
            return Err((db_failure(e), done));
        }
        let finished = job(Some(conn));
        let closed = if finished.ok {
            conn.execute_batch("RELEASE request")
        } else {
            conn.execute_batch("ROLLBACK TO request; RELEASE request")
        };
        done.push(finished);
        if let Err(e) = closed {
            let _ = conn.execute_batch("ROLLBACK");
            done.extend(jobs.map(|job| job(None)));
            return Err((db_failure(e), done));
        }
    }
    Ok(done)
}

/// Runs `batch` like [`run_batch`], but commits its changeset through
/// `commit` (after rolling the local transaction back: the state machine
/// applies it once committed). A batch that changed nothing is answered at
/// once.
fn run_replicated_batch(
    conn: &Connection,
    batch: Vec<Job>,
    commit: &dyn Commit,
) -> Result<Vec<Finished>, BatchFailure> {
    if let Err(e) = commit.before_batch() {
        return Err((e.into(), batch.into_iter().map(|job| job(None)).collect()));
    }
    let recorder = std::cell::RefCell::new(None);
    let done = run_jobs(conn, batch, |conn| {
        let started = crate::changeset::Recorder::start(conn).map_err(db_failure)?;
        *recorder.borrow_mut() = Some(started);
        Ok(())
    })?;
    let changes = recorder.into_inner().map(|r| r.finish());
    let _ = conn.execute_batch("ROLLBACK");
    let changes = match changes {
        Some(Ok(changes)) => changes,
        Some(Err(e)) => return Err((db_failure(e), done)),
        None => return Err((db_failure("no changeset recorded"), done)),
    };
    if changes.is_empty() {
        return Ok(done);
    }
    match commit.commit(changes) {
        Ok(()) => Ok(done),
        Err(e) => Err((e.into(), done)),
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
