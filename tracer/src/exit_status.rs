//! kvmtrace's exit statuses, in one place: each outcome a script may want to tell apart
//! has its own number, documented in every subcommand's `--help` and in README.md.

use std::process::ExitCode;

/// Why kvmtrace exited. The numbers are part of the interface: never renumber one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// It did its job (and any check it made passed).
    Success,
    /// It could not do its job (privileges, kvm not loaded, the kernel refused, I/O).
    Error,
    /// Bad input or usage: a bad option or value, a file that is not what it should be.
    BadInput,
    /// `guest`: the KVM answering the counter leaves is not patched.
    NotPatched,
    /// `record -- CMD`: the report was written, but CMD failed (exited non-zero or was
    /// killed by a signal kvmtrace did not send).
    CommandFailed,
    /// `reconcile`: a difference between guest and host with no known cause;
    /// `guest --sweep`: an answer that disagrees with the exit-reason tables.
    Unexplained,
    /// `reconcile`: the record holds no guest counter reads, so nothing was compared.
    NoCounterReads,
    /// `reconcile`: the counters are wrong, and every difference has a named cause
    /// (none unexplained; accepted causes aside).
    CausesNamed,
}

impl Status {
    /// Every status, in numeric order.
    pub const ALL: [Self; 8] = [
        Self::Success,
        Self::Error,
        Self::BadInput,
        Self::NotPatched,
        Self::CommandFailed,
        Self::Unexplained,
        Self::NoCounterReads,
        Self::CausesNamed,
    ];

    /// The exit status number.
    pub const fn code(self) -> u8 {
        match self {
            Self::Success => 0,
            Self::Error => 1,
            Self::BadInput => 2,
            Self::NotPatched => 3,
            Self::CommandFailed => 4,
            Self::Unexplained => 5,
            Self::NoCounterReads => 6,
            Self::CausesNamed => 7,
        }
    }

    /// One line for `--help` and README.md.
    pub const fn meaning(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Error => "error: kvmtrace could not do its job",
            Self::BadInput => "bad input or usage",
            Self::NotPatched => "guest: this KVM is not patched",
            Self::CommandFailed => "record -- CMD: the report is written, but CMD failed",
            Self::Unexplained => {
                "reconcile: a difference with no known cause; guest --sweep: an answer disagrees with the tables"
            }
            Self::NoCounterReads => "reconcile: the record has no guest counter reads",
            Self::CausesNamed => {
                "reconcile: the counters are wrong, and every difference has a named cause"
            }
        }
    }
}

impl From<Status> for ExitCode {
    fn from(s: Status) -> Self {
        Self::from(s.code())
    }
}

/// The "Exit status:" section of a subcommand's `--help`: the statuses every command
/// has (0, 1, 2) and its own.
pub fn help(own: &[Status]) -> String {
    let mut out = String::from("Exit status:\n");
    for s in Status::ALL {
        if matches!(s, Status::Success | Status::Error | Status::BadInput) || own.contains(&s) {
            out.push_str(&format!("  {}  {}\n", s.code(), s.meaning()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_distinct_and_in_order() {
        for (i, s) in Status::ALL.iter().enumerate() {
            assert_eq!(usize::from(s.code()), i, "{s:?}");
        }
        // clap exits 2 on a usage error: bad input must keep that number.
        assert_eq!(Status::BadInput.code(), 2);
        assert_eq!(Status::NotPatched.code(), 3);
    }

    #[test]
    fn help_lists_common_and_own_statuses() {
        let h = help(&[Status::CommandFailed]);
        assert!(
            h.starts_with("Exit status:\n  0  success\n  1  error"),
            "{h}"
        );
        assert!(h.contains("  2  bad input"), "{h}");
        assert!(h.contains("  4  record -- CMD"), "{h}");
        assert!(!h.contains("  3  ") && !h.contains("  5  "), "{h}");
    }
}
