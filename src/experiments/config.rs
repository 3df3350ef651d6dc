//! The experiment config, in the seed document's YAML schema:
//!
//! ```yaml
//! experiment: {name: experiment_3, models: [WEIGHTS_DIR], gpu_id: null}
//! input: {prompts: [...], seeds: [42, 43], durations: [30]}
//! ```

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSection {
    pub name: String,
    pub models: Vec<String>,
    /// Accepted for compatibility; spintrak runs on the CPU.
    #[serde(default)]
    pub gpu_id: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSection {
    pub prompts: Vec<String>,
    pub seeds: Vec<u64>,
    pub durations: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub experiment: ExperimentSection,
    pub input: InputSection,
}

/// One cell of the grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// `<first three words of the prompt joined by _>_<duration>_<seed>`, made unique.
    pub name: String,
    pub prompt_index: usize,
    pub prompt: String,
    pub duration: f64,
    pub seed: u64,
}

/// Most cases one config may describe (each is a generated track and its embedding).
pub const MAX_CASES: usize = 100_000;

impl ExperimentConfig {
    pub fn read(path: &Path) -> Result<(Self, String)> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("{}: cannot read the config", path.display()))?;
        let cfg: Self = serde_yaml::from_str(&text).map_err(|e| {
            let place =
                e.location().map(|l| format!(" (line {}, column {})", l.line(), l.column())).unwrap_or_default();
            anyhow::anyhow!("{}{place}: {e}", path.display())
        })?;
        cfg.validate().with_context(|| path.display().to_string())?;
        Ok((cfg, text))
    }

    pub fn validate(&self) -> Result<()> {
        let name = &self.experiment.name;
        if name.trim().is_empty() || name.contains('/') || name.contains('\\') {
            bail!("experiment.name must be a non-empty name without slashes, got {name:?}");
        }
        if self.experiment.models.is_empty() {
            bail!("experiment.models is empty: list the model directory, e.g. models: [\"weights/\"]");
        }
        if self.experiment.models.len() > 1 {
            bail!("experiment.models lists {} models; run one config per model", self.experiment.models.len());
        }
        let i = &self.input;
        if i.prompts.is_empty() || i.seeds.is_empty() || i.durations.is_empty() {
            bail!(
                "the grid is empty: input.prompts ({}), input.seeds ({}) and input.durations ({}) each need at least one entry",
                i.prompts.len(),
                i.seeds.len(),
                i.durations.len()
            );
        }
        if let Some(p) = i.prompts.iter().position(|p| p.trim().is_empty()) {
            bail!("input.prompts[{p}] is empty");
        }
        if let Some(d) = i.durations.iter().find(|d| d.is_nan() || **d <= 0.0) {
            bail!("input.durations must be positive seconds, found {d}");
        }
        let max = crate::musicgen::model::MAX_SECONDS;
        if let Some(d) = i.durations.iter().find(|d| **d > max) {
            bail!("input.durations: {d} s is longer than the {max} s limit (at 50 frames/s, {:.0} decoding steps per case)", d * 50.0);
        }
        let cases = i.prompts.len().saturating_mul(i.seeds.len()).saturating_mul(i.durations.len());
        if cases > MAX_CASES {
            bail!("the grid has {cases} cases (prompts × seeds × durations); at most {MAX_CASES} per config: split it");
        }
        Ok(())
    }

    /// The grid prompts × seeds × durations, in config order.
    pub fn cases(&self) -> Vec<Case> {
        let mut cases = Vec::new();
        for (pi, prompt) in self.input.prompts.iter().enumerate() {
            let base = prompt_stem(prompt);
            // Prompts sharing their first three words get -2, -3, ... in config order.
            let earlier = self.input.prompts[..pi].iter().filter(|p| prompt_stem(p) == base).count();
            let stem = if earlier == 0 { base } else { format!("{base}-{}", earlier + 1) };
            for &seed in &self.input.seeds {
                for &duration in &self.input.durations {
                    cases.push(Case {
                        name: format!("{stem}_{}_{seed}", format_seconds(duration)),
                        prompt_index: pi,
                        prompt: prompt.clone(),
                        duration,
                        seed,
                    });
                }
            }
        }
        cases
    }
}

/// First three words, joined by `_`, keeping only characters safe in file names.
pub fn prompt_stem(prompt: &str) -> String {
    let words: Vec<String> = prompt
        .split_whitespace()
        .take(3)
        .map(|w| w.chars().filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_').collect::<String>())
        .filter(|w| !w.is_empty())
        .collect();
    if words.is_empty() {
        "prompt".into()
    } else {
        words.join("_")
    }
}

/// `30` for whole seconds, `2.5` otherwise.
pub fn format_seconds(d: f64) -> String {
    if d.fract() == 0.0 {
        format!("{}", d as i64)
    } else {
        format!("{d}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ExperimentConfig> {
        let c: ExperimentConfig = serde_yaml::from_str(s)?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn seed_configs_parse_and_name_cases() {
        for n in [1, 3, 4] {
            let path = format!("{}/experiments_configs/experiment_{n}.yaml", env!("CARGO_MANIFEST_DIR"));
            let (cfg, _) = ExperimentConfig::read(Path::new(&path)).unwrap();
            assert_eq!(cfg.experiment.name, format!("experiment_{n}"));
        }
        let (cfg, _) = ExperimentConfig::read(Path::new(&format!(
            "{}/experiments_configs/experiment_3.yaml",
            env!("CARGO_MANIFEST_DIR")
        )))
        .unwrap();
        let cases = cfg.cases();
        assert_eq!(cases.len(), 10);
        assert_eq!(cases[0].name, "Moody_alternative_rock_30_42");
        assert_eq!(cases[5].name, "Lively_salsa_groove_30_42");
    }

    #[test]
    fn shared_first_words_get_unique_names() {
        let c = parse("experiment: {name: e, models: [m]}\ninput: {prompts: [\"a b c d\", \"a b c e\", \"a b c f\"], seeds: [1], durations: [2.5]}").unwrap();
        let names: Vec<String> = c.cases().into_iter().map(|c| c.name).collect();
        assert_eq!(names, vec!["a_b_c_2.5_1", "a_b_c-2_2.5_1", "a_b_c-3_2.5_1"]);
    }

    #[test]
    fn bad_configs_are_explained() {
        let e =
            parse("experiment: {name: e, models: [m], colour: red}\ninput: {prompts: [a], seeds: [1], durations: [1]}")
                .unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let e = parse("experiment: {name: e, models: [m]}\ninput: {prompts: [a], seeds: [1]}").unwrap_err();
        assert!(e.to_string().contains("durations"), "{e}");
        let e =
            parse("experiment: {name: e, models: [m]}\ninput: {prompts: [], seeds: [1], durations: [1]}").unwrap_err();
        assert!(format!("{e:#}").contains("grid is empty"), "{e}");
        let e =
            parse("experiment: {name: e, models: []}\ninput: {prompts: [a], seeds: [1], durations: [1]}").unwrap_err();
        assert!(format!("{e:#}").contains("models"), "{e}");
    }
}
