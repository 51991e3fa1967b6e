//! Users' own labelled text: TSV, CSV or JSON Lines files with named columns, read into
//! [`TextSplits`].
//!
//! * The format comes from the extension (`.tsv`, `.csv`, `.jsonl` / `.ndjson`, each
//!   optionally followed by `.gz`) or is named in [`LabelledOptions::format`]. Gzip is
//!   recognised by its magic bytes whatever the name says.
//! * TSV and CSV need a header row; fields may be quoted as Python's `csv` module and
//!   pandas write them (a field holding the delimiter, a quote or a newline is quoted,
//!   quotes doubled). JSON Lines has one object per line; blank lines are skipped. A
//!   label may be a string, a number or a boolean; the text must be a string.
//! * Splits come from a split column (values `train`, `dev` / `validation` / `valid` /
//!   `val`, `test`): the one named in [`LabelledOptions::split_column`], or a column named
//!   `split` when none is named. Without one, dev and test are held out by seed
//!   ([`LabelledOptions::dev_fraction`], [`LabelledOptions::test_fraction`]), optionally
//!   stratified by label; each split keeps the file's order.
//! * Classes are numbered in sorted order of their names (numerically when every label
//!   is an integer), as [`super::load_text_splits`] numbers them.
//! * A headerless `split<TAB>label<TAB>text` file (the Debian sections fixture) whose
//!   first field is `train`, `dev` or `test` is read as [`super::load_text_splits`]
//!   reads it.
//!
//! A malformed row is an [`Error::Malformed`] naming the file and the line.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::{TextDataset, TextSplits};
use crate::{Error, Result};

/// The file formats [`load_labelled`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Tab-separated values with a header row.
    Tsv,
    /// Comma-separated values with a header row.
    Csv,
    /// One JSON object per line.
    Jsonl,
    /// Plain text, one text per line (blank lines skipped): a single text column,
    /// whatever its name, for [`load_records`] only (it has no labels, no splits).
    Lines,
}

impl FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format> {
        match s.to_ascii_lowercase().as_str() {
            "tsv" | "tab" => Ok(Format::Tsv),
            "csv" => Ok(Format::Csv),
            "jsonl" | "ndjson" | "json-lines" => Ok(Format::Jsonl),
            "lines" | "txt" | "text" => Ok(Format::Lines),
            other => Err(Error::invalid(
                "format",
                format!("expected tsv, csv, jsonl or lines, found `{other}`"),
            )),
        }
    }
}

impl Format {
    /// The format a file name says (`x.csv`, `x.tsv.gz`, `x.jsonl`...).
    pub fn from_path(path: &Path) -> Result<Format> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let name = name.strip_suffix(".gz").unwrap_or(&name);
        let ext = name.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
        ext.parse().map_err(|_| {
            Error::invalid(
                "format",
                format!(
                    "{}: cannot tell the format from the extension `{ext}`; expected .tsv, .csv, \
                     .jsonl or .txt (optionally .gz), or name the format",
                    path.display()
                ),
            )
        })
    }
}

/// How [`load_labelled`] reads a file and splits it.
#[derive(Debug, Clone)]
pub struct LabelledOptions {
    /// The format; `None` takes it from the file name.
    pub format: Option<Format>,
    /// The text column (default `text`).
    pub text_column: String,
    /// The label column (default `label`).
    pub label_column: String,
    /// The split column; `None` uses a column named `split` if the file has one.
    pub split_column: Option<String>,
    /// Fraction held out for dev when there is no split column (default 0.1).
    pub dev_fraction: f64,
    /// Fraction held out for test when there is no split column (default 0.1).
    pub test_fraction: f64,
    /// Hold out the same fraction of every class (default false).
    pub stratify: bool,
    /// Seed of the hold-out (default 0).
    pub seed: u64,
}

impl Default for LabelledOptions {
    fn default() -> Self {
        Self {
            format: None,
            text_column: "text".into(),
            label_column: "label".into(),
            split_column: None,
            dev_fraction: 0.1,
            test_fraction: 0.1,
            stratify: false,
            seed: 0,
        }
    }
}

/// One row: the requested columns' values in order, and its split (0 train, 1 dev,
/// 2 test) when the file names one.
struct Row {
    fields: Vec<String>,
    split: Option<usize>,
}

