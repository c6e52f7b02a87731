//! The layer check: the imports between the top-level modules of `ztunnel-user/src` must form
//! no cycle, so that the crate reads (and could be split) from the bottom layer up.
//! `cargo xtask layers` prints the layers; the unit test below fails on any cycle and names,
//! for each edge of it, a file and line that makes the edge.
//!
//! A file belongs to the top-level module its path starts with: `src/foo.rs` and everything
//! under `src/foo/` are `foo`. `main.rs`, `lib.rs` and `src/bin/` are the roots: they belong
//! to no module and are skipped. A reference to another module is a path from the crate
//! root: `crate::foo` (also `$crate::foo`), every item of a group such as
//! `crate::{foo::X, bar::{Y, Z}}` (here `foo` and `bar`), and `super::` when it climbs up to
//! the root (from `src/foo.rs` itself, not from its inline `mod tests`). Comments and the
//! contents of string and character literals are not code; `#[cfg(test)]` modules are, so
//! their imports count too.

use anyhow::{Context, Result, bail};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

/// The crate whose modules are checked, relative to the workspace root.
const CHECKED_SRC: &str = "ztunnel-user/src";

/// `cargo xtask layers`: the module graph, lowest layer first; fails on a cycle.
pub fn run() -> Result<ExitCode> {
    let graph = Graph::of_workspace(&ztunnel_lab::topology::workspace_root())?;
    print!("{}", graph.layers());
    match graph.cycles() {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(report) => {
            eprintln!("\n{report}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// One `.rs` file of the checked crate.
pub struct SourceFile {
    /// Relative to the crate's `src/`, with `/` separators: `proxy/outbound.rs`.
    pub in_src: String,
    pub text: String,
}

/// Where an edge is made: a file (as shown to people) and a 1-based line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    pub file: String,
    pub line: usize,
}

/// The top-level modules and who uses whom, each edge with the first place that makes it.
pub struct Graph {
    modules: BTreeSet<String>,
    /// from -> to -> where.
    edges: BTreeMap<String, BTreeMap<String, Place>>,
}

impl Graph {
    /// Reads every `.rs` file of `ztunnel-user/src` in the workspace at `root`.
    pub fn of_workspace(root: &Path) -> Result<Graph> {
        let src = root.join(CHECKED_SRC);
        let mut files = Vec::new();
        collect_sources(&src, &src, &mut files)?;
        if files.is_empty() {
            bail!("no .rs file under {}", src.display());
        }
        Ok(Graph::of_sources(CHECKED_SRC, &files))
    }

    /// The graph of `files`; places are shown as `<shown_src>/<in_src>:<line>`.
    pub fn of_sources(shown_src: &str, files: &[SourceFile]) -> Graph {
        let mut files: Vec<&SourceFile> = files.iter().collect();
        files.sort_by(|a, b| a.in_src.cmp(&b.in_src));
        let modules: BTreeSet<String> = files
            .iter()
            .filter_map(|file| module_path(&file.in_src)?.into_iter().next())
            .collect();
        let mut edges: BTreeMap<String, BTreeMap<String, Place>> = BTreeMap::new();
        for file in files {
            let Some(path) = module_path(&file.in_src) else {
                continue;
            };
            let from = &path[0];
            for reference in references(&path, &file.text) {
                if reference.to == *from || !modules.contains(&reference.to) {
                    continue;
                }
                edges
                    .entry(from.clone())
                    .or_default()
                    .entry(reference.to)
                    .or_insert_with(|| Place {
                        file: format!("{shown_src}/{}", file.in_src),
                        line: reference.line,
                    });
            }
        }
        Graph { modules, edges }
    }

    fn uses(&self, module: &str) -> impl Iterator<Item = &String> {
        self.edges.get(module).into_iter().flat_map(|to| to.keys())
    }

    fn place(&self, from: &str, to: &str) -> Option<&Place> {
        self.edges.get(from)?.get(to)
    }

    /// Strongly connected components (Tarjan), each sorted, in no particular order.
    fn components(&self) -> Vec<Vec<String>> {
        struct Search<'g> {
            graph: &'g Graph,
            next_index: usize,
            index: BTreeMap<&'g str, usize>,
            low: BTreeMap<&'g str, usize>,
            stack: Vec<&'g str>,
            on_stack: BTreeSet<&'g str>,
            found: Vec<Vec<String>>,
        }
        impl<'g> Search<'g> {
            fn visit(&mut self, module: &'g str) {
                self.index.insert(module, self.next_index);
                self.low.insert(module, self.next_index);
                self.next_index += 1;
                self.stack.push(module);
                self.on_stack.insert(module);
                let graph = self.graph;
                for used in graph.uses(module) {
                    let used = used.as_str();
                    if !self.index.contains_key(used) {
                        self.visit(used);
                        let low = self.low[module].min(self.low[used]);
                        self.low.insert(module, low);
                    } else if self.on_stack.contains(used) {
                        let low = self.low[module].min(self.index[used]);
                        self.low.insert(module, low);
                    }
                }
                if self.low[module] == self.index[module] {
                    let mut component = Vec::new();
                    while let Some(member) = self.stack.pop() {
                        self.on_stack.remove(member);
                        component.push(member.to_owned());
                        if member == module {
                            break;
                        }
                    }
                    component.sort();
                    self.found.push(component);
                }
            }
        }
        let mut search = Search {
            graph: self,
            next_index: 0,
            index: BTreeMap::new(),
            low: BTreeMap::new(),
            stack: Vec::new(),
            on_stack: BTreeSet::new(),
            found: Vec::new(),
        };
        for module in &self.modules {
            if !search.index.contains_key(module.as_str()) {
                search.visit(module);
            }
        }
        search.found
    }

    /// The modules in cycles, as components of more than one module, sorted.
    fn tangles(&self) -> Vec<Vec<String>> {
        let mut tangles: Vec<Vec<String>> = self
            .components()
            .into_iter()
            .filter(|component| component.len() > 1)
            .collect();
        tangles.sort();
        tangles
    }

    /// Cycles within `tangle` that together use every edge among its modules: for each edge
    /// not yet in one, the edge plus the shortest way back.
    fn covering_cycles(&self, tangle: &[String]) -> Vec<Vec<String>> {
        let members: BTreeSet<&str> = tangle.iter().map(String::as_str).collect();
        let inner: Vec<(&str, &str)> = tangle
            .iter()
            .flat_map(|from| {
                self.uses(from)
                    .filter(|to| members.contains(to.as_str()))
                    .map(move |to| (from.as_str(), to.as_str()))
            })
            .collect();
        let mut covered: BTreeSet<(&str, &str)> = BTreeSet::new();
        let mut cycles = Vec::new();
        for &(from, to) in &inner {
            if covered.contains(&(from, to)) {
                continue;
            }
            let Some(back) = self.shortest_path(to, from, &members) else {
                continue;
            };
            let mut cycle = vec![from.to_owned()];
            cycle.extend(back);
            for pair in cycle.windows(2) {
                let (a, b) = (&pair[0], &pair[1]);
                if let Some(&edge) = inner.iter().find(|(x, y)| x == a && y == b) {
                    covered.insert(edge);
                }
            }
            cycles.push(cycle);
        }
        cycles
    }

    /// The modules from `start` to `goal` (both included) over the fewest edges, staying
    /// within `members`.
    fn shortest_path(
        &self,
        start: &str,
        goal: &str,
        members: &BTreeSet<&str>,
    ) -> Option<Vec<String>> {
        let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = VecDeque::from([start]);
        let mut seen = BTreeSet::from([start]);
        while let Some(module) = queue.pop_front() {
            if module == goal {
                let mut path = vec![goal.to_owned()];
                let mut at = goal;
                while let Some(&before) = came_from.get(at) {
                    path.push(before.to_owned());
                    at = before;
                }
                path.reverse();
                return Some(path);
            }
            for used in self.uses(module) {
                let used = used.as_str();
                if members.contains(used) && seen.insert(used) {
                    came_from.insert(used, module);
                    queue.push_back(used);
                }
            }
        }
        None
    }

    /// Ok when the modules form no cycle; otherwise what a developer needs to break each one.
    pub fn cycles(&self) -> std::result::Result<(), String> {
        let tangles = self.tangles();
        if tangles.is_empty() {
            return Ok(());
        }
        let mut report = format!(
            "the imports between the top-level modules of {CHECKED_SRC} form {} cycle{}; \
             break each by removing one of its edges (one place that makes each edge is shown):\n",
            if tangles.len() == 1 {
                "a"
            } else {
                "more than one"
            },
            if tangles.len() == 1 { "" } else { "s" },
        );
        for tangle in &tangles {
            let _ = writeln!(
                report,
                "\nmodules that all reach one another: {}",
                tangle.join(", ")
            );
            for cycle in self.covering_cycles(tangle) {
                let _ = writeln!(report, "  cycle: {}", cycle.join(" -> "));
                for pair in cycle.windows(2) {
                    if let Some(place) = self.place(&pair[0], &pair[1]) {
                        let _ = writeln!(
                            report,
                            "    {} -> {}: {}:{}",
                            pair[0], pair[1], place.file, place.line
                        );
                    }
                }
            }
        }
        Err(report)
    }

    /// Layer of each module: 0 for a module that uses no other, else one more than the highest
    /// layer it uses outside its own cycle. Modules of one cycle share a layer.
    fn layer_numbers(&self) -> BTreeMap<String, usize> {
        let components = self.components();
        let component_of: BTreeMap<&str, usize> = components
            .iter()
            .enumerate()
            .flat_map(|(i, members)| members.iter().map(move |m| (m.as_str(), i)))
            .collect();
        // Tarjan emits a component only after every component it uses.
        let mut layer_of_component = vec![0; components.len()];
        for (i, members) in components.iter().enumerate() {
            let below = members
                .iter()
                .flat_map(|m| self.uses(m))
                .map(|used| component_of[used.as_str()])
                .filter(|&c| c != i)
                .map(|c| layer_of_component[c] + 1)
                .max()
                .unwrap_or(0);
            layer_of_component[i] = below;
        }
        self.modules
            .iter()
            .map(|m| (m.clone(), layer_of_component[component_of[m.as_str()]]))
            .collect()
    }

    /// `module -> [modules it uses]`, grouped by layer, lowest first.
    pub fn layers(&self) -> String {
        let numbers = self.layer_numbers();
        let tangled: BTreeSet<String> = self.tangles().into_iter().flatten().collect();
        let mut by_layer: BTreeMap<usize, Vec<&String>> = BTreeMap::new();
        for (module, layer) in &numbers {
            by_layer.entry(*layer).or_default().push(module);
        }
        let mut out = format!(
            "top-level modules of {CHECKED_SRC}, lowest layer first (module -> the modules it uses):\n"
        );
        for (layer, modules) in by_layer {
            let _ = writeln!(out, "layer {layer}");
            for module in modules {
                let uses: Vec<&str> = self.uses(module).map(String::as_str).collect();
                let mark = if tangled.contains(module) {
                    "   (in a cycle)"
                } else {
                    ""
                };
                let _ = writeln!(out, "  {module} -> [{}]{mark}", uses.join(", "));
            }
        }
        out
    }
}

/// Every `.rs` file under `dir`, named relative to `src`.
fn collect_sources(src: &Path, dir: &Path, files: &mut Vec<SourceFile>) -> Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        if path.is_dir() {
            collect_sources(src, &path, files)?;
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let relative = path.strip_prefix(src).unwrap_or(&path);
            let in_src = relative
                .components()
                .map(|part| part.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            files.push(SourceFile { in_src, text });
        }
    }
    Ok(())
}

/// The module a file is, from the crate root (`proxy/outbound.rs`: `proxy::outbound`); None
/// for the roots (`main.rs`, `lib.rs`, `bin/`).
fn module_path(in_src: &str) -> Option<Vec<String>> {
    let stem = in_src.strip_suffix(".rs")?;
    let mut parts: Vec<&str> = stem.split('/').collect();
    if parts.len() > 1 && parts.last() == Some(&"mod") {
        parts.pop();
    }
    match parts[..] {
        ["main" | "lib" | "mod"] | ["bin", ..] => None,
        _ => Some(parts.into_iter().map(str::to_owned).collect()),
    }
}

/// A top-level module a file refers to, and the line.
#[derive(Debug, PartialEq, Eq)]
struct Reference {
    to: String,
    line: usize,
}

/// The top-level modules the code of the file at `module` (its path from the crate root)
/// names by a path from the root.
fn references(module: &[String], text: &str) -> Vec<Reference> {
    let tokens = tokens(&code_only(text));
    let mut found = Vec::new();
    // Inline `mod name { ... }` blocks open at the current point, with their brace depth.
    let mut inline: Vec<(&str, usize)> = Vec::new();
    let mut depth = 0;
    // Not a path start: the `crate` of `a::crate` (nonsense), the `super` of `super::super`.
    let is_path_start = |i: usize| i == 0 || tokens[i - 1].kind != Kind::PathSep;
    for i in 0..tokens.len() {
        match &tokens[i].kind {
            Kind::Open => {
                depth += 1;
                if let [.., a, b] = &tokens[..i]
                    && a.kind == Kind::Ident("mod".into())
                    && let Kind::Ident(name) = &b.kind
                {
                    inline.push((name, depth));
                }
            }
            Kind::Close => {
                if inline.last().is_some_and(|&(_, at)| at == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Kind::Ident(word)
                if word == "crate"
                    && is_path_start(i)
                    && tokens.get(i + 1).is_some_and(|t| t.kind == Kind::PathSep) =>
            {
                root_items(&tokens, i + 2, &mut found);
            }
            Kind::Ident(word) if word == "super" && is_path_start(i) => {
                let mut climbs = 0;
                let mut at = i;
                while tokens
                    .get(at)
                    .is_some_and(|t| t.kind == Kind::Ident("super".into()))
                    && tokens.get(at + 1).is_some_and(|t| t.kind == Kind::PathSep)
                {
                    climbs += 1;
                    at += 2;
                }
                // Where the file's code is: its module, then the inline modules around it.
                let here = module.len() + inline.len();
                if climbs == here {
                    root_items(&tokens, at, &mut found);
                }
            }
            _ => {}
        }
    }
    found
}

/// The first segment of each path that starts at `tokens[at]`, just after `crate::`: one
/// name, or each item of a `{...}` group.
fn root_items(tokens: &[Token], at: usize, found: &mut Vec<Reference>) {
    match tokens.get(at).map(|t| &t.kind) {
        Some(Kind::Ident(name)) if name != "self" && name != "super" => found.push(Reference {
            to: name.clone(),
            line: tokens[at].line,
        }),
        Some(Kind::Open) => {
            group_items(tokens, at, found);
        }
        _ => {}
    }
}

/// The first names of the items of the group opened at `tokens[open]`; returns the index
/// just past its closing brace.
fn group_items(tokens: &[Token], open: usize, found: &mut Vec<Reference>) -> usize {
    let mut at = open + 1;
    let mut item_start = true;
    let mut depth = 0;
    while let Some(token) = tokens.get(at) {
        match &token.kind {
            Kind::Open if item_start => {
                // `{{a, b}, c}`: the inner group's items start at the root too.
                at = group_items(tokens, at, found);
                item_start = false;
                continue;
            }
            Kind::Ident(name) if item_start => {
                if name != "self" {
                    found.push(Reference {
                        to: name.clone(),
                        line: token.line,
                    });
                }
                item_start = false;
            }
            Kind::Open => depth += 1,
            Kind::Close if depth == 0 => return at + 1,
            Kind::Close => depth -= 1,
            Kind::Comma if depth == 0 => item_start = true,
            _ => {}
        }
        at += 1;
    }
    at
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    Ident(String),
    /// `::`
    PathSep,
    Open,
    Close,
    Comma,
    Other,
}

#[derive(Debug)]
struct Token {
    kind: Kind,
    line: usize,
}

/// The tokens that matter for paths, from code with comments and literals blanked out.
fn tokens(code: &str) -> Vec<Token> {
    let chars: Vec<char> = code.chars().collect();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let kind = match c {
            '\n' => {
                line += 1;
                i += 1;
                continue;
            }
            c if c.is_whitespace() => {
                i += 1;
                continue;
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                let mut word: String = chars[start..i].iter().collect();
                // A raw identifier: `r#type` is `type`.
                if word == "r"
                    && chars.get(i) == Some(&'#')
                    && chars
                        .get(i + 1)
                        .is_some_and(|&c| c.is_alphabetic() || c == '_')
                {
                    let start = i + 1;
                    i = start;
                    while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                        i += 1;
                    }
                    word = chars[start..i].iter().collect();
                }
                tokens.push(Token {
                    kind: Kind::Ident(word),
                    line,
                });
                continue;
            }
            c if c.is_ascii_digit() => {
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                tokens.push(Token {
                    kind: Kind::Other,
                    line,
                });
                continue;
            }
            ':' if chars.get(i + 1) == Some(&':') => {
                i += 1;
                Kind::PathSep
            }
            '{' => Kind::Open,
            '}' => Kind::Close,
            ',' => Kind::Comma,
            _ => Kind::Other,
        };
        tokens.push(Token { kind, line });
        i += 1;
    }
    tokens
}

/// `text` with every comment and the contents of every string and character literal replaced
/// by spaces (line breaks kept, so lines still count right).
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |out: &mut String, c: char| out.push(if c == '\n' { '\n' } else { ' ' });
    let starts_word = |i: usize| i == 0 || !(chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                blank(&mut out, chars[i]);
                i += 1;
            }
            continue;
        }
        if c == '/' && next == Some('*') {
            let mut nesting = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    nesting += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    nesting -= 1;
                    out.push_str("  ");
                    i += 2;
                    if nesting == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
            }
            continue;
        }
        // Raw strings: r"...", r#"..."#, br"...", cr"..." (the prefix stays; it is a word).
        let prefixed = i > 0 && matches!(chars[i - 1], 'b' | 'c') && starts_word(i - 1);
        if c == 'r' && (starts_word(i) || prefixed) {
            let mut hashes = 0;
            while chars.get(i + 1 + hashes) == Some(&'#') {
                hashes += 1;
            }
            if chars.get(i + 1 + hashes) == Some(&'"') {
                out.push('r');
                out.extend(std::iter::repeat_n(' ', hashes + 1));
                i += hashes + 2;
                while i < chars.len() {
                    if chars[i] == '"' && (0..hashes).all(|h| chars.get(i + 1 + h) == Some(&'#')) {
                        out.extend(std::iter::repeat_n(' ', hashes + 1));
                        i += hashes + 1;
                        break;
                    }
                    blank(&mut out, chars[i]);
                    i += 1;
                }
                continue;
            }
        }
        if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() {
                match chars[i] {
                    '\\' => {
                        blank(&mut out, chars[i]);
                        if let Some(&escaped) = chars.get(i + 1) {
                            blank(&mut out, escaped);
                        }
                        i += 2;
                    }
                    '"' => {
                        out.push(' ');
                        i += 1;
                        break;
                    }
                    other => {
                        blank(&mut out, other);
                        i += 1;
                    }
                }
            }
            continue;
        }
        if c == '\'' {
            // A character literal ('x', '\n', '\u{1F600}'), not a lifetime or label ('a).
            let end = if next == Some('\\') {
                (i + 3..chars.len().min(i + 12)).find(|&j| chars[j] == '\'')
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            if let Some(end) = end {
                for &literal in &chars[i..=end] {
                    blank(&mut out, literal);
                }
                i = end + 1;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(in_src: &str, text: &str) -> SourceFile {
        SourceFile {
            in_src: in_src.to_owned(),
            text: text.to_owned(),
        }
    }

    fn targets(module: &str, text: &str) -> Vec<(String, usize)> {
        let path: Vec<String> = module.split("::").map(str::to_owned).collect();
        references(&path, text)
            .into_iter()
            .map(|r| (r.to, r.line))
            .collect()
    }

    fn named(pairs: &[(&str, usize)]) -> Vec<(String, usize)> {
        pairs.iter().map(|&(m, l)| (m.to_owned(), l)).collect()
    }

    #[test]
    fn a_file_belongs_to_its_top_level_module() {
        let path = |in_src| module_path(in_src).map(|p| p.join("::"));
        assert_eq!(path("proxy.rs").as_deref(), Some("proxy"));
        assert_eq!(path("proxy/mod.rs").as_deref(), Some("proxy"));
        assert_eq!(
            path("proxy/outbound.rs").as_deref(),
            Some("proxy::outbound")
        );
        assert_eq!(
            path("config/reload/mod.rs").as_deref(),
            Some("config::reload")
        );
        assert_eq!(path("main.rs"), None);
        assert_eq!(path("lib.rs"), None);
        assert_eq!(path("bin/ztunnel-cni.rs"), None);
        assert_eq!(path("notes.txt"), None);
    }

    #[test]
    fn plain_and_grouped_uses() {
        let text = "use crate::api::{PodSpec, Request};\n\
                    use crate::{config::MeshConfig, identity::{Identity, ca}, self};\n\
                    use crate::{\n    hbone,\n    metrics::{self as m},\n};\n";
        assert_eq!(
            targets("pods", text),
            named(&[
                ("api", 1),
                ("config", 2),
                ("identity", 2),
                ("hbone", 4),
                ("metrics", 5)
            ])
        );
    }

    #[test]
    fn paths_inside_code_and_nested_groups() {
        let text = "fn f() {\n    let now = crate::process::unix_now();\n    \
                    let x: crate::web::Body = Default::default();\n}\n\
                    use crate::{{authz::Policy, mesh}, output::Table};\n\
                    macro_rules! m { () => { $crate::netns::open() } }\n";
        assert_eq!(
            targets("cli", text),
            named(&[
                ("process", 2),
                ("web", 3),
                ("authz", 5),
                ("mesh", 5),
                ("output", 5),
                ("netns", 6)
            ])
        );
    }

    #[test]
    fn comments_and_literals_are_not_code() {
        let text = "//! Uses crate::proxy, as the docs say.\n\
                    // crate::hbone would be a cycle\n\
                    /// See [`crate::metrics`].\n\
                    /* crate::identity /* nested crate::mesh */ still crate::web */\n\
                    const HELP: &str = \"see crate::config\";\n\
                    const RAW: &str = r#\"crate::authz \"quoted\"\"#;\n\
                    const QUOTE: char = '\"'; const TICK: char = '\\''; fn f<'a>(x: &'a str) {}\n\
                    use crate::api; // crate::readiness\n";
        assert_eq!(targets("cli", text), named(&[("api", 8)]));
    }

    #[test]
    fn super_counts_only_when_it_climbs_to_the_root() {
        // In `src/proxy.rs`, `super` is the root; in its inline `mod tests`, it is `proxy`.
        let text = "use super::hbone::Pool;\n\
                    mod tests {\n    use super::*;\n    use super::super::metrics;\n}\n\
                    pub(super) fn f() {}\n";
        assert_eq!(
            targets("proxy", text),
            named(&[("hbone", 1), ("metrics", 4)])
        );
        // In `src/proxy/outbound.rs`, `super` is `proxy`: never another module.
        assert_eq!(
            targets(
                "proxy::outbound",
                "use super::carry;\nuse super::super::hbone;\n"
            ),
            named(&[("hbone", 2)])
        );
    }

    #[test]
    fn a_three_cycle_is_named_with_a_place_for_each_edge() {
        let files = [
            file("a.rs", "use crate::b::B;\n"),
            file("b/mod.rs", "\n\nuse crate::c;\n"),
            file("b/inner.rs", "use crate::leaf;\n"),
            file("c.rs", "// crate::b\nfn f() { crate::a::go(); }\n"),
            file("leaf.rs", "pub fn f() {}\n"),
            file(
                "lib.rs",
                "pub mod a; pub mod b; pub mod c; pub mod leaf;\nuse crate::a;\n",
            ),
        ];
        let graph = Graph::of_sources("src", &files);
        let report = graph.cycles().unwrap_err();
        assert!(
            report.contains("modules that all reach one another: a, b, c"),
            "{report}"
        );
        assert!(report.contains("cycle: a -> b -> c -> a"), "{report}");
        assert!(report.contains("a -> b: src/a.rs:1"), "{report}");
        assert!(report.contains("b -> c: src/b/mod.rs:3"), "{report}");
        assert!(report.contains("c -> a: src/c.rs:2"), "{report}");
        assert!(!report.contains("leaf"), "{report}");
        let layers = graph.layers();
        assert!(layers.contains("layer 0\n  leaf -> []\n"), "{layers}");
        assert!(
            layers.contains("layer 1\n  a -> [b]   (in a cycle)\n"),
            "{layers}"
        );
    }

    #[test]
    fn every_edge_of_a_tangle_is_in_a_reported_cycle() {
        // a <-> b and b <-> c: two cycles, four edges.
        let files = [
            file("a.rs", "use crate::b;\n"),
            file("b.rs", "use crate::{a, c};\n"),
            file("c.rs", "use crate::b;\n"),
        ];
        let report = Graph::of_sources("src", &files).cycles().unwrap_err();
        for edge in ["a -> b:", "b -> a:", "b -> c:", "c -> b:"] {
            assert!(report.contains(edge), "{edge} missing from {report}");
        }
    }

    #[test]
    fn layers_go_from_the_bottom_up() {
        let files = [
            file("app.rs", "use crate::{proxy, settings};\n"),
            file("proxy.rs", "use crate::settings::Settings;\n"),
            file("settings.rs", "pub struct Settings;\n"),
        ];
        let graph = Graph::of_sources("src", &files);
        assert_eq!(graph.cycles(), Ok(()));
        assert_eq!(
            graph.layers(),
            format!(
                "top-level modules of {CHECKED_SRC}, lowest layer first (module -> the modules it uses):\n\
                 layer 0\n  settings -> []\n\
                 layer 1\n  proxy -> [settings]\n\
                 layer 2\n  app -> [proxy, settings]\n"
            )
        );
    }

    /// The real check. Fails while ztunnel-user's top-level modules form a cycle (while the
    /// restructuring is under way they do); its message names each cycle and, for each edge,
    /// a place that makes it.
    #[test]
    fn ztunnel_user_modules_form_no_cycle() {
        let graph = Graph::of_workspace(&ztunnel_lab::topology::workspace_root()).unwrap();
        if let Err(report) = graph.cycles() {
            panic!("{report}");
        }
    }
}
