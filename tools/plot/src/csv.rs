//! A tiny reader for the benchmarks' CSV files: a header line, then rows of
//! comma-separated fields (no quoting; the benchmarks write none). Every row
//! must have as many fields as the header; numeric columns must hold finite,
//! non-negative numbers (times, rates, sizes and counts).

use std::path::{Path, PathBuf};

use crate::Error;

/// One CSV file, read whole.
#[derive(Debug)]
pub struct Table {
    path: PathBuf,
    header_line: usize,
    header: Vec<String>,
    /// Each data row with its line number.
    rows: Vec<(usize, Vec<String>)>,
}

impl Table {
    /// Reads `path`: `Ok(None)` if it does not exist, an error if it cannot be
    /// read, has no header, no rows, or a row with the wrong number of fields.
    pub fn read(path: &Path) -> Result<Option<Table>, Error> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(Error::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Self::parse(path, &text).map(Some)
    }

    /// Parses `text` (read from `path`, which names it in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Table, Error> {
        let bad = |line: usize, msg: String| Error::Csv {
            path: path.to_owned(),
            line,
            msg,
        };
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty());
        let (header_line, first) = lines
            .next()
            .ok_or_else(|| bad(1, "empty file, no header".into()))?;
        let header: Vec<String> = first.split(',').map(|f| f.trim().to_owned()).collect();
        let mut rows = Vec::new();
        for (n, line) in lines {
            let row: Vec<String> = line.split(',').map(|f| f.trim().to_owned()).collect();
            if row.len() != header.len() {
                return Err(bad(
                    n,
                    format!("{} fields, the header has {}", row.len(), header.len()),
                ));
            }
            rows.push((n, row));
        }
        if rows.is_empty() {
            return Err(bad(1, "a header but no rows".into()));
        }
        Ok(Table {
            path: path.to_owned(),
            header_line,
            header,
            rows,
        })
    }

    fn index(&self, column: &str) -> Result<usize, Error> {
        self.header
            .iter()
            .position(|h| h == column)
            .ok_or_else(|| Error::Csv {
                path: self.path.clone(),
                line: self.header_line,
                msg: format!("no column `{column}` (header: {})", self.header.join(",")),
            })
    }

    /// The text of `column`, one entry per row.
    pub fn strings(&self, column: &str) -> Result<Vec<&str>, Error> {
        let i = self.index(column)?;
        Ok(self.rows.iter().map(|(_, r)| r[i].as_str()).collect())
    }

    /// `column` as numbers, one per row; an error names the line of a field
    /// that is not a finite, non-negative number.
    pub fn numbers(&self, column: &str) -> Result<Vec<f64>, Error> {
        let i = self.index(column)?;
        self.rows
            .iter()
            .map(|(n, r)| match r[i].parse::<f64>() {
                Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
                _ => Err(Error::Csv {
                    path: self.path.clone(),
                    line: *n,
                    msg: format!("`{column}` is `{}`, not a non-negative number", r[i]),
                }),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Table, Error> {
        Table::parse(Path::new("t.csv"), text)
    }

    #[test]
    fn reads_a_good_file() {
        let t = parse("path,round_trip_us\nsocket,12.5\nin-process, 3\n").unwrap();
        assert_eq!(t.strings("path").unwrap(), ["socket", "in-process"]);
        assert_eq!(t.numbers("round_trip_us").unwrap(), [12.5, 3.0]);
    }

    #[test]
    fn missing_column_is_an_error() {
        let t = parse("a,b\n1,2\n").unwrap();
        let e = t.numbers("c").unwrap_err().to_string();
        assert!(e.contains("no column `c`"), "{e}");
        assert!(e.contains("t.csv"), "{e}");
    }

    #[test]
    fn non_number_is_an_error() {
        let t = parse("a,b\n1,2\n3,x\n").unwrap();
        assert_eq!(t.numbers("a").unwrap(), [1.0, 3.0]);
        let e = t.numbers("b").unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("`x`"), "{e}");
        for bad in ["NaN", "inf", "-1", ""] {
            let t = parse(&format!("a,b\n1,{bad}\n")).unwrap();
            assert!(t.numbers("b").is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ragged_empty_and_headless_files_are_errors() {
        let e = parse("a,b\n1,2\n1\n").unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("1 fields"), "{e}");
        assert!(parse("a,b\n").is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn a_missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Table::read(&dir.path().join("nope.csv")).unwrap().is_none());
        let p = dir.path().join("x.csv");
        std::fs::write(&p, "a\n1\n").unwrap();
        assert_eq!(
            Table::read(&p).unwrap().unwrap().numbers("a").unwrap(),
            [1.0]
        );
    }
}
