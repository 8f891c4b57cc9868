//! Slurm's hostlist syntax (`SLURM_JOB_NODELIST`), parsed without calling
//! `scontrol show hostnames`.
//!
//! A hostlist is a comma-separated list of items; an item is literal text
//! with bracket groups, each a comma-separated list of numbers and ranges:
//!
//! ```text
//! gpu[01-04,07],cpu3        gpu01 gpu02 gpu03 gpu04 gpu07 cpu3
//! n[098-101]                n098 n099 n100 n101   (width of the low end, zero padded)
//! rack[1-2]-node[01-02]     rack1-node01 rack1-node02 rack2-node01 rack2-node02
//! ```
//!
//! Several groups in one item expand as a product, the last group varying
//! fastest, as Slurm does. Empty items (`a,,b`, a trailing comma) are
//! skipped, as Slurm does; everything Slurm rejects (a reversed range, an
//! empty or unclosed bracket, letters inside one) is an error here too.

use std::fmt;

/// A parsed hostlist: its items in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hostlist {
    items: Vec<Item>,
}

/// One comma-separated item: literal text and bracket groups in order.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Item {
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Group(Vec<Range>),
}

/// `lo-hi` (or one number), printed zero-padded to `width` digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    lo: u64,
    hi: u64,
    width: usize,
}

/// Why a hostlist does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid hostlist {list:?}: {why}")]
pub struct HostlistError {
    pub list: String,
    pub why: String,
}

impl Hostlist {
    pub fn parse(list: &str) -> Result<Self, HostlistError> {
        let fail = |why: String| HostlistError {
            list: list.to_owned(),
            why,
        };
        let mut items = Vec::new();
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = list.char_indices();
        while let Some((at, c)) = chars.next() {
            match c {
                ',' => {
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    if !parts.is_empty() {
                        items.push(Item {
                            parts: std::mem::take(&mut parts),
                        });
                    }
                }
                '[' => {
                    let body: String = chars
                        .by_ref()
                        .map(|(_, c)| c)
                        .take_while(|&c| c != ']')
                        .collect();
                    let closed = list[at + 1..].contains(']');
                    if !closed {
                        return Err(fail(format!("the bracket at byte {at} is not closed")));
                    }
                    if body.contains('[') {
                        return Err(fail(format!("a bracket inside the bracket at byte {at}")));
                    }
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Group(parse_group(&body).map_err(fail)?));
                }
                ']' => return Err(fail(format!("the bracket at byte {at} closes nothing"))),
                c if c.is_whitespace() || c.is_control() => {
                    return Err(fail(format!("a space or control character at byte {at}")));
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        if !parts.is_empty() {
            items.push(Item { parts });
        }
        if items.is_empty() {
            return Err(fail("it names no host".to_owned()));
        }
        Ok(Self { items })
    }

    /// The first host (the one Slurm lists first).
    pub fn first(&self) -> String {
        let mut name = String::new();
        for part in &self.items[0].parts {
            match part {
                Part::Text(text) => name.push_str(text),
                Part::Group(ranges) => name.push_str(&ranges[0].format(ranges[0].lo)),
            }
        }
        name
    }

    /// How many hosts it names (duplicates counted), without expanding it.
    pub fn count(&self) -> u64 {
        self.items
            .iter()
            .map(|item| {
                item.parts
                    .iter()
                    .map(|part| match part {
                        Part::Text(_) => 1,
                        Part::Group(ranges) => ranges.iter().map(|r| r.hi - r.lo + 1).sum(),
                    })
                    .fold(1u64, u64::saturating_mul)
            })
            .fold(0u64, u64::saturating_add)
    }

    /// Every host, in Slurm's order.
    pub fn hosts(&self) -> impl Iterator<Item = String> + '_ {
        self.items.iter().flat_map(Item::hosts)
    }
}

impl Item {
    fn hosts(&self) -> Vec<String> {
        let mut names = vec![String::new()];
        for part in &self.parts {
            names = match part {
                Part::Text(text) => names.into_iter().map(|n| n + text).collect(),
                Part::Group(ranges) => names
                    .iter()
                    .flat_map(|n| {
                        ranges.iter().flat_map(move |r| {
                            (r.lo..=r.hi).map(move |v| format!("{n}{}", r.format(v)))
                        })
                    })
                    .collect(),
            };
        }
        names
    }
}

impl Range {
    fn format(self, value: u64) -> String {
        format!("{value:0width$}", width = self.width)
    }
}

fn parse_group(body: &str) -> Result<Vec<Range>, String> {
    body.split(',').map(parse_range).collect()
}

fn parse_range(text: &str) -> Result<Range, String> {
    let number = |s: &str| -> Result<u64, String> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "{text:?} in brackets is not a number or a range N-M"
            ));
        }
        s.parse()
            .map_err(|_| format!("{s} in brackets is too large"))
    };
    let (lo_text, hi_text) = text.split_once('-').unwrap_or((text, text));
    let (lo, hi) = (number(lo_text)?, number(hi_text)?);
    if hi < lo {
        return Err(format!("the range {text} runs backwards"));
    }
    Ok(Range {
        lo,
        hi,
        width: lo_text.len(),
    })
}

