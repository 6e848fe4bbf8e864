//! A model stage's `device` and `dtype` parameters, read into a [`Placement`] (what they mean,
//! and why the dtype enters the key and the device does not: [`ladle_models::device`]).

use candle_core::DType;
use ladle_engine::error::PipelineError;
use ladle_engine::pipeline::params::Params;
use ladle_models::device::{Placement, dtype_name};

/// Reads `device` and `dtype` from a model stage's parameters.
pub fn configure(params: &mut Params<'_>) -> Result<Placement, PipelineError> {
    let device = params.string("device")?;
    params.exclude_from_key("device");
    let dtype = params.choice("dtype", &["f32", "bf16", "f16"])?;
    let placement =
        Placement::from_names(device.as_deref(), dtype.as_deref()).map_err(|(name, e)| params.error(name, e))?;
    if placement.dtype == DType::F32 {
        params.exclude_from_key("dtype");
    } else {
        params.record("dtype", dtype_name(placement.dtype).into());
    }
    Ok(placement)
}
