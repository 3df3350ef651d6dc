//! The experiments of EXPERIMENTS.md: the config, the runner, results and figures.

pub mod config;
pub mod plot;
pub mod results;
pub mod runner;
