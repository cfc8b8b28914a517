//! The VM processes behind the thread rows' pids. A pid can come back as another VM
//! process (pids wrap); the eBPF side notes when each process first took a slot
//! (`ThreadOwner::born_ns`), so two processes with one pid have two birth times. Here
//! each (pid, birth) gets its `reuse`: 0 for the first process the trace saw with that
//! pid, 1 for the next, and so on. A number once given is kept, even after the VM is
//! forgotten, so a VM's rows and series never change their name.

use std::collections::BTreeMap;

/// `reuse` numbers, by pid and birth.
#[derive(Debug, Default)]
pub(super) struct Lives {
    /// Per pid: the reuse number of each birth seen, and the next number to give.
    pids: BTreeMap<u32, (BTreeMap<u64, u32>, u32)>,
}

impl Lives {
    /// Numbers the births not seen before, earliest first (a snapshot may show a
    /// pid's old and new process for the first time together).
    pub fn note(&mut self, seen: impl IntoIterator<Item = (u32, u64)>) {
        let mut seen: Vec<(u32, u64)> = seen.into_iter().collect();
        seen.sort_unstable();
        for (pid, born) in seen {
            self.reuse(pid, born);
        }
    }

    /// The reuse number of process (`pid`, `born`); a birth not noted yet takes the
    /// next number.
    pub fn reuse(&mut self, pid: u32, born: u64) -> u32 {
        let (births, next) = self.pids.entry(pid).or_default();
        *births.entry(born).or_insert_with(|| {
            *next += 1;
            *next - 1
        })
    }

    /// The birth of (`pid`, `reuse`), if it was noted.
    pub fn born(&self, pid: u32, reuse: u32) -> Option<u64> {
        let (births, _) = self.pids.get(&pid)?;
        births.iter().find(|(_, r)| **r == reuse).map(|(b, _)| *b)
    }

    /// The last process seen with `pid` (its reuse number), if any.
    pub fn last(&self, pid: u32) -> Option<u32> {
        let (_, next) = self.pids.get(&pid)?;
        next.checked_sub(1)
    }

    /// Forgets the birth of (`pid`, `reuse`); the numbers of the others stay.
    pub fn forget(&mut self, pid: u32, reuse: u32) {
        if let Some((births, _)) = self.pids.get_mut(&pid) {
            births.retain(|_, r| *r != reuse);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_used_again_is_another_vm() {
        let mut lives = Lives::default();
        assert_eq!(lives.reuse(4242, 1_000), 0);
        assert_eq!(lives.reuse(7, 1_500), 0);
        assert_eq!(lives.reuse(4242, 9_000), 1);
        // Its threads all agree: one birth per process.
        assert_eq!(lives.reuse(4242, 1_000), 0);
        assert_eq!(lives.reuse(4242, 9_000), 1);
        assert_eq!(lives.last(4242), Some(1));
        assert_eq!(lives.last(8), None);
        assert_eq!(lives.born(4242, 1), Some(9_000));
    }

    #[test]
    fn births_seen_together_are_numbered_in_order() {
        let mut lives = Lives::default();
        lives.note([(4242, 9_000), (4242, 1_000), (4242, 5_000)]);
        assert_eq!(lives.reuse(4242, 1_000), 0);
        assert_eq!(lives.reuse(4242, 5_000), 1);
        assert_eq!(lives.reuse(4242, 9_000), 2);
    }

    #[test]
    fn forgetting_a_vm_renames_no_other() {
        let mut lives = Lives::default();
        lives.note([(4242, 1_000), (4242, 9_000)]);
        lives.forget(4242, 0);
        assert_eq!(lives.born(4242, 0), None);
        assert_eq!(lives.reuse(4242, 9_000), 1);
        // A third process with the pid: the next number, not a freed one.
        assert_eq!(lives.reuse(4242, 20_000), 2);
    }
}
