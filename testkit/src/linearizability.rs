//! Checks a recorded history of concurrent operations against a sequential
//! model: is there one order of the operations, consistent with real time
//! (an operation that returned before another was called comes first),
//! in which the model gives every answer the clients saw?
//!
//! The search is Wing and Gong's, with Lowe's memoisation of (operations
//! linearized so far, model state), as in Knossos and Porcupine. An
//! operation whose outcome the client never learned (a timeout, a refused
//! commit that may still land) may take effect at any point after its call,
//! or never, and any answer is accepted for it.

use std::collections::HashSet;
use std::hash::Hash;

/// A sequential specification.
pub trait Model: Clone + Eq + Hash {
    type Input: std::fmt::Debug;
    type Output: std::fmt::Debug + PartialEq;
    /// The answer to `input` in this state, and the state after it.
    fn step(&self, input: &Self::Input) -> (Self::Output, Self);
}

/// One operation of a history; times are in any monotonic unit.
#[derive(Debug, Clone)]
pub struct Operation<I, O> {
    pub client: usize,
    pub call: u64,
    /// `None`: the outcome is unknown (the operation may or may not have
    /// taken effect, at any time after its call).
    pub ret: Option<u64>,
    pub input: I,
    /// `None` exactly when `ret` is.
    pub output: Option<O>,
}

/// What the search found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable {
        states_explored: u64,
    },
    /// No order explains the history; `longest` operations could be ordered
    /// at most.
    Violation {
        longest: usize,
    },
    /// The search gave up after `budget` states: neither proven nor refuted.
    Undecided,
}

/// Searches for a linearization of `history` from `initial`, exploring at
/// most `budget` states.
pub fn check<M: Model>(
    initial: &M,
    history: &[Operation<M::Input, M::Output>],
    budget: u64,
) -> Verdict {
    let mut order: Vec<usize> = (0..history.len()).collect();
    order.sort_by_key(|&i| history[i].call);
    let ops: Vec<&Operation<M::Input, M::Output>> = order.iter().map(|&i| &history[i]).collect();
    let determinate = ops.iter().filter(|op| op.ret.is_some()).count();
    let words = ops.len().div_ceil(64).max(1);

    struct Frame<M> {
        done: Vec<u64>,
        finished: usize,
        state: M,
        candidates: Vec<usize>,
        next: usize,
    }
    let is_done = |done: &[u64], i: usize| done[i / 64] & (1 << (i % 64)) != 0;
    // Operations that may come next: called before every pending operation
    // with a known return had returned.
    let candidates = |done: &[u64]| -> Vec<usize> {
        let limit = (0..ops.len())
            .filter(|&j| !is_done(done, j))
            .filter_map(|j| ops[j].ret)
            .min()
            .unwrap_or(u64::MAX);
        (0..ops.len()).take_while(|&i| ops[i].call < limit).filter(|&i| !is_done(done, i)).collect()
    };
    let mut seen: HashSet<(Vec<u64>, M)> = HashSet::new();
    let root = vec![0u64; words];
    let mut stack = vec![Frame {
        candidates: candidates(&root),
        done: root,
        finished: 0,
        state: initial.clone(),
        next: 0,
    }];
    let mut explored = 0u64;
    let mut longest = 0usize;
    while let Some(top) = stack.last_mut() {
        if top.finished == determinate {
            return Verdict::Linearizable { states_explored: explored };
        }
        let Some(&i) = top.candidates.get(top.next) else {
            stack.pop();
            continue;
        };
        top.next += 1;
        let op = ops[i];
        let (answer, state) = top.state.step(&op.input);
        if op.output.as_ref().is_some_and(|seen_answer| *seen_answer != answer) {
            continue;
        }
        let mut done = top.done.clone();
        done[i / 64] |= 1 << (i % 64);
        let finished = top.finished + usize::from(op.ret.is_some());
        if !seen.insert((done.clone(), state.clone())) {
            continue;
        }
        explored += 1;
        if explored > budget {
            return Verdict::Undecided;
        }
        longest = longest.max(stack.len());
        let next = candidates(&done);
        stack.push(Frame { done, finished, state, candidates: next, next: 0 });
    }
    Verdict::Violation { longest }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A single register: write a value, or read it.
    #[derive(Clone, PartialEq, Eq, Hash)]
    struct Register(u32);

    #[derive(Debug)]
    enum Op {
        Write(u32),
        Read,
    }

    impl Model for Register {
        type Input = Op;
        type Output = u32;
        fn step(&self, input: &Op) -> (u32, Self) {
            match input {
                Op::Write(v) => (0, Register(*v)),
                Op::Read => (self.0, self.clone()),
            }
        }
    }

    fn op(
        client: usize,
        call: u64,
        ret: Option<u64>,
        input: Op,
        output: u32,
    ) -> Operation<Op, u32> {
        Operation { client, call, ret, input, output: ret.map(|_| output) }
    }

    fn linearizable(history: &[Operation<Op, u32>]) -> bool {
        match check(&Register(0), history, 1_000_000) {
            Verdict::Linearizable { .. } => true,
            Verdict::Violation { .. } => false,
            Verdict::Undecided => panic!("undecided"),
        }
    }

    #[test]
    fn known_good_histories_pass() {
        // Sequential.
        assert!(linearizable(&[
            op(0, 0, Some(1), Op::Write(1), 0),
            op(1, 2, Some(3), Op::Read, 1)
        ]));
        // A read overlapping a write may see either value.
        assert!(linearizable(&[
            op(0, 0, Some(10), Op::Write(1), 0),
            op(1, 1, Some(2), Op::Read, 0)
        ]));
        assert!(linearizable(&[
            op(0, 0, Some(10), Op::Write(1), 0),
            op(1, 1, Some(2), Op::Read, 1)
        ]));
        // A write with an unknown outcome may have happened...
        assert!(linearizable(&[op(0, 0, None, Op::Write(7), 0), op(1, 5, Some(6), Op::Read, 7)]));
        // ...or not.
        assert!(linearizable(&[op(0, 0, None, Op::Write(7), 0), op(1, 5, Some(6), Op::Read, 0)]));
    }

    #[test]
    fn known_bad_histories_are_caught() {
        // A stale read: the write returned before the read was called.
        let stale = [op(0, 0, Some(1), Op::Write(1), 0), op(1, 2, Some(3), Op::Read, 0)];
        assert!(!linearizable(&stale));
        // A lost write: acknowledged, then an older value comes back.
        let lost = [
            op(0, 0, Some(1), Op::Write(1), 0),
            op(0, 2, Some(3), Op::Write(2), 0),
            op(1, 4, Some(5), Op::Read, 1),
        ];
        assert!(!linearizable(&lost));
        // Two readers disagree on the order of two writes.
        let split = [
            op(0, 0, Some(10), Op::Write(1), 0),
            op(1, 0, Some(10), Op::Write(2), 0),
            op(2, 11, Some(12), Op::Read, 1),
            op(3, 13, Some(14), Op::Read, 2),
            op(2, 15, Some(16), Op::Read, 1),
        ];
        assert!(!linearizable(&split));
        // A value nobody wrote.
        assert!(!linearizable(&[op(0, 0, None, Op::Write(7), 0), op(1, 5, Some(6), Op::Read, 8)]));
    }

    #[test]
    fn the_budget_bounds_the_search() {
        let many: Vec<_> = (0..12)
            .map(|c| op(c, 0, Some(100), Op::Write(c as u32 + 1), 0))
            .chain([op(99, 101, Some(102), Op::Read, 99)])
            .collect();
        assert_eq!(check(&Register(0), &many, 50), Verdict::Undecided);
    }
}
