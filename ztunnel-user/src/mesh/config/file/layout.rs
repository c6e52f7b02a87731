//! The file's entries as text: which lines are which workload, service or policy, so that a
//! new version of the file is compared with the one in force entry by entry and only the
//! entries whose text changed are parsed. At 50,000 workloads the whole file's parse takes most
//! of a second; finding and hashing its entries, a few milliseconds.
//!
//! Only the layout every such file has in practice is split: the top-level keys `workloads:`,
//! `services:` and `policies:`, each at most once, each followed by a non-empty block list (at
//! any indent, its entries in block or flow style), comments and blank lines anywhere. Anything
//! else returns `None` and the whole file is parsed: flow style at the top, several documents
//! or directives, tabs or CRLF, an empty list, and anchors and aliases (they tie one entry's
//! meaning to another's text). So the split never reads YAML differently: each entry it finds
//! is a region of the file that parses, on its own, to what the whole parse makes of it.

/// Each kind's entries as the file's text, in the file's order.
#[derive(Debug, Default, PartialEq)]
pub(super) struct EntryTexts<'t> {
    pub(super) workloads: Vec<EntryText<'t>>,
    pub(super) services: Vec<EntryText<'t>>,
    pub(super) policies: Vec<EntryText<'t>>,
}

/// An entry's lines, and a hash of them: 128 bits, so two texts of a file never share one by
/// chance.
#[derive(Debug, PartialEq)]
pub(super) struct EntryText<'t> {
    pub(super) text: &'t str,
    pub(super) hash: u128,
}

impl<'t> EntryText<'t> {
    fn new(text: &'t str) -> EntryText<'t> {
        let hash = xxhash_rust::xxh3::xxh3_128(text.as_bytes());
        EntryText { text, hash }
    }
}

/// The file's entries, if it is laid out as described above. One pass: each line is checked,
/// and each entry hashed, while its bytes are in the cache (a file of 50,000 workloads is
/// 12 MB, and every pass over it costs a millisecond or two).
pub(super) fn split(text: &str) -> Option<EntryTexts<'_>> {
    let mut split = Splitter {
        text,
        entries: EntryTexts::default(),
        seen: [false; 3],
        section: None,
    };
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let content = line.strip_suffix('\n').unwrap_or(line);
        let body = content.trim_start_matches(' ');
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        if !plain(content.as_bytes()) {
            return None;
        }
        let indent = content.len() - body.len();
        let is_entry = body == "-" || body.starts_with("- ");
        if indent == 0 && !is_entry {
            split.end_section(start)?;
            split.start_section(body)?;
        } else {
            split.line(start, indent, is_entry)?;
        }
    }
    split.end_section(text.len())?;
    Some(split.entries)
}

/// Whether a line is free of what the split leaves to the whole parse: tabs, carriage returns,
/// and anchors (`&name`) and aliases (`*name`), which may start a node wherever an `&` or `*`
/// starts the line or follows a space or an indicator. Quoted wildcards (`"*"`) are fine.
fn plain(line: &[u8]) -> bool {
    memchr::memchr2(b'\r', b'\t', line).is_none()
        && !memchr::memchr2_iter(b'&', b'*', line).any(|at| {
            at == 0 || matches!(line[at - 1], b' ' | b'[' | b'{' | b',' | b':' | b'-' | b'?')
        })
}

/// The split's state: the section it is in and where its current entry started.
struct Splitter<'t> {
    text: &'t str,
    entries: EntryTexts<'t>,
    /// Which of the three sections were met.
    seen: [bool; 3],
    section: Option<Section>,
}

struct Section {
    index: usize,
    /// The indent of the list's dashes, and where the current entry starts; `None` before the
    /// list's first entry.
    entry: Option<(usize, usize)>,
}

impl<'t> Splitter<'t> {
    /// A top-level line: one of the three keys, met for the first time.
    fn start_section(&mut self, line: &str) -> Option<()> {
        let key = line
            .split_once(" #")
            .map_or(line, |(key, _)| key)
            .trim_end();
        let index = match key {
            "workloads:" => 0,
            "services:" => 1,
            "policies:" => 2,
            _ => return None,
        };
        if std::mem::replace(&mut self.seen[index], true) {
            return None;
        }
        self.section = Some(Section { index, entry: None });
        Some(())
    }

    /// A line inside a section: an entry's first line at the list's indent, or a line of the
    /// current entry, further in.
    fn line(&mut self, start: usize, indent: usize, is_entry: bool) -> Option<()> {
        let section = self.section.as_mut()?;
        match section.entry {
            None if is_entry => section.entry = Some((indent, start)),
            Some((dashes, from)) if indent == dashes && is_entry => {
                let (index, text) = (section.index, self.text);
                section.entry = Some((dashes, start));
                self.list(index).push(EntryText::new(&text[from..start]));
            }
            Some((dashes, _)) if indent > dashes => {}
            _ => return None,
        }
        Some(())
    }

    /// Ends the section in force (if any) at `end`: its last entry runs until there. A section
    /// without an entry is left to the whole parse (YAML reads it as null, not as a list).
    fn end_section(&mut self, end: usize) -> Option<()> {
        let Some(section) = self.section.take() else {
            return Some(());
        };
        let ((_, from), text) = (section.entry?, self.text);
        self.list(section.index)
            .push(EntryText::new(&text[from..end]));
        Some(())
    }

    fn list(&mut self, index: usize) -> &mut Vec<EntryText<'t>> {
        match index {
            0 => &mut self.entries.workloads,
            1 => &mut self.entries.services,
            _ => &mut self.entries.policies,
        }
    }
}