impl fmt::Display for Hostlist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, item) in self.items.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            for part in &item.parts {
                match part {
                    Part::Text(text) => f.write_str(text)?,
                    Part::Group(ranges) => {
                        f.write_str("[")?;
                        for (j, r) in ranges.iter().enumerate() {
                            if j > 0 {
                                f.write_str(",")?;
                            }
                            if r.lo == r.hi {
                                f.write_str(&r.format(r.lo))?;
                            } else {
                                write!(f, "{}-{}", r.format(r.lo), r.format(r.hi))?;
                            }
                        }
                        f.write_str("]")?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(list: &str) -> Vec<String> {
        let parsed = Hostlist::parse(list).unwrap();
        let all: Vec<String> = parsed.hosts().collect();
        assert_eq!(parsed.count(), all.len() as u64, "{list}");
        assert_eq!(parsed.first(), all[0], "{list}");
        all
    }

    // The expected lists are what `scontrol show hostnames` (Slurm 22.05) prints.
    #[test]
    fn expands_as_slurm_does() {
        assert_eq!(
            hosts("gpu[01-04,07],cpu3"),
            ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"]
        );
        assert_eq!(hosts("n[8-10]"), ["n8", "n9", "n10"]);
        assert_eq!(hosts("n[098-101]"), ["n098", "n099", "n100", "n101"]);
        assert_eq!(hosts("a[01-3]"), ["a01", "a02", "a03"]);
        assert_eq!(
            hosts("rack[1-2]-node[01-02]"),
            [
                "rack1-node01",
                "rack1-node02",
                "rack2-node01",
                "rack2-node02"
            ]
        );
        assert_eq!(hosts("n[1-2][3-4]"), ["n13", "n14", "n23", "n24"]);
        assert_eq!(hosts("n[1-2],n[2-3]"), ["n1", "n2", "n2", "n3"]);
        assert_eq!(hosts("n1-2"), ["n1-2"]);
        assert_eq!(hosts(",n1,"), ["n1"]);
        assert_eq!(hosts("node01"), ["node01"]);
        assert_eq!(hosts("[1-2]"), ["1", "2"]);
    }

    #[test]
    fn the_first_host_and_the_count_need_no_expansion() {
        let huge = Hostlist::parse("n[0000000-9999999],m[1-2]").unwrap();
        assert_eq!(huge.first(), "n0000000");
        assert_eq!(huge.count(), 10_000_002);
        assert_eq!(
            Hostlist::parse("rack[3-4]-gpu[007-010]").unwrap().first(),
            "rack3-gpu007"
        );
    }

    #[test]
    fn prints_back_what_it_parsed() {
        for list in [
            "gpu[01-04,07],cpu3",
            "rack[1-2]-node[01-02]",
            "n[098-101]",
            "a",
        ] {
            assert_eq!(Hostlist::parse(list).unwrap().to_string(), list);
        }
    }

    #[test]
    fn rejects_what_slurm_rejects() {
        for (list, why) in [
            ("n[3-1]", "the range 3-1 runs backwards"),
            ("n[1-2", "the bracket at byte 1 is not closed"),
            ("n[]", "\"\" in brackets is not a number or a range N-M"),
            ("n[1-2,]", "\"\" in brackets is not a number or a range N-M"),
            (
                "n[a-b]",
                "\"a-b\" in brackets is not a number or a range N-M",
            ),
            ("n[1-2]]", "the bracket at byte 6 closes nothing"),
            ("n[ 1-2]", "\" 1-2\" in brackets is not a number"),
            ("a b", "a space or control character at byte 1"),
            ("n[1[2]]", "a bracket inside the bracket at byte 1"),
            (
                "n[1-99999999999999999999]",
                "99999999999999999999 in brackets is too large",
            ),
            ("", "it names no host"),
            (",", "it names no host"),
        ] {
            let err = Hostlist::parse(list).unwrap_err();
            assert!(err.why.contains(why), "{list:?}: {err}");
            assert!(
                err.to_string()
                    .starts_with(&format!("invalid hostlist {list:?}: "))
            );
        }
    }
}