/// A column to read: its name, what it holds (for errors), and whether it is a label (a
/// trimmed, non-empty value; in JSON also a number or a boolean) or free text.
struct Col<'a> {
    name: &'a str,
    what: &'a str,
    label: bool,
}

fn malformed(path: &Path, line: u64, reason: impl Into<String>) -> Error {
    Error::Malformed {
        path: path.to_path_buf(),
        line,
        reason: reason.into(),
    }
}

fn parse_split(path: &Path, line: u64, v: &str) -> Result<usize> {
    match v.trim().to_ascii_lowercase().as_str() {
        "train" => Ok(0),
        "dev" | "validation" | "valid" | "val" => Ok(1),
        "test" => Ok(2),
        _ => Err(malformed(
            path,
            line,
            format!("split `{v}`, expected train, dev (or validation) or test"),
        )),
    }
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut s = String::new();
    if bytes.starts_with(&[0x1f, 0x8b]) {
        flate2::read::MultiGzDecoder::new(&bytes[..])
            .read_to_string(&mut s)
            .map_err(|e| Error::Corrupt {
                path: path.to_path_buf(),
                reason: format!("not a readable gzip text file: {e}"),
            })?;
    } else {
        s = String::from_utf8(bytes).map_err(|e| Error::Corrupt {
            path: path.to_path_buf(),
            reason: format!("not UTF-8 text: {e}"),
        })?;
    }
    Ok(s.strip_prefix('\u{feff}').map(String::from).unwrap_or(s))
}

/// Whether a TSV looks like the headerless `split<TAB>label<TAB>text` fixture.
fn is_split_label_text(text: &str, opts: &LabelledOptions) -> bool {
    let Some(first) = text.lines().next() else {
        return false;
    };
    let fields: Vec<&str> = first.split('\t').collect();
    fields.len() >= 3
        && ["train", "dev", "test"].contains(&fields[0])
        && !fields
            .iter()
            .any(|f| *f == opts.text_column || *f == opts.label_column)
}

fn column(path: &Path, header: &[&str], name: &str, what: &str) -> Result<usize> {
    header.iter().position(|h| *h == name).ok_or_else(|| {
        malformed(
            path,
            1,
            format!(
                "no {what} column `{name}` in the header; its columns are: {}",
                header.join(", ")
            ),
        )
    })
}

fn read_delimited(
    path: &Path,
    text: &str,
    delimiter: u8,
    cols: &[Col<'_>],
    split_column: Option<&str>,
) -> Result<Vec<Row>> {
    let mut r = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .flexible(false)
        .from_reader(text.as_bytes());
    let header: Vec<String> = r
        .headers()
        .map_err(|e| csv_err(path, e))?
        .iter()
        .map(String::from)
        .collect();
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let idx = cols
        .iter()
        .map(|c| column(path, &header, c.name, c.what))
        .collect::<Result<Vec<_>>>()?;
    let si = match split_column {
        Some(s) => Some(column(path, &header, s, "split")?),
        None => header.iter().position(|h| *h == "split"),
    };
    let mut rows = Vec::new();
    for rec in r.records() {
        let rec = rec.map_err(|e| csv_err(path, e))?;
        let line = rec.position().map(|p| p.line()).unwrap_or(0);
        let mut fields = Vec::with_capacity(cols.len());
        for (c, &i) in cols.iter().zip(&idx) {
            if c.label {
                let v = rec[i].trim();
                if v.is_empty() {
                    return Err(malformed(
                        path,
                        line,
                        format!("empty {} in column `{}`", c.what, c.name),
                    ));
                }
                fields.push(v.to_string());
            } else {
                fields.push(rec[i].to_string());
            }
        }
        let split = si.map(|i| parse_split(path, line, &rec[i])).transpose()?;
        rows.push(Row { fields, split });
    }
    Ok(rows)
}

fn csv_err(path: &Path, e: csv::Error) -> Error {
    let line = e.position().map(|p| p.line()).unwrap_or(0);
    let reason = match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("expected {expected_len} fields (as the header has), found {len}"),
        _ => e.to_string(),
    };
    malformed(path, line, reason)
}

