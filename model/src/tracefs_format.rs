//! Tracepoints as the kernel names and describes them: `category:name`, and the
//! `field:` lines of a tracepoint's `format` file (where each field of its record is).
//! Pure text parsing (fuzzed), used by the tracer's loader.

/// Where tracefs is mounted on any kernel since 4.1.
pub const TRACEFS: &str = "/sys/kernel/tracing";
/// The older location, under debugfs.
pub const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// A tracepoint named `category:name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracepoint {
    pub category: String,
    pub name: String,
}

impl Tracepoint {
    pub fn new(category: &str, name: &str) -> Self {
        Self {
            category: category.to_owned(),
            name: name.to_owned(),
        }
    }

    /// Parses `category:name`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.split_once(':') {
            Some((c, n)) if !c.is_empty() && !n.is_empty() && !n.contains(':') => {
                Ok(Self::new(c, n))
            }
            _ => Err(format!(
                "'{text}' is not a tracepoint: write it as category:name"
            )),
        }
    }
}

impl std::fmt::Display for Tracepoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.category, self.name)
    }
}

/// One `field:` line of a format file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: u32,
    pub size: u32,
}

/// Parses the `field:` lines of a tracepoint `format` file.
pub fn parse_format(text: &str) -> Vec<Field> {
    text.lines()
        .filter_map(|line| {
            let mut decl = None;
            let mut offset = None;
            let mut size = None;
            for part in line.trim().split(';') {
                let part = part.trim();
                if let Some(d) = part.strip_prefix("field:") {
                    decl = Some(d);
                } else if let Some(o) = part.strip_prefix("offset:") {
                    offset = o.parse().ok();
                } else if let Some(s) = part.strip_prefix("size:") {
                    size = s.parse().ok();
                }
            }
            // `unsigned int exit_reason` or `char comm[16]`: the name is the last word.
            let name = decl?.split_whitespace().last()?;
            let name = name.split('[').next()?;
            Some(Field {
                name: name.to_owned(),
                offset: offset?,
                size: size?,
            })
        })
        .collect()
}
