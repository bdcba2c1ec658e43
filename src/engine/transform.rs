//! Value transforms: the matrix the recipe segments, computed from the stored values. Implicit
//! values (plays, views) summed raw segment users by how much they play; a per-cell transform
//! (binary, sqrt, log1p) and l2-normalised rows make a user's row say *what* they play. The
//! engine keeps the raw values (they are what accumulates and what is persisted) and the
//! transformed rows beside them, so every statistic is that of the transformed matrix, exactly.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ids::SparseVec;
use crate::event::Mode;

/// What each stored value becomes, on its own. Signs are kept (`sqrt(−4) = −2`), so a cell is
/// non-zero exactly when its stored value is: the transformed rows have the stored rows' items.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CellTransform {
    #[default]
    None,
    /// 1 for every non-zero value: who played what, not how much.
    Binary,
    /// The square root: damps heavy repeats, homogeneous of degree ½.
    Sqrt,
    /// `ln(1 + v)`: damps heavy repeats harder; not homogeneous, so no half-life with it.
    Log1p,
}

/// `[events] transform`: a per-cell transform, then optionally each user's row scaled to unit
/// l2 norm (`"sqrt+l2"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ValueTransform {
    pub cell: CellTransform,
    pub l2_rows: bool,
}

/// The names `[events] transform` accepts, for error messages and docs.
pub const TRANSFORM_NAMES: &str = "none, binary, sqrt, log1p, l2, binary+l2, sqrt+l2 or log1p+l2";

impl ValueTransform {
    /// The raw values, as they are (explicit mode's default: the seed recipe's matrix).
    pub const NONE: ValueTransform = ValueTransform {
        cell: CellTransform::None,
        l2_rows: false,
    };

    /// The default of `mode` when `[events] transform` is unset: the values as they are for
    /// explicit ratings (scikit-learn parity with the seed recipe); for implicit counts,
    /// unit-norm rows of who played what (`binary+l2`), which recovered planted tastes best in
    /// every measurement (docs/implicit.md), or with a half-life (`decaying`) square roots of
    /// the counts in unit-norm rows (`sqrt+l2`), nearly as good and the weights still count
    /// (binary ignores them).
    pub fn default_for(mode: Mode, decaying: bool) -> ValueTransform {
        match mode {
            Mode::Explicit => ValueTransform::NONE,
            Mode::Implicit => ValueTransform {
                cell: if decaying {
                    CellTransform::Sqrt
                } else {
                    CellTransform::Binary
                },
                l2_rows: true,
            },
        }
    }

    pub fn parse(text: &str) -> Result<ValueTransform, String> {
        let text = text.trim().to_ascii_lowercase();
        if text == "l2" {
            return Ok(ValueTransform {
                cell: CellTransform::None,
                l2_rows: true,
            });
        }
        let (cell, l2_rows) = match text.strip_suffix("+l2") {
            Some(cell) => (cell, true),
            None => (text.as_str(), false),
        };
        let cell = match cell {
            "none" if !l2_rows => CellTransform::None,
            "binary" => CellTransform::Binary,
            "sqrt" => CellTransform::Sqrt,
            "log1p" => CellTransform::Log1p,
            _ => return Err(format!("\"{text}\" is not a transform")),
        };
        Ok(ValueTransform { cell, l2_rows })
    }

    /// Every transform, `none` first, in the order of [`TRANSFORM_NAMES`].
    pub fn all() -> impl Iterator<Item = ValueTransform> {
        let cells = [
            CellTransform::None,
            CellTransform::Binary,
            CellTransform::Sqrt,
            CellTransform::Log1p,
        ];
        [false, true].into_iter().flat_map(move |l2_rows| {
            cells
                .into_iter()
                .map(move |cell| ValueTransform { cell, l2_rows })
        })
    }

    pub fn is_identity(&self) -> bool {
        *self == ValueTransform::NONE
    }

    /// The degree `a` with `T(f·x) = f^a·T(x)` for every scale `f > 0`, when there is one: a
    /// half-life multiplies every stored value by one factor, which such a transform turns
    /// into one factor of the transformed values. `None` for log1p (no such degree).
    pub fn degree(self) -> Option<f64> {
        if self.l2_rows && self.cell != CellTransform::Log1p {
            return Some(0.0);
        }
        match self.cell {
            CellTransform::None => Some(1.0),
            CellTransform::Binary => Some(0.0),
            CellTransform::Sqrt => Some(0.5),
            CellTransform::Log1p => None,
        }
    }

