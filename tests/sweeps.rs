//! The model-building half of POINTS in one file: matrix stages and variables, metrics from
//! `exec` stages, `choose`, and GPUs held by the stages that train. One test binary for the
//! three (each binary costs a link of ladle's dependencies).

mod common;

#[path = "sweeps/choose.rs"]
mod choose;
#[path = "sweeps/gpus.rs"]
mod gpus;
#[path = "sweeps/matrix.rs"]
mod matrix;
#[path = "sweeps/recipe.rs"]
mod recipe;
