//! JSON has no NaN or infinity (serde_json writes them as `null`): fields that could hold one
//! are read back through these, so a stored state or snapshot with a non-finite float stays
//! readable, the value reading as NaN.

use serde::{Deserialize, Deserializer};

/// An `f64` that may have been written as `null`.
pub fn float<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// A `Vec<f64>` whose elements may have been written as `null`.
pub fn floats<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    Ok(Vec::<Option<f64>>::deserialize(d)?
        .into_iter()
        .map(|v| v.unwrap_or(f64::NAN))
        .collect())
}
