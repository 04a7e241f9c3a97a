//! Turning a key path (`rule[3].point`) into a line number of the TOML text, so every
//! profile and config error can name file, line and key.

use std::fmt;

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A key path such as `rule[3].point`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<Seg>);

impl KeyPath {
    pub fn root() -> Self {
        KeyPath(Vec::new())
    }
    pub fn key(&self, k: &str) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.to_string()));
        p
    }
    pub fn index(&self, i: usize) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for s in &self.0 {
            match s {
                Seg::Key(k) if first => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(i) => write!(f, "[{i}]")?,
            }
            first = false;
        }
        if first {
            f.write_str("(top level)")?;
        }
        Ok(())
    }
}

/// 1-based line of byte offset `pos` in `src`.
pub fn line_of(src: &str, pos: usize) -> usize {
    src.as_bytes()[..pos.min(src.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The line where `path` is written, or where its nearest written parent is.
pub fn line_of_path(src: &str, path: &KeyPath) -> usize {
    let Ok(doc) = toml_edit::ImDocument::parse(src) else {
        return 1;
    };
    let mut best: Option<usize> = None;
    let mut node = Node::Table(doc.as_table());
    for seg in &path.0 {
        let next = match (seg, node) {
            (Seg::Key(k), n) => {
                let Some(t) = n.table_like() else { break };
                let Some((key, next)) = t.get_key_value(k) else {
                    break;
                };
                best = key.span().or_else(|| next.span()).map(|s| s.start).or(best);
                Node::Item(next)
            }
            (Seg::Index(i), Node::Item(it)) => {
                if let Some(aot) = it.as_array_of_tables() {
                    let Some(t) = aot.get(*i) else { break };
                    best = t.span().map(|s| s.start).or(best);
                    Node::Table(t)
                } else if let Some(arr) = it.as_array() {
                    let Some(v) = arr.get(*i) else { break };
                    best = v.span().map(|s| s.start).or(best);
                    Node::Value(v)
                } else {
                    break;
                }
            }
            (Seg::Index(i), Node::Value(v)) => {
                let Some(arr) = v.as_array() else { break };
                let Some(v) = arr.get(*i) else { break };
                best = v.span().map(|s| s.start).or(best);
                Node::Value(v)
            }
            (Seg::Index(_), Node::Table(_)) => break,
        };
        node = next;
    }
    best.map(|p| line_of(src, p)).unwrap_or(1)
}

#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a toml_edit::Item),
    Table(&'a toml_edit::Table),
    Value(&'a toml_edit::Value),
}

impl<'a> Node<'a> {
    fn table_like(self) -> Option<&'a dyn toml_edit::TableLike> {
        match self {
            Node::Item(i) => i.as_table_like(),
            Node::Table(t) => Some(t),
            Node::Value(v) => v.as_inline_table().map(|t| t as &dyn toml_edit::TableLike),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_lines() {
        let src = "a = 1\n[[rule]]\nx = 1\n[[rule]]\npoint = \"p\"\nbits = [\n  { bit = 1 },\n  { bit = 2 },\n]\n";
        let p = KeyPath::root().key("rule").index(1).key("point");
        assert_eq!(line_of_path(src, &p), 5);
        assert_eq!(p.to_string(), "rule[1].point");
        let p = KeyPath::root()
            .key("rule")
            .index(1)
            .key("bits")
            .index(1)
            .key("bit");
        assert_eq!(line_of_path(src, &p), 8);
        let p = KeyPath::root().key("rule").index(1).key("missing");
        assert_eq!(line_of_path(src, &p), 4);
        assert_eq!(line_of_path(src, &KeyPath::root().key("a")), 1);
    }
}