fn read_jsonl(
    path: &Path,
    text: &str,
    cols: &[Col<'_>],
    split_column: Option<&str>,
) -> Result<Vec<Row>> {
    use serde_json::Value;
    let mut rows = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let line = i as u64 + 1;
        if l.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(l)
            .map_err(|e| malformed(path, line, format!("not valid JSON: {e}")))?;
        let Value::Object(o) = v else {
            return Err(malformed(path, line, "expected a JSON object"));
        };
        let get = |k: &str| {
            o.get(k).ok_or_else(|| {
                malformed(
                    path,
                    line,
                    format!(
                        "no key `{k}` (keys: {})",
                        o.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                )
            })
        };
        let mut fields = Vec::with_capacity(cols.len());
        for c in cols {
            let v = match (get(c.name)?, c.label) {
                (Value::String(s), false) => s.clone(),
                (Value::String(s), true) if !s.trim().is_empty() => s.trim().to_string(),
                (Value::Number(n), true) => n.to_string(),
                (Value::Bool(b), true) => b.to_string(),
                (other, true) => {
                    return Err(malformed(
                        path,
                        line,
                        format!(
                            "`{}` must be a non-empty string, a number or a boolean, found {other}",
                            c.name
                        ),
                    ))
                }
                (other, false) => {
                    return Err(malformed(
                        path,
                        line,
                        format!("`{}` must be a string, found {other}", c.name),
                    ))
                }
            };
            fields.push(v);
        }
        let split = match split_column {
            Some(k) => Some(get(k)?),
            None => o.get("split"),
        };
        let split = match split {
            None => None,
            Some(Value::String(s)) => Some(parse_split(path, line, s)?),
            Some(other) => {
                return Err(malformed(
                    path,
                    line,
                    format!("the split must be a string, found {other}"),
                ))
            }
        };
        rows.push(Row { fields, split });
    }
    Ok(rows)
}

/// Checks the hold-out fractions.
fn check_fractions(dev_fraction: f64, test_fraction: f64) -> Result<()> {
    for (k, f) in [
        ("dev_fraction", dev_fraction),
        ("test_fraction", test_fraction),
    ] {
        if !(0.0..1.0).contains(&f) {
            return Err(Error::invalid(k, format!("must be in [0, 1), found {f}")));
        }
    }
    if dev_fraction + test_fraction >= 1.0 {
        return Err(Error::invalid(
            "dev_fraction + test_fraction",
            format!(
                "must be below 1 to leave training rows, found {}",
                dev_fraction + test_fraction
            ),
        ));
    }
    Ok(())
}

/// The rows of `path` in `format`, with `cols`.
fn read_rows(
    path: &Path,
    text: &str,
    format: Format,
    cols: &[Col<'_>],
    split_column: Option<&str>,
) -> Result<Vec<Row>> {
    let rows = match format {
        Format::Tsv => read_delimited(path, text, b'\t', cols, split_column)?,
        Format::Csv => read_delimited(path, text, b',', cols, split_column)?,
        Format::Jsonl => read_jsonl(path, text, cols, split_column)?,
        Format::Lines => {
            if cols.len() != 1 || cols[0].label {
                return Err(Error::invalid(
                    "data",
                    format!(
                        "{}: a plain-text file (one text per line) holds one text column, \
                         no labels and no prompt / response pairs; use .tsv, .csv or .jsonl",
                        path.display()
                    ),
                ));
            }
            text.lines()
                .map(|l| l.strip_suffix('\r').unwrap_or(l))
                .filter(|l| !l.trim().is_empty())
                .map(|l| Row {
                    fields: vec![l.to_string()],
                    split: None,
                })
                .collect()
        }
    };
    if rows.is_empty() {
        return Err(Error::invalid(
            "data",
            format!("{}: no rows", path.display()),
        ));
    }
    Ok(rows)
}

/// Reads labelled text from a TSV, CSV or JSON Lines file (see the module docs).
pub fn load_labelled(path: &Path, opts: &LabelledOptions) -> Result<TextSplits> {
    check_fractions(opts.dev_fraction, opts.test_fraction)?;
    let format = match opts.format {
        Some(f) => f,
        None => Format::from_path(path)?,
    };
    let text = read_text(path)?;
    if format == Format::Tsv && is_split_label_text(&text, opts) {
        return super::parse_split_label_text(path, &text);
    }
    let cols = [
        Col {
            name: &opts.text_column,
            what: "text",
            label: false,
        },
        Col {
            name: &opts.label_column,
            what: "label",
            label: true,
        },
    ];
    let rows = read_rows(path, &text, format, &cols, opts.split_column.as_deref())?;
    // Classes in sorted order (numeric when every label is an integer).
    let mut classes: Vec<String> = rows.iter().map(|r| r.fields[1].clone()).collect();
    if classes.iter().all(|c| c.parse::<i64>().is_ok()) {
        classes.sort_by_key(|c| c.parse::<i64>().expect("checked"));
    } else {
        classes.sort();
    }
    classes.dedup();
    let index: BTreeMap<&str, i64> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i as i64))
        .collect();
    let labels: Vec<i64> = rows.iter().map(|r| index[r.fields[1].as_str()]).collect();
    let split_of: Vec<usize> = if rows.iter().all(|r| r.split.is_some()) {
        rows.iter().map(|r| r.split.expect("checked")).collect()
    } else {
        hold_out(
            &labels,
            classes.len(),
            opts.stratify,
            opts.seed,
            opts.dev_fraction,
            opts.test_fraction,
        )
    };
    let mut splits: [TextDataset; 3] = Default::default();
    for ((mut row, y), k) in rows.into_iter().zip(labels).zip(split_of) {
        splits[k].texts.push(std::mem::take(&mut row.fields[0]));
        splits[k].labels.push(y);
    }
    let [train, dev, test] = splits;
    if train.texts.is_empty() {
        return Err(Error::invalid(
            "data",
            format!("{}: no training rows", path.display()),
        ));
    }
    Ok(TextSplits {
        classes,
        train,
        dev,
        test,
    })
}