    /// The scale of the transformed values given `scale`, that of the stored ones (a decaying
    /// engine's values are in units of `scale`; see `decay`).
    pub fn scale_of(self, scale: f64) -> f64 {
        match self.degree() {
            Some(1.0) => scale,
            Some(0.0) => 1.0,
            Some(a) => scale.powf(a),
            None => scale,
        }
    }

    /// One stored value transformed (before any row normalisation).
    #[inline]
    pub fn cell_value(self, v: f64) -> f64 {
        match self.cell {
            CellTransform::None => v,
            CellTransform::Binary => v.signum() * f64::from(u8::from(v != 0.0)),
            CellTransform::Sqrt => v.abs().sqrt().copysign(v),
            CellTransform::Log1p => v.abs().ln_1p().copysign(v),
        }
    }

    /// The transformed row of the stored row `raw`, written into `out` (same items). The
    /// norm is summed in item order, so a row is transformed identically however it came to
    /// be (online, restored or batch).
    pub fn row_into(self, raw: &SparseVec, out: &mut SparseVec) {
        out.idx.clear();
        out.idx.extend_from_slice(&raw.idx);
        out.val.clear();
        out.val.extend(raw.val.iter().map(|&v| self.cell_value(v)));
        if self.l2_rows {
            let norm = out.val.iter().map(|v| v * v).sum::<f64>().sqrt();
            if norm > 0.0 {
                out.val.iter_mut().for_each(|v| *v /= norm);
            }
        }
    }

    pub fn row(self, raw: &SparseVec) -> SparseVec {
        let mut out = SparseVec::default();
        self.row_into(raw, &mut out);
        out
    }
}

impl fmt::Display for ValueTransform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cell = match self.cell {
            CellTransform::None => "none",
            CellTransform::Binary => "binary",
            CellTransform::Sqrt => "sqrt",
            CellTransform::Log1p => "log1p",
        };
        match (self.cell, self.l2_rows) {
            (CellTransform::None, true) => f.write_str("l2"),
            (_, true) => write!(f, "{cell}+l2"),
            (_, false) => f.write_str(cell),
        }
    }
}

impl Serialize for ValueTransform {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ValueTransform {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        ValueTransform::parse(&text)
            .map_err(|e| serde::de::Error::custom(format!("{e}: use one of {TRANSFORM_NAMES}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_parses_and_prints_back() {
        let names: Vec<String> = ValueTransform::all().map(|t| t.to_string()).collect();
        assert_eq!(names.join(", "), TRANSFORM_NAMES.replace(" or ", ", "));
        for name in &names {
            let t = ValueTransform::parse(name).unwrap();
            assert_eq!(&t.to_string(), name);
        }
        assert!(ValueTransform::parse("none+l2").is_err());
        assert!(ValueTransform::parse("sqrt+l1").is_err());
        assert_eq!(
            ValueTransform::parse(" SQRT+L2 ").unwrap(),
            ValueTransform::default_for(Mode::Implicit, true)
        );
        assert_eq!(
            ValueTransform::default_for(Mode::Implicit, false).to_string(),
            "binary+l2"
        );
    }

    #[test]
    fn homogeneous_transforms_turn_a_power_of_two_scale_into_an_exact_one() {
        let raw = SparseVec {
            idx: vec![1, 4, 9],
            val: vec![3.0, 0.7, 250.0],
        };
        let factor = 2f64.powi(-64);
        let scaled = SparseVec {
            idx: raw.idx.clone(),
            val: raw.val.iter().map(|v| v * factor).collect(),
        };
        for name in ["binary", "sqrt", "l2", "binary+l2", "sqrt+l2"] {
            let t = ValueTransform::parse(name).unwrap();
            let g = t.scale_of(factor);
            let expected: Vec<f64> = t.row(&raw).val.iter().map(|v| v * g).collect();
            assert_eq!(t.row(&scaled).val, expected, "{name}");
        }
        assert_eq!(ValueTransform::parse("log1p").unwrap().degree(), None);
        assert_eq!(ValueTransform::parse("log1p+l2").unwrap().degree(), None);
    }

    #[test]
    fn rows_keep_their_items_and_l2_rows_have_unit_norm() {
        let raw = SparseVec {
            idx: vec![0, 2, 5],
            val: vec![1.0, 16.0, -4.0],
        };
        let t = ValueTransform::parse("sqrt+l2").unwrap();
        let row = t.row(&raw);
        assert_eq!(row.idx, raw.idx);
        let norm: f64 = row.val.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-15);
        assert!(row.val[2] < 0.0, "signs kept");
        assert_eq!(
            ValueTransform::parse("binary").unwrap().row(&raw).val,
            vec![1.0, 1.0, -1.0]
        );
    }
}