/// How [`load_records`] reads a file: the string columns wanted and where the splits
/// come from (as for [`load_labelled`], without stratification).
#[derive(Debug, Clone)]
pub struct RecordOptions {
    /// The format; `None`: from the file name.
    pub format: Option<Format>,
    /// The columns (JSON keys) to read, each holding a string.
    pub columns: Vec<String>,
    /// The split column; `None`: a column named `split` if there is one.
    pub split_column: Option<String>,
    /// Fraction held out for dev when the file has no split column.
    pub dev_fraction: f64,
    /// Fraction held out for test when the file has no split column.
    pub test_fraction: f64,
    /// Seed of the hold-out.
    pub seed: u64,
}

impl RecordOptions {
    /// `columns` with the defaults of [`LabelledOptions`] (10% dev, 10% test, seed 0).
    pub fn new(columns: &[&str]) -> Self {
        Self {
            format: None,
            columns: columns.iter().map(|c| c.to_string()).collect(),
            split_column: None,
            dev_fraction: 0.1,
            test_fraction: 0.1,
            seed: 0,
        }
    }
}

/// Rows of string columns (e.g. a prompt and a response) in train, dev and test, each
/// row's values in the order [`RecordOptions::columns`] names them, each split in file
/// order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecordSplits {
    /// Training rows.
    pub train: Vec<Vec<String>>,
    /// Dev rows.
    pub dev: Vec<Vec<String>>,
    /// Test rows.
    pub test: Vec<Vec<String>>,
}

/// Reads string columns from a TSV, CSV or JSON Lines file (see the module docs): the
/// prompt / response pairs or plain texts of language-model data. A missing column is an
/// error naming it and the columns the file has; a value that is not a string (JSON) is
/// an error naming the line.
pub fn load_records(path: &Path, opts: &RecordOptions) -> Result<RecordSplits> {
    check_fractions(opts.dev_fraction, opts.test_fraction)?;
    if opts.columns.is_empty() {
        return Err(Error::invalid("columns", "name at least one column"));
    }
    let format = match opts.format {
        Some(f) => f,
        None => Format::from_path(path)?,
    };
    let text = read_text(path)?;
    let cols: Vec<Col<'_>> = opts
        .columns
        .iter()
        .map(|c| Col {
            name: c,
            what: c,
            label: false,
        })
        .collect();
    let rows = read_rows(path, &text, format, &cols, opts.split_column.as_deref())?;
    let split_of: Vec<usize> = if rows.iter().all(|r| r.split.is_some()) {
        rows.iter().map(|r| r.split.expect("checked")).collect()
    } else {
        let zeros = vec![0; rows.len()];
        hold_out(
            &zeros,
            1,
            false,
            opts.seed,
            opts.dev_fraction,
            opts.test_fraction,
        )
    };
    let mut splits: [Vec<Vec<String>>; 3] = Default::default();
    for (row, k) in rows.into_iter().zip(split_of) {
        splits[k].push(row.fields);
    }
    let [train, dev, test] = splits;
    if train.is_empty() {
        return Err(Error::invalid(
            "data",
            format!("{}: no training rows", path.display()),
        ));
    }
    Ok(RecordSplits { train, dev, test })
}

/// The split of each row when the file names none: a seeded shuffle (per class when
/// stratified), test first, then dev, the rest train.
fn hold_out(
    labels: &[i64],
    n_classes: usize,
    stratify: bool,
    seed: u64,
    dev_fraction: f64,
    test_fraction: f64,
) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    let groups: Vec<Vec<usize>> = if stratify {
        let mut g = vec![Vec::new(); n_classes];
        for (i, y) in labels.iter().enumerate() {
            g[*y as usize].push(i);
        }
        g
    } else {
        vec![(0..labels.len()).collect()]
    };
    let mut split = vec![0; labels.len()];
    for mut g in groups {
        g.shuffle(&mut rng);
        let n = g.len() as f64;
        let n_test = (n * test_fraction).round() as usize;
        let n_dev = ((n * dev_fraction).round() as usize).min(g.len() - n_test);
        for &i in &g[..n_test] {
            split[i] = 2;
        }
        for &i in &g[n_test..n_test + n_dev] {
            split[i] = 1;
        }
    }
    split
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        if name.ends_with(".gz") {
            let f = std::fs::File::create(&p).unwrap();
            let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::default());
            e.write_all(body.as_bytes()).unwrap();
            e.finish().unwrap();
        } else {
            std::fs::write(&p, body).unwrap();
        }
        p
    }

    fn opts() -> LabelledOptions {
        LabelledOptions::default()
    }

    #[test]
    fn formats_with_split_columns_give_the_same_splits() {
        let dir = tempfile::tempdir().unwrap();
        let csv = write(
            dir.path(),
            "d.csv",
            "id,text,label,split\n1,\"hello, world\",pos,train\n2,\"a \"\"quoted\"\" one\",neg,test\n3,plain,pos,validation\n4,\"two\nlines\",neg,train\n",
        );
        let tsv = write(
            dir.path(),
            "d.tsv.gz",
            "text\tsplit\tlabel\nhello, world\ttrain\tpos\na \"\"quoted\"\" one\ttest\tneg\nplain\tdev\tpos\n\"two\nlines\"\ttrain\tneg\n",
        );
        let jsonl = write(
            dir.path(),
            "d.jsonl",
            "{\"text\":\"hello, world\",\"label\":\"pos\",\"split\":\"train\"}\n\n{\"text\":\"a \\\"quoted\\\" one\",\"label\":\"neg\",\"split\":\"test\"}\n{\"text\":\"plain\",\"label\":\"pos\",\"split\":\"dev\"}\n{\"text\":\"two\\nlines\",\"label\":\"neg\",\"split\":\"train\"}\n",
        );
        for p in [&csv, &jsonl] {
            let s = load_labelled(p, &opts()).unwrap();
            assert_eq!(s.classes, ["neg", "pos"], "{p:?}");
            assert_eq!(s.train.texts, ["hello, world", "two\nlines"], "{p:?}");
            assert_eq!(s.train.labels, [1, 0]);
            assert_eq!(s.dev.texts, ["plain"]);
            assert_eq!(s.test.texts, ["a \"quoted\" one"], "{p:?}");
            assert_eq!(s.test.labels, [0]);
        }
        // The TSV: quoted fields as pandas writes them, gzip, columns in any order.
        let s = load_labelled(&tsv, &opts()).unwrap();
        assert_eq!(s.train.texts, ["hello, world", "two\nlines"]);
        assert_eq!(s.dev.labels, [1]);
        // --format overrides the extension.
        let odd = write(dir.path(), "d.txt", "text,label\nx,1\n");
        assert!(load_labelled(&odd, &opts()).is_err());
        let o = LabelledOptions {
            format: Some(Format::Csv),
            dev_fraction: 0.0,
            test_fraction: 0.0,
            ..opts()
        };
        assert_eq!(load_labelled(&odd, &o).unwrap().train.texts, ["x"]);
    }

    #[test]
    fn named_columns_and_numeric_labels() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "d.jsonl",
            "{\"sentence\":\"a\",\"y\":10,\"part\":\"train\"}\n{\"sentence\":\"b\",\"y\":2,\"part\":\"train\"}\n{\"sentence\":\"c\",\"y\":2,\"part\":\"test\"}\n",
        );
        let o = LabelledOptions {
            text_column: "sentence".into(),
            label_column: "y".into(),
            split_column: Some("part".into()),
            ..opts()
        };
        let s = load_labelled(&p, &o).unwrap();
        assert_eq!(s.classes, ["2", "10"]);
        assert_eq!(s.train.labels, [1, 0]);
        assert_eq!(s.test.texts, ["c"]);
        assert!(s.dev.texts.is_empty());
        // A named column that is missing is an error naming it.
        let o = LabelledOptions {
            split_column: Some("fold".into()),
            ..o
        };
        let e = load_labelled(&p, &o).unwrap_err().to_string();
        assert!(
            e.contains("d.jsonl") && e.contains("line 1") && e.contains("`fold`"),
            "{e}"
        );
    }

    #[test]
    fn malformed_rows_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        for (name, body, line, what) in [
            (
                "a.csv",
                "text,label\nok,x\ntoo,many,fields\n",
                3,
                "expected 2 fields",
            ),
            ("b.csv", "text,label\nok,x\nempty,\n", 3, "empty label"),
            (
                "c.tsv",
                "text\tlabel\nok\tx\nalone\n",
                3,
                "expected 2 fields",
            ),
            (
                "d.jsonl",
                "{\"text\":\"a\",\"label\":\"x\"}\n{\"text\":\"b\"}\n",
                2,
                "`label`",
            ),
            (
                "e.jsonl",
                "{\"text\":\"a\",\"label\":\"x\"}\n\n{\"text\":\"a\",\"label\":\n",
                3,
                "not valid JSON",
            ),
            (
                "f.jsonl",
                "{\"text\":3,\"label\":\"x\"}\n",
                1,
                "must be a string",
            ),
            (
                "g.csv",
                "text,label,split\na,x,train\nb,y,holdout\n",
                3,
                "holdout",
            ),
            ("h.csv", "words,label\na,x\n", 1, "no text column `text`"),
        ] {
            let p = write(dir.path(), name, body);
            let e = load_labelled(&p, &opts()).unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(e, Error::Malformed { .. })
                    && msg.contains(name)
                    && msg.contains(&format!("line {line}:"))
                    && msg.contains(what),
                "{name}: {msg}"
            );
        }
    }

    #[test]
    fn hold_out_is_seeded_and_optionally_stratified() {
        let dir = tempfile::tempdir().unwrap();
        let mut body = String::from("text,label\n");
        for i in 0..100 {
            // 80 of class a, 20 of class b.
            body.push_str(&format!("t{i},{}\n", if i % 5 == 0 { "b" } else { "a" }));
        }
        let p = write(dir.path(), "d.csv", &body);
        let o = LabelledOptions {
            dev_fraction: 0.2,
            test_fraction: 0.1,
            seed: 7,
            ..opts()
        };
        let s = load_labelled(&p, &o).unwrap();
        assert_eq!(
            (s.train.texts.len(), s.dev.texts.len(), s.test.texts.len()),
            (70, 20, 10)
        );
        // Every row lands in exactly one split; each keeps the file's order.
        let mut all: Vec<&String> = s
            .train
            .texts
            .iter()
            .chain(&s.dev.texts)
            .chain(&s.test.texts)
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 100);
        let num = |t: &String| t[1..].parse::<usize>().unwrap();
        assert!(s.dev.texts.windows(2).all(|w| num(&w[0]) < num(&w[1])));
        // Same seed, same splits; another seed, other splits.
        assert_eq!(load_labelled(&p, &o).unwrap().test.texts, s.test.texts);
        let other = load_labelled(
            &p,
            &LabelledOptions {
                seed: 8,
                ..o.clone()
            },
        )
        .unwrap();
        assert_ne!(other.test.texts, s.test.texts);
        // Stratified: each class gives its share (b: 20 rows -> 2 test, 4 dev).
        let st = load_labelled(
            &p,
            &LabelledOptions {
                stratify: true,
                ..o.clone()
            },
        )
        .unwrap();
        let count = |d: &TextDataset, y: i64| d.labels.iter().filter(|&&l| l == y).count();
        assert_eq!((count(&st.test, 1), count(&st.dev, 1)), (2, 4));
        assert_eq!((count(&st.test, 0), count(&st.dev, 0)), (8, 16));
        // Fractions that leave no training rows are refused.
        let bad = LabelledOptions {
            dev_fraction: 0.5,
            test_fraction: 0.5,
            ..o
        };
        assert!(load_labelled(&p, &bad)
            .unwrap_err()
            .to_string()
            .contains("dev_fraction"));
    }

    #[test]
    fn the_headerless_fixture_reads_as_before() {
        let fixture = reuse_testkit::fixtures_dir().join("debian_sections/sections.tsv.gz");
        let old = super::super::load_text_splits(&fixture).unwrap();
        let new = load_labelled(&fixture, &opts()).unwrap();
        assert_eq!(old.classes, new.classes);
        assert_eq!(old.train.texts, new.train.texts);
        assert_eq!(old.test.labels, new.test.labels);
        assert!(!new.dev.texts.is_empty());
    }

    #[test]
    fn records_read_plain_text_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "t.txt.gz",
            "first text\r\n\n  \nsecond, with a comma\n",
        );
        let o = RecordOptions {
            dev_fraction: 0.0,
            test_fraction: 0.0,
            ..RecordOptions::new(&["text"])
        };
        let r = load_records(&p, &o).unwrap();
        assert_eq!(r.train, [["first text"], ["second, with a comma"]]);
        // Held out by seed like the other formats.
        let held = load_records(
            &p,
            &RecordOptions {
                dev_fraction: 0.5,
                ..o.clone()
            },
        )
        .unwrap();
        assert_eq!((held.train.len(), held.dev.len()), (1, 1));
        // One text column only: pairs need a format with columns.
        let e = load_records(&p, &RecordOptions::new(&["prompt", "response"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.txt.gz") && e.contains("one text column"),
            "{e}"
        );
    }

    #[test]
    fn records_read_prompt_and_response_columns_in_every_format() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = write(
            dir.path(),
            "p.jsonl",
            "{\"prompt\": \"Two\\nlines\", \"response\": \"r1\", \"split\": \"train\"}\n\n\
             {\"prompt\": \"p2\", \"response\": \" r2 \", \"split\": \"test\"}\n",
        );
        let csv = write(
            dir.path(),
            "p.csv",
            "response,prompt,split\nr1,\"Two\nlines\",train\n\" r2 \",p2,test\n",
        );
        let o = RecordOptions::new(&["prompt", "response"]);
        let a = load_records(&jsonl, &o).unwrap();
        let b = load_records(&csv, &o).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.train, [["Two\nlines", "r1"]]);
        // Free text is not trimmed (a response's leading space is a token).
        assert_eq!(a.test, [["p2", " r2 "]]);
        assert!(a.dev.is_empty());
        // A missing column names itself and what the file has.
        let e = load_records(&csv, &RecordOptions::new(&["prompt", "answer"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`answer`") && e.contains("response, prompt, split"),
            "{e}"
        );
        let e = load_records(&jsonl, &RecordOptions::new(&["answer"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("p.jsonl") && e.contains("no key `answer`"),
            "{e}"
        );
        // A number where text is expected is an error naming the line.
        let bad = write(
            dir.path(),
            "b.jsonl",
            "{\"prompt\": 3, \"response\": \"x\"}\n",
        );
        let e = load_records(&bad, &o).unwrap_err().to_string();
        assert!(
            e.contains("line 1") && e.contains("`prompt` must be a string"),
            "{e}"
        );
        // Without a split column, dev and test are held out by seed.
        let rows: String = (0..20)
            .map(|i| format!("{{\"prompt\": \"p{i}\", \"response\": \"r\"}}\n"))
            .collect();
        let plain = write(dir.path(), "n.jsonl", &rows);
        let s = load_records(&plain, &o).unwrap();
        assert_eq!((s.train.len(), s.dev.len(), s.test.len()), (16, 2, 2));
    }
}
